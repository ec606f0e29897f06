"""Ablations of the main job: which parts of the MAML-adapted stopping policy carry its savings.

Each variant meta-trains with ``experiments/main.yaml`` (read after ``quickstart.yaml``) plus its overrides,
evaluates on the same held-out families, K and fixed episodes (``experiments/main_evaluate.yaml``, after
``evaluate.yaml``), and contributes one row per method of
interest to ``runs/ablations/ablations.md``: mean over held-out families of tokens saved with the
support-chosen threshold (em_target, 1 point), its EM drop, the share of episodes within 1 point, the
curve figure (best threshold in hindsight) and the fractions of the oracles' savings (EM-first, and at
equal EM).

Every row says what it ran (the ``ran`` column, and the commands under "What each variant ran"): the
checkpoint it evaluated and that checkpoint's optimiser step. A meta-trained variant evaluates its
``best.ckpt`` (lowest ``val/loss``); a fit that wrote none is an error, not a silent fall-back to
``last.ckpt``. The "no meta-training" variant evaluates the zero-step checkpoint of the main config
(:mod:`maml_stop.learn.zero_step`: the random initialisation with the meta-training families'
normalisation, no optimiser step), adapted by the same adapter.

    python experiments/ablations.py --k 16 --episodes 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

FIT_CONFIGS = ["--config", "experiments/quickstart.yaml", "--config", "experiments/main.yaml"]
ZERO_STEP = "zero_step"  # the variant kind that writes the zero-step checkpoint instead of meta-training

# name -> (kind, extra `maml-stop fit` arguments); kind: "fit" (meta-train, evaluate best.ckpt) or ZERO_STEP
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "main (FOMAML, mlp 1x32, 3 inner steps)": ("fit", []),
    "ANIL (adapt the head only)": ("fit", ["--model.adapter.algorithm=anil"]),
    "second-order MAML": ("fit", ["--model.adapter.first_order=false"]),
    "delta predictor (sees the previous probe)": ("fit", ["--model.predictor.kind=delta"]),
    "inner loss: plain BCE (no class balance)": ("fit", ["--model.adapter.loss=bce"]),
    "no meta-training (zero-step: random init + training families' normalisation, no optimiser step)": (ZERO_STEP, []),
}


def checkpoint_of(kind: str, run: Path, fit_args: list[str], exe: Path) -> tuple[Path, list[str]]:
    """Run one variant's training side; the checkpoint to evaluate and the command that wrote it."""
    if kind == ZERO_STEP:
        ckpt = run / "zero_step" / "zero_step.ckpt"
        cmd = [sys.executable, "-m", "maml_stop.learn.zero_step", f"--out={ckpt}", *fit_args]
    else:
        ckpt = run / "checkpoints" / "best.ckpt"
        # the output root carries the logs and checkpoints: run/checkpoints/best.ckpt (lowest val/loss)
        cmd = [str(exe), "fit", *fit_args, f"--trainer.default_root_dir={run}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if not ckpt.is_file():
        raise SystemExit(f"{' '.join(cmd)} wrote no {ckpt} (a fit that never validated has no best checkpoint)")
    return ckpt, cmd


def ran(kind: str, ckpt: Path) -> str:
    """What a row evaluated: the checkpoint file and its optimiser step."""
    from maml_stop.learn.module import load_predictor

    meta = load_predictor(ckpt)[2]
    what = "zero-step checkpoint" if kind == ZERO_STEP else f"{ckpt.name} (lowest val/loss)"
    return f"{what}, step {meta['global_step']}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    p.add_argument("--fit_arg", dest="fit_args", action="append", default=[], help="extra `maml-stop fit` argument for every variant (repeat)")
    args = p.parse_args()
    exe = Path(sys.executable).parent / "maml-stop"
    out = Path(args.out)
    rows, commands = [], []
    from maml_stop.evaluate.report import summarise

    for i, (name, (kind, extra)) in enumerate(VARIANTS.items()):
        if args.only and name not in args.only:
            continue
        run = out / f"v{i}"
        shutil.rmtree(run, ignore_errors=True)
        ckpt, cmd = checkpoint_of(kind, run, [*FIT_CONFIGS, *extra, *args.fit_args], exe)
        evaluate = [str(exe), "evaluate", "--config", "experiments/evaluate.yaml", "--config", "experiments/main_evaluate.yaml",
                    f"--out={run}/evaluate", f"--checkpoint={ckpt}", f"--k=[{args.k}]",
                    f"--episodes={args.episodes}", "--threshold_methods=[em_target]", "--progress=false"]
        subprocess.run(evaluate, check=True, stdout=subprocess.DEVNULL)
        what = ran(kind, ckpt)
        commands.append((name, what, cmd, evaluate))
        results = json.loads((run / "evaluate" / "results.json").read_text())
        s = summarise(results)[str(args.k)]
        for method in ("maml", "finetuned", "pooled", "confidence", "oracle", "oracle_equal_em"):
            m = s[method]["mean"]
            rows.append((name if method == "maml" else "", what if method == "maml" else "", method,
                         100 * m["savings"][0], 100 * m["em_drop"][0], 100 * m["within_delta"][0],
                         100 * m["curve_savings"][0], 100 * m["oracle_fraction"][0], 100 * m["equal_em_fraction"][0]))
        print(f"done: {name} ({what})", flush=True)
    header = ["| variant | ran | method | saved % | EM drop (pts) | episodes within 1 pt | saved % best τ in hindsight | "
              "% of oracle | % of oracle at equal EM |", "|---|---|---|---|---|---|---|---|---|"]

    def row(r) -> str:
        return "| {} | {} | {} | {:.1f} | {:.1f} | {:.0f}% | {:.1f} | {:.0f}% | {:.0f}% |".format(*r)

    def shell(cmd: list[str]) -> str:
        return " ".join(Path(c).name if j == 0 else c for j, c in enumerate(cmd))

    lines = [f"K={args.k}, {args.episodes} episodes per held-out family, threshold em_target (1 point) on support",
             "", "## MAML-adapted probe per variant", "", *header, *(row(r) for r in rows if r[2] == "maml"),
             "", "## Every method per variant", "",
             "The pooled, fine-tuned and from-scratch probes use the variant's predictor architecture.", "",
             *header, *(row(r) for r in rows),
             "", "## What each variant ran", ""]
    for name, what, cmd, evaluate in commands:
        lines += [f"- **{name}** ({what}):", f"  `{shell(cmd)}`, then", f"  `{shell(evaluate)}`"]
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
