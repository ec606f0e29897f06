"""Load a causal LM for harvesting: a local folder, a hub id (on a machine with hub access) or a
``.gguf`` file; and record its identity (path, sha256 of the weight files).

A GGUF file loads through transformers (``gguf_file=``, dequantised; slow, ~40 s for 0.5B).
:func:`convert_gguf` turns it once into an ordinary folder that loads in a few seconds, and records the
GGUF's sha256 in ``provenance.json`` inside the folder, so corpora harvested from the folder still name
the exact file that produced them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names (``cpu``, ``cuda``, ``cuda:1``, ``mps``), checked before any model
    loads: a malformed string, or an accelerator this machine lacks, is a ``ValueError`` naming it.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {spec!r}; valid: {', '.join(DEVICE_TYPES)} (optionally with an index, "
                         "e.g. cuda:0)") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {spec!r} is of type {device.type!r}; valid: {', '.join(DEVICE_TYPES)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but torch.cuda is not available on this machine (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec!r} asked for, but this machine has {count} CUDA device(s): "
                             f"cuda:0..cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {spec!r} asked for, but torch.backends.mps is not available; use --device cpu")
    return device


def load_model(spec: str, dtype: str = "bfloat16", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from a folder, a ``.gguf`` file or a hub id, the model on ``device``
    (checked first: :func:`resolve_device`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    _dtype(dtype)

    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec} does not exist")
        kw = {"gguf_file": path.name}
        tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=_dtype(dtype), **kw)
    else:
        if spec.startswith((".", "/")) and not path.exists():
            raise FileNotFoundError(f"model folder {spec} does not exist")
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=_dtype(dtype))
    model.to(target).eval()
    return model, tok


def model_identity(spec: str, hash_weights: bool = True) -> dict[str, Any]:
    """Path, weight files and their sha256 (plus the GGUF provenance of a converted folder). A hub id
    hashes the files of its cached snapshot, so that a corpus resumes from either (issue 29)."""
    path = Path(spec)
    ident: dict[str, Any] = {"spec": spec}
    files: list[Path] = []
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        prov = path / "provenance.json"
        if prov.is_file():
            ident["provenance"] = json.loads(prov.read_text())
    else:
        ident["hub_id"] = spec
        cached = _hub_snapshot(spec) if hash_weights else None
        if cached is not None:  # the files the hub id loaded: the same sha256 as a local copy of them
            files = sorted(p for p in cached.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if hash_weights:
        ident["weights"] = {p.name: sha256_file(p) for p in files}
    return ident


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model already in the cache (None when it is not there)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not a hub id, not cached, or huggingface_hub missing: nothing to hash
        return None


def convert_gguf(gguf: str, out: str) -> str:
    """Dequantise a GGUF file into an ordinary model folder (see module docstring)."""
    model, tok = load_model(gguf, dtype="float32")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    prov = {"converted_from": Path(gguf).name, "gguf_sha256": sha256_file(gguf)}
    (Path(out) / "provenance.json").write_text(json.dumps(prov, indent=2))
    return out


if __name__ == "__main__":  # python -m maml_stop.harvest.model MODEL.gguf OUT_DIR
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m maml_stop.harvest.model MODEL.gguf OUT_DIR")
    print(convert_gguf(sys.argv[1], sys.argv[2]))
