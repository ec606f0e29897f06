"""The cost-sensitive trade-off curve (issue 13 item 4, issue 11 item 4): meta-train with several lambdas,
evaluate each on the main held-out families, plot saved % against EM drop per lambda.

Every fit is ``experiments/cost_sensitive.yaml`` (read after ``quickstart.yaml`` and ``main.yaml``) with
``--data.cost_lambda=<lambda>`` and each query loss of ``--losses`` (``balanced/cost``: the cost-weighted
BCE; ``balanced/expected_cost``: the expected cost of the soft first-stop policy), plus the reference,
the main config's own ``balanced`` loss (lambda-free), all with ``--steps`` meta-steps (validation every
half, ``best.ckpt`` = lowest ``val/loss``; no EM/token callback). Each checkpoint is evaluated with

    maml-stop evaluate --config experiments/evaluate.yaml --config experiments/main_evaluate.yaml \\
        --checkpoint <run>/checkpoints/best.ckpt --k [16] --episodes N

(methods ``full, maml, oracle``; thresholds ``em_target`` (1 point, chosen on support) and ``fixed``
(tau = 0.5: the predictor's own probability scale, which lambda moves most directly)). Writes
``<report>/report.md`` (the table and the commands) and ``<report>/tradeoff.png``; fits go under ``--runs``.
Both commands run in this process (``maml_stop.cli.main``, the console script's dispatcher): on a loaded
machine importing torch and Lightning costs more than a short fit.

    python experiments/studies/cost_lambda_sweep.py --lambdas 0 0.1 0.5 2 8 --steps 100 --episodes 20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

FIT_CONFIGS = ["--config", "experiments/quickstart.yaml", "--config", "experiments/main.yaml",
               "--config", "experiments/cost_sensitive.yaml"]
EVAL_CONFIGS = ["--config", "experiments/evaluate.yaml", "--config", "experiments/main_evaluate.yaml"]
THRESHOLDS = ("em_target", "fixed")
REFERENCE = "balanced"  # the main config's loss: no lambda
CALLBACKS = ("[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {monitor: val/loss, mode: min, "
             "filename: best}}]")


def maml_stop(cmd: list[str]) -> None:
    """``maml-stop <cmd[1:]>`` in this process (its stdout swallowed); an error if it fails."""
    from maml_stop.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(cmd[1:])
    if rc not in (0, None):
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit status {rc})")


def fit(run: Path, loss: str, lam: float | None, steps: int, extra: list[str]) -> tuple[Path, list[str]]:
    """Meta-train one variant into ``run``; its best checkpoint and the command."""
    shutil.rmtree(run, ignore_errors=True)
    every = max(steps // 2, 1)
    cmd = ["maml-stop", "fit", *FIT_CONFIGS, f"--model.adapter.loss={loss}", f"--trainer.default_root_dir={run}",
           f"--trainer.max_steps={steps}", f"--data.steps_per_epoch={every}", "--trainer.check_val_every_n_epoch=1",
           f"--trainer.callbacks={CALLBACKS}", "--trainer.enable_progress_bar=false", *extra]
    if lam is not None:
        cmd.append(f"--data.cost_lambda={lam:g}")
    maml_stop(cmd)
    ckpt = run / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"{' '.join(cmd)} wrote no {ckpt}")
    return ckpt, cmd


def evaluate(run: Path, ckpt: Path, k: int, episodes: int) -> tuple[dict, list[str]]:
    cmd = ["maml-stop", "evaluate", *EVAL_CONFIGS, f"--checkpoint={ckpt}", f"--k=[{k}]", f"--episodes={episodes}",
           f"--out={run}/evaluate", "--methods=[full, maml, oracle]", f"--threshold_methods=[{', '.join(THRESHOLDS)}]",
           "--progress=false"]
    maml_stop(cmd)
    return json.loads((run / "evaluate" / "results.json").read_text()), cmd


def figures(results: dict, k: int) -> dict[str, dict[str, float]]:
    """Per threshold method: the MAML probe's mean saved % / EM drop (points) / within-1-point share over the
    held-out families, the half-widths, and the oracle's saved %."""
    from maml_stop.evaluate.report import summarise

    out = {}
    for th in THRESHOLDS:
        s = summarise(results, th)[str(k)]
        m = s["maml"]["mean"]
        out[th] = {"saved": 100 * m["savings"][0], "saved_hw": 100 * m["savings"][1],
                   "em_drop": 100 * m["em_drop"][0], "em_drop_hw": 100 * m["em_drop"][1],
                   "within": 100 * m["within_delta"][0], "curve": 100 * m["curve_savings"][0],
                   "oracle": 100 * s["oracle"]["mean"]["savings"][0]}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(THRESHOLDS) + 1, figsize=(16, 4.4), squeeze=False)
    losses = (("balanced/cost", "o"), ("balanced/expected_cost", "s"))
    for ax, th in zip(axes[0], THRESHOLDS):
        for loss, marker in losses:
            pts = sorted((r for r in rows if r["loss"] == loss), key=lambda r: r["lambda"])
            if not pts:
                continue
            x, y = [r["fig"][th]["em_drop"] for r in pts], [r["fig"][th]["saved"] for r in pts]
            ax.plot(x, y, marker=marker, label=f"query loss {loss.split('/')[1]}")
            for j, (r, xi, yi) in enumerate(zip(pts, x, y)):
                ax.annotate(f"λ={r['lambda']:g}", (xi, yi), textcoords="offset points", fontsize=8,
                            xytext=(4, 4 if marker == "o" else -10 - 8 * (j % 3)))
        for r in rows:
            if r["loss"] == REFERENCE:
                ax.scatter([r["fig"][th]["em_drop"]], [r["fig"][th]["saved"]], marker="*", s=140, color="k",
                           label="balanced (main config, no λ)", zorder=3)
        ax.axvline(1.0, ls=":", color="grey", lw=1)
        ax.set_xlabel("EM drop (points) vs full generation (negative: EM rises)")
        ax.set_ylabel("tokens saved (%)")
        ax.set_title(f"MAML probe, threshold {th}" + (" (1-point target on support)" if th == "em_target" else " (τ=0.5)"),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0][-1]  # saved % against lambda itself
    for (loss, marker), color in zip(losses, ("C0", "C1")):
        pts = sorted((r for r in rows if r["loss"] == loss), key=lambda r: r["lambda"])
        for th, ls in zip(THRESHOLDS, ("-", "--")):
            if pts:
                ax.plot([r["lambda"] for r in pts], [r["fig"][th]["saved"] for r in pts], marker=marker, ls=ls,
                        color=color, label=f"{loss.split('/')[1]}, {th}")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("λ (data.cost_lambda)")
    ax.set_ylabel("tokens saved (%)")
    ax.set_title("saved % against λ", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 0.5, 2.0, 8.0])
    p.add_argument("--losses", nargs="+", default=["balanced/cost", "balanced/expected_cost"])
    p.add_argument("--steps", type=int, default=100, help="meta-steps per fit")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--runs", default="runs/cost_lambda")
    p.add_argument("--report", default="experiments/results/cost_lambda")
    p.add_argument("--no_reference", action="store_true", help="skip the lambda-free balanced fit")
    p.add_argument("--fit_arg", dest="fit_args", action="append", default=[], help="extra `maml-stop fit` argument (repeat)")
    p.add_argument("--report_only", action="store_true", help="rebuild report.md and the plot from <report>/rows.json")
    args = p.parse_args()
    report = Path(args.report)
    if args.report_only:
        run = json.loads((report / "rows.json").read_text())
        write_report(run["rows"], run["command"], run["minutes"], report)
        return 0
    import torch

    torch.set_num_threads(1)
    runs = Path(args.runs)
    report.mkdir(parents=True, exist_ok=True)
    variants = [] if args.no_reference else [(REFERENCE, None)]
    variants += [(loss, lam) for loss in args.losses for lam in args.lambdas]
    rows, started = [], time.time()
    for i, (loss, lam) in enumerate(variants):
        run = runs / f"v{i}"
        t0 = time.time()
        ckpt, fit_cmd = fit(run, loss, lam, args.steps, args.fit_args)
        results, eval_cmd = evaluate(run, ckpt, args.k, args.episodes)
        from maml_stop.learn.module import load_predictor

        step = load_predictor(ckpt)[2]["global_step"]
        rows.append({"loss": loss, "lambda": lam, "fig": figures(results, args.k), "step": step,
                     "fit": fit_cmd, "evaluate": eval_cmd, "families": results["families"]})
        print(f"done {loss} lambda={lam} ({time.time() - t0:.0f} s): "
              + ", ".join(f"{th} saved {f['saved']:.1f}% drop {f['em_drop']:.1f}" for th, f in rows[-1]["fig"].items()),
              flush=True)
    command = (f"python experiments/studies/cost_lambda_sweep.py --lambdas {' '.join(f'{x:g}' for x in args.lambdas)} "
               f"--losses {' '.join(args.losses)} --steps {args.steps} --k {args.k} --episodes {args.episodes}")
    minutes = round((time.time() - started) / 60, 1)
    (report / "rows.json").write_text(json.dumps({"command": command, "minutes": minutes, "k": args.k,
                                                  "episodes": args.episodes, "steps": args.steps, "rows": rows}, indent=1))
    write_report(rows, command, minutes, report)
    return 0


def write_report(rows: list[dict], command: str, minutes: float, report: Path) -> None:
    """``report.md`` and ``tradeoff.png`` from the sweep's rows."""
    plot(rows, report / "tradeoff.png")

    def shell(cmd: list[str]) -> str:
        return " ".join(f"'{c}'" if " " in c else c for c in cmd)

    def arg(cmd: list[str], *names: str) -> str:  # the first of ``names`` given (older runs: --shots for --k)
        return next(c.split("=", 1)[1] for name in names for c in cmd if c.startswith(f"--{name}="))

    first = rows[0]
    lines = [
        "# Cost-sensitive meta-training: the trade-off curve over lambda",
        "",
        f"Held-out families {', '.join(first['families'])} (experiments/main.yaml's test families), "
        f"K = {arg(first['evaluate'], 'k', 'shots').strip('[]')}, {arg(first['evaluate'], 'episodes')} fixed episodes per "
        f"family (the same for every row), mean over the families (± combined 95% half-width over episodes). Every fit: "
        f"{arg(first['fit'], 'trainer.max_steps')} meta-steps of experiments/main.yaml's settings, best.ckpt by "
        "val/loss (its own query loss). Inner loss always `balanced` (so evaluation adapts exactly as "
        "meta-training did); the query loss and lambda (`data.cost_lambda`) vary. `em_target`: the threshold "
        "chosen on the cross-fitted support scores for a 1-point EM drop (the headline protocol); `fixed`: "
        "tau = 0.5, the predictor's own probability scale. EM drop is against full generation (negative: "
        "EM rises; on these families early forced answers beat the full run).",
        "",
        f"Produced by `{command}` ({minutes} min, one process). Plot: `tradeoff.png`; rebuild this file from "
        "`rows.json` with `--report_only`.",
        "",
        "| query loss | λ | step | em_target: saved % | EM drop (pts) | within 1 pt | fixed τ=0.5: saved % | "
        "EM drop (pts) | saved % best τ in hindsight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, f = r["fig"]["em_target"], r["fig"]["fixed"]
        lam = "—" if r["lambda"] is None else f"{r['lambda']:g}"
        lines.append(f"| {r['loss']} | {lam} | {r['step']} | {e['saved']:.1f} ± {e['saved_hw']:.1f} | "
                     f"{e['em_drop']:.1f} ± {e['em_drop_hw']:.1f} | {e['within']:.0f}% | {f['saved']:.1f} ± {f['saved_hw']:.1f} | "
                     f"{f['em_drop']:.1f} ± {f['em_drop_hw']:.1f} | {e['curve']:.1f} |")
    lines += ["", f"Oracle (stop at the first correct probe): {first['fig']['em_target']['oracle']:.1f}% saved.", "",
              "## What each row ran", ""]
    for r in rows:
        lam = "" if r["lambda"] is None else f", λ = {r['lambda']:g}"
        lines += [f"- **{r['loss']}{lam}** (best.ckpt, step {r['step']}):", f"  `{shell(r['fit'])}`, then",
                  f"  `{shell(r['evaluate'])}`"]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
