"""Where :class:`~maml_stop.live.stopping.LiveStopping` attaches to a model, and how it lets go.

How it sees the generation without changing it: a forward hook on the model records, at every step,
the cache object, the attention mask, the next-token logits and (via a hook on the final norm, and on
decoder layer ``mid_layer`` when the featurizer has one) the hidden states. When ``generate`` calls the
criterion, the newest token has been chosen but not yet run through the model; a probe therefore feeds
that token to its cache copy (observing its hidden state and entropy, as the harvester does), then the
trigger. The generation's own cache and tokens are never touched (tested: a run whose threshold is never
reached gives exactly the tokens of a plain ``generate``, in every mode).

The hooks hold the criterion only weakly (:func:`weak_hook`): a model's hook then does not keep it alive,
and a garbage-collected criterion's hooks are removed (issue 29: 30 criteria never ``remove_hooks()``ed
left 60 hooks and slowed every later ``generate``).
"""

from __future__ import annotations

import weakref
from typing import Callable

from torch import nn

__all__ = ["base_model", "final_norm", "mid_module", "weak_hook", "remove_handles", "check_decoding"]


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "model", None) or getattr(model, "base_model", None)


def final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(base_model(model), "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__} (expected model.model.norm)")
    return norm


def mid_module(model: nn.Module, k: int) -> nn.Module | None:
    """The module whose output is ``output_hidden_states[k]`` (HF Llama/Qwen2: 0 = the embeddings,
    k = decoder layer k-1; the last one is the final norm's output: None, read from the norm hook)."""
    n_layers = model.config.num_hidden_layers
    if not 0 <= k <= n_layers:
        raise ValueError(f"mid_layer={k} but the model has hidden states 0..{n_layers}")
    if k == n_layers:
        return None
    base = base_model(model)
    if k == 0:
        return base.embed_tokens
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return layers[k - 1]


def weak_hook(method: Callable) -> Callable:
    """A hook that calls ``method`` while its object lives (the model's hook then does not keep the
    criterion alive) and does nothing after."""
    ref = weakref.WeakMethod(method)

    def hook(*args, **kwargs):
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)

    return hook


def remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


def check_decoding(started: bool, uncached: bool, sequences: int, rows: int) -> None:
    """Refuse, at the criterion's first call, a decoding that the hooks cannot follow (issue 29): a
    generation without a KV cache (``started`` False after an ``uncached`` forward), and beam search or any
    decoder that regroups sequences (``sequences`` differ from the prefill's ``rows``)."""
    if not started and uncached:
        raise ValueError("LiveStopping needs generate(..., use_cache=True) (the default): it probes from the "
                         "generation's KV cache, and without one it would give no probe and no answer per row")
    if started and sequences != rows:
        raise ValueError(f"LiveStopping got {sequences} sequences for a generation of {rows} rows: beam "
                         "search (num_beams > 1) and other decoders that regroup sequences are not supported; "
                         "use greedy decoding or sampling (num_beams=1)")
