"""Does a wider or better-placed hidden state tell when a forced answer is right? (issue 30's pilot)

The study reads the states that :mod:`maml_stop.harvest.replay` stored for some families of a corpus and,
per representation (``last``, ``mean``, ``trigger``, ``answer``), layer and width, trains a probe on all
families but one and scores the held-out one (leave-one-family-out):

* **ROC-AUC and ECE** of two targets at every probe point: ``correct`` (this forced answer is right: the
  label a stopping probe learns) and ``give_up`` (the full run will end right: the give-up signal);
* **the best threshold in hindsight**: the largest savings of "stop at the first probe whose P(correct) >=
  tau" whose mean EM drop on the held-out family is <= ``delta``, over every tau (a bound on what any
  selector could get from these scores, never a K-shot figure), with the one token accounting
  (:mod:`maml_stop.data.accounting`): a probe on a free representation pays only the forced answer it stops
  on, one on a paid representation pays every forced answer up to its stop.

Probes: a class-balanced L2 logistic regression (L-BFGS, float64) and a two-layer MLP, both on features
standardised with the training families' mean and sd. Widths: the full state, a seeded Gaussian random
projection (what corpora v1/v2 store at 32), or PCA fitted on the training families only. Nothing is tuned
on the held-out family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from maml_stop.data import accounting
from maml_stop.data.corpus import Trace
from maml_stop.decide.rule import NEVER, first_hits
from maml_stop.evaluate.metrics.calibration import expected_calibration_error
from maml_stop.evaluate.metrics.curve import savings_at_em_drop

TARGETS = ("correct", "give_up")
PROBES = ("logistic", "mlp")
PROJECTIONS = ("full", "random", "pca")


@dataclass
class ProbeFit:
    """How a probe is trained (tuned values live in the study's YAML)."""

    kind: str = "logistic"  # logistic | mlp
    l2: float = 1.0  # logistic: L2 penalty on the weights, times the number of training rows
    hidden: int = 64  # mlp: hidden width
    epochs: int = 30  # mlp: passes over the training rows
    lr: float = 1e-3  # mlp: AdamW learning rate
    weight_decay: float = 1e-2  # mlp: AdamW weight decay
    batch_size: int = 256  # mlp
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PROBES:
            raise ValueError(f"unknown probe kind {self.kind!r}; valid: {', '.join(PROBES)}")


@dataclass
class View:
    """One representation of a probe point: ``rep`` at ``layers`` (concatenated), reduced by ``projection``
    to ``width`` dimensions (``width`` 0 or ``projection`` full: the whole state); ``stored`` reads the
    corpus's own stored feature vector instead (today's probe input)."""

    rep: str = "answer"
    layers: list[int] = field(default_factory=lambda: [24])
    projection: str = "full"
    width: int = 0
    with_scalars: bool = False  # append the corpus's stored scalar features (confidence, stability, ...)
    stored: bool = False
    probes: list[str] = field(default_factory=list)  # which of the study's probes train on this view (empty: all)

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.projection!r}; valid: {', '.join(PROJECTIONS)}")

    @property
    def name(self) -> str:
        if self.stored:
            return "stored features"
        width = "full" if self.projection == "full" else f"{self.projection}{self.width}"
        return f"{self.rep} L{'+'.join(map(str, self.layers))} {width}" + (" +scalars" if self.with_scalars else "")

    def paid(self, feature_costs: dict[str, str], feature_names: Sequence[str]) -> bool:
        """Whether a policy reading this view must force an answer at every probe point."""
        if self.stored:
            return any(feature_costs.get(n) == "paid" for n in feature_names)
        scalars_paid = self.with_scalars and any(feature_costs.get(n) == "paid" for n in feature_names)
        return self.rep not in ("last", "mean") or scalars_paid


def load_family_states(states_dir: str | Path, family: str, reps: Sequence[str]) -> tuple[list[str], np.ndarray, dict]:
    """(trace id of each row, probe index of each row, {rep: (rows, n_layers, hidden) float16}) of a family."""
    files = sorted((Path(states_dir) / family).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no replayed states of {family!r} under {states_dir}; run maml_stop.harvest.replay")
    ids, probe, arrays = [], [], {r: [] for r in reps}
    for f in files:
        z = np.load(f)
        ids += z["trace_id"].tolist()
        probe.append(z["probe"])
        for r in reps:
            arrays[r].append(z[r])
    return ids, np.concatenate(probe), {r: np.concatenate(a) for r, a in arrays.items()}


@dataclass
class FamilyRows:
    """The probe points of one family that have replayed states: features per view are built from these."""

    traces: list[Trace]  # the family's traces with states, in row order of their first probe
    row_trace: np.ndarray  # (rows,) index into ``traces``
    row_probe: np.ndarray  # (rows,) probe index within its trace
    states: dict[str, np.ndarray]  # rep -> (rows, n_layers, hidden)
    layers: list[int]

    def labels(self, target: str) -> np.ndarray:
        if target == "correct":
            return np.array([self.traces[t].labels[p] for t, p in zip(self.row_trace, self.row_probe)], dtype=np.float64)
        if target == "give_up":
            return np.array([float(self.traces[t].final_em) for t in self.row_trace])
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")

    def raw(self, view: View, scalar_cols: Sequence[int]) -> np.ndarray:
        """(rows, d) float64 before any projection."""
        if view.stored:
            return np.stack([self.traces[t].features[p] for t, p in zip(self.row_trace, self.row_probe)]).astype(np.float64)
        unknown = [l for l in view.layers if l not in self.layers]
        if unknown:
            raise ValueError(f"layers {unknown} were not replayed; replayed: {self.layers}")
        idx = [self.layers.index(l) for l in view.layers]
        x = self.states[view.rep][:, idx].reshape(len(self.row_trace), -1).astype(np.float64)
        if view.with_scalars:
            s = np.stack([self.traces[t].features[p][list(scalar_cols)] for t, p in zip(self.row_trace, self.row_probe)])
            x = np.concatenate([x, s.astype(np.float64)], axis=1)
        return x


def family_rows(states_dir: str | Path, family: str, traces: Sequence[Trace], reps: Sequence[str],
                layers: Sequence[int]) -> FamilyRows:
    """Join a family's replayed states with its traces (labels, costs) by trace id and probe index."""
    ids, probe, states = load_family_states(states_dir, family, reps)
    by_id = {t.trace_id: t for t in traces}
    order: dict[str, int] = {}
    keep = [i for i, tid in enumerate(ids) if tid in by_id and probe[i] < by_id[tid].n_probes]
    kept: list[Trace] = []
    row_trace = []
    for i in keep:
        tid = ids[i]
        if tid not in order:
            order[tid] = len(kept)
            kept.append(by_id[tid])
        row_trace.append(order[tid])
    sel = np.array(keep, dtype=np.int64)
    return FamilyRows(kept, np.array(row_trace, dtype=np.int64), probe[sel], {r: s[sel] for r, s in states.items()},
                      list(layers))


def reducer(view: View, train: np.ndarray, seed: int = 0):
    """A function (rows, d) -> (rows, width) fitted on the training rows only."""
    if view.stored or view.projection == "full" or view.width <= 0:
        return lambda x: x
    d = train.shape[1]
    if view.projection == "random":
        g = np.random.default_rng(seed)
        w = g.normal(0.0, 1.0 / np.sqrt(view.width), size=(d, view.width))
        return lambda x: x @ w
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    comps = vt[: view.width].T
    return lambda x: (x - mean) @ comps


def fit_probe(x: np.ndarray, y: np.ndarray, fit: ProbeFit):
    """Train a class-balanced probe on standardised ``x``; returns a scoring function (rows, d) -> P(y=1)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    X = torch.as_tensor((x - mu) / sd, dtype=torch.float64)
    Y = torch.as_tensor(y, dtype=torch.float64)
    pos = float(Y.mean()) if len(Y) else 0.5
    w_pos, w_neg = (0.5 / pos if pos > 0 else 0.0), (0.5 / (1 - pos) if pos < 1 else 0.0)
    weights = torch.where(Y > 0.5, w_pos, w_neg)
    torch.manual_seed(fit.seed)
    if fit.kind == "logistic":
        lin = torch.nn.Linear(X.shape[1], 1, dtype=torch.float64)
        torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")
        n = len(Y)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(X).squeeze(-1), Y, weight=weights)
            loss = loss + fit.l2 / n * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        net = lin
    else:
        net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], fit.hidden), torch.nn.ReLU(), torch.nn.Linear(fit.hidden, 1)).double()
        opt = torch.optim.AdamW(net.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
        g = torch.Generator().manual_seed(fit.seed)
        for _ in range(fit.epochs):
            for idx in torch.randperm(len(Y), generator=g).split(fit.batch_size):
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(X[idx]).squeeze(-1), Y[idx], weight=weights[idx])
                loss.backward()
                opt.step()
    net.eval()

    def score(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(net(torch.as_tensor((z - mu) / sd, dtype=torch.float64)).squeeze(-1)).numpy()

    return score


def discrimination(scores: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """ROC-AUC (NaN with one class only) and ECE of ``scores`` against 0/1 ``labels``."""
    s, y = torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels).long()
    auc = float(binary_auroc(s, y)) if 0 < int(y.sum()) < len(y) else float("nan")
    return {"roc_auc": auc, "ece": float(expected_calibration_error(s, y.float(), n_bins=n_bins))}


def first_hit_curve(traces: Sequence[Trace], scores: Sequence[np.ndarray], taus: np.ndarray,
                    paid: bool, count_probes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """EM and tokens (traces, taus) of "stop at the first probe with score >= tau, else run to the end",
    priced by :mod:`maml_stop.data.accounting`: a paid policy ran every forced answer up to its stop (all of
    them when it never fires), a free one only the answer it stops on (none when it never fires).
    ``count_probes=False`` counts reasoning tokens only (how DEER and Dynasor-CoT count: labelled so)."""
    em = np.zeros((len(traces), len(taus)))
    tokens = np.zeros((len(traces), len(taus)))
    for i, (t, s) in enumerate(zip(traces, scores)):
        if not count_probes:
            at_probe = np.asarray(t.positions, dtype=np.int64)
            at_end = int(t.reasoning_tokens)
        elif paid:
            at_probe = accounting.stop_costs(t)[0]
            at_end = accounting.stop_cost(t, None)[0]
        else:
            at_probe = np.asarray(t.positions, dtype=np.int64) + np.asarray(t.probe_tokens, dtype=np.int64)
            at_end = accounting.stop_cost(t, None, ran=[])[0]
        first = first_hits(np.asarray(s), taus)  # (taus,): the one first-hit rule, NEVER where none reaches tau
        fired = first != NEVER
        at = np.where(fired, first, 0)
        tokens[i] = np.where(fired, at_probe[at], at_end)
        em[i] = np.where(fired, np.asarray(t.labels)[at] > 0.5, float(t.final_em))
    return em, tokens


def hindsight_savings(traces: Sequence[Trace], scores: Sequence[np.ndarray], paid: bool, delta: float = 0.01,
                      count_probes: bool = True) -> float:
    """Largest savings of any single threshold with mean EM drop <= ``delta`` on these traces (full
    generation, savings 0, always qualifies); ``count_probes=False``: reasoning tokens only, against the
    full run's reasoning tokens."""
    flat = np.concatenate([np.asarray(s) for s in scores]) if scores else np.zeros(0)
    taus = np.unique(np.concatenate([np.quantile(flat, np.linspace(0, 1, 201)), [np.inf]])) if flat.size else np.array([np.inf])
    em, tokens = first_hit_curve(traces, scores, taus, paid, count_probes)
    full_em = torch.tensor([float(t.final_em) for t in traces], dtype=torch.float64)
    full = torch.tensor([float(t.full_cost if count_probes else t.reasoning_tokens) for t in traces], dtype=torch.float64)
    return float(savings_at_em_drop(torch.as_tensor(em), torch.as_tensor(tokens), full_em, full, delta=delta))
