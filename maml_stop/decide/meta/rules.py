"""Meta-learned threshold selectors (issue 25 items 2a-2c).

Each selector predicts, for every candidate of a support set, the net paired EM drop the candidate will
have on the family's queries, and takes the candidate with the largest support savings whose predicted
drop plus ``margin`` is within ``delta`` (:func:`decide`; none: full generation, always a candidate).
What they learn across the meta-training families' simulated episodes (:mod:`.simulate`):

* :class:`EmpiricalBayesSelector` (2a): the drop is ``p * r_j - (1 - p) * q_j`` with ``p`` the
  family's full-generation EM, ``r_j`` its loss rate among questions full generation gets right, ``q_j``
  its gain rate among those it gets wrong. Each rate has a Beta prior whose mean is a logistic function
  of the support statistics (:meth:`SupportStats.design`: the precision of the candidate's support
  stops, the support EM, the stop rate, the candidate's rank), fitted to the training families' true
  rates, and whose concentration maximises the beta-binomial likelihood of their support counts; the
  support's own counts update it. ``meta=False`` is its twin without meta-training: uniform priors.
* :class:`LearnedMapSelector` (2b): a ridge regression from support statistics (and their pairwise
  products) to the query drop of each (episode, candidate).
* :class:`SupportDrop`: the support drop itself (``em_target``'s estimate), the twin with nothing learned;
  :class:`SupportLTT`: Learn-then-Test on the support alone.

The margin (2c) is set by :func:`meta_calibrate`.

>>> sel = EmpiricalBayesSelector(delta=0.01).fit(sweeps_of_training_families)     # doctest: +SKIP
>>> sel.margin = meta_calibrate(EmpiricalBayesSelector, by_family, delta=0.01, alpha=0.1).margin  # doctest: +SKIP
>>> sel.select(policy.candidates, policy.support_sweep, default=None)              # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from scipy.special import betaln, expit

from maml_stop.decide.meta.features import SupportStats
from maml_stop.decide.meta.outcomes import EpisodeSweeps
from maml_stop.evaluate.thresholds import ThresholdSelector

log = logging.getLogger(__name__)

__all__ = ["decide", "MetaSelector", "SupportDrop", "SupportLTT", "EmpiricalBayesSelector", "LearnedMapSelector", "META_SELECTORS"]

_TOL = 1e-9
KAPPAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)  # prior concentrations tried


def decide(pred_drop: np.ndarray, savings: np.ndarray, delta: float, margin: float) -> np.ndarray:
    """(E,) choice per episode: 0 full generation, j + 1 candidate j (largest support savings among those
    with ``pred_drop + margin <= delta`` and positive savings; the most conservative among ties)."""
    ok = (pred_drop + margin <= delta + _TOL) & (savings > 0)
    best = np.where(ok, savings, -np.inf).argmax(1)
    return np.where(ok.any(1), best + 1, 0)


class MetaSelector(ThresholdSelector):
    """A selector that predicts each candidate's query drop; ``fit`` learns across families' episodes."""

    name = "meta"

    def __init__(self, delta: float = 0.01, margin: float = 0.0) -> None:
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"delta is an EM drop as a fraction in [0, 1) (0.01 = 1 point); got {delta}")
        self.delta = float(delta)
        self.margin = float(margin)

    def fit(self, families: Sequence[EpisodeSweeps]) -> "MetaSelector":
        return self

    def predicted_drop(self, stats: SupportStats) -> np.ndarray:
        raise NotImplementedError

    def decide(self, stats: SupportStats, margin: float | None = None) -> np.ndarray:
        """(E,) 0 = full generation, j + 1 = candidate j, at ``margin`` (default: the selector's)."""
        return decide(self.predicted_drop(stats), stats.savings, self.delta, self.margin if margin is None else margin)

    def select(self, candidates: Sequence[float], sweep, default: float | None) -> float | None:
        if sweep.em.shape[1] != len(candidates):
            raise ValueError(f"the sweep has {sweep.em.shape[1]} columns but there are {len(candidates)} candidates")
        choice = int(self.decide(SupportStats.from_sweep(sweep, getattr(sweep, "stopped", None)))[0])
        return None if choice == 0 else float(candidates[choice - 1])

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "delta": self.delta, "margin": self.margin}

    def load_state_dict(self, state: dict[str, Any]) -> "MetaSelector":
        if state.get("name") != self.name:
            raise ValueError(f"state of selector {state.get('name')!r} loaded into {self.name!r}")
        self.delta, self.margin = float(state["delta"]), float(state["margin"])
        return self


class SupportDrop(MetaSelector):
    """The support drop as the prediction: ``em_target`` with a margin; nothing learned."""

    name = "support_drop"

    def predicted_drop(self, stats: SupportStats) -> np.ndarray:
        return stats.drop


class SupportLTT(MetaSelector):
    """Learn-then-Test on the support alone, vectorised over episodes (the risk-controlled selector
    without meta-training; :class:`~maml_stop.evaluate.thresholds.LTTThreshold` per episode): binomial
    tail p-values of the support loss counts, fixed-sequence testing from conservative to aggressive,
    the largest support savings among the certified candidates."""

    name = "ltt"

    def __init__(self, delta: float = 0.01, margin: float = 0.0, alpha: float = 0.1) -> None:
        super().__init__(delta, margin)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha is a probability in (0, 1); got {alpha}")
        self.alpha = float(alpha)

    def decide(self, stats: SupportStats, margin: float | None = None) -> np.ndarray:
        from scipy import stats as scipy_stats

        n = np.broadcast_to(stats.n[:, None], stats.loss.shape)
        p = scipy_stats.binom.cdf(np.rint(stats.loss), n, self.delta)  # (E, J)
        certified = np.cumprod(p <= self.alpha, axis=1).astype(bool)  # fixed sequence
        return decide(np.where(certified, -np.inf, np.inf), stats.savings, self.delta, 0.0)


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float, iters: int = 30) -> np.ndarray:
    """Weights of a ridge-penalised logistic regression of fractional targets ``y`` (Newton steps)."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = expit(x @ w)
        grad = x.T @ (p - y) / len(y) + ridge * w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + ridge * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def _fit_kappa(mean: np.ndarray, trials: np.ndarray, hits: np.ndarray) -> float:
    """The concentration of Beta(kappa * mean, kappa * (1 - mean)) that maximises the beta-binomial
    likelihood of ``hits`` out of ``trials`` (over :data:`KAPPAS`)."""
    mean = np.clip(mean, 1e-4, 1 - 1e-4)
    ll = [(betaln(k * mean + hits, k * (1 - mean) + trials - hits) - betaln(k * mean, k * (1 - mean))).sum()
          for k in KAPPAS]
    return float(KAPPAS[int(np.argmax(ll))])


def _true_rates(sw: EpisodeSweeps) -> tuple[np.ndarray, np.ndarray, float]:
    """(J,) loss rate among full-right questions, (J,) gain rate among full-wrong ones, full EM: of the
    whole family (smoothed by one half)."""
    o = sw.out
    right = o.full_em.sum()
    wrong = len(o.full_em) - right
    r = ((o.full_em[:, None] * (1 - o.em)).sum(0) + 0.5) / (right + 1)
    q = (((1 - o.full_em[:, None]) * o.em).sum(0) + 0.5) / (wrong + 1)
    return r, q, float(o.full_em.mean())


class EmpiricalBayesSelector(MetaSelector):
    """Support-conditioned empirical Bayes on the loss and gain rates (module docstring)."""

    name = "meta_eb"

    def __init__(self, delta: float = 0.01, margin: float = 0.0, ridge: float = 0.01, meta: bool = True) -> None:
        super().__init__(delta, margin)
        self.ridge = float(ridge)
        self.meta = bool(meta)
        n = 7  # SupportStats.design width
        # uniform priors until fitted (the twin without meta-training keeps them): mean 1/2, kappa 2
        self.w_loss, self.w_gain = np.zeros(n), np.zeros(n)
        self.kappa_loss = self.kappa_gain = 2.0
        self.full_prior = (1.0, 1.0)

    def fit(self, families: Sequence[EpisodeSweeps]) -> "EmpiricalBayesSelector":
        if not self.meta:
            return self
        if not families:
            raise ValueError(f"{self.name}: no training families to fit the prior on")
        xs, r_t, q_t, right, wrong, loss, gain, full = [], [], [], [], [], [], [], []
        for sw in families:
            s = SupportStats.from_sums(sw.support_sums())
            r, q, f = _true_rates(sw)
            e = s.loss.shape[0]
            xs.append(s.design())
            r_t.append(np.broadcast_to(r, (e, len(r))))
            q_t.append(np.broadcast_to(q, (e, len(q))))
            right.append(np.broadcast_to(s.full_em[:, None], s.loss.shape))
            wrong.append(np.broadcast_to((s.n - s.full_em)[:, None], s.loss.shape))
            loss.append(s.loss)
            gain.append(s.gain)
            full.append(f)
        x = np.concatenate(xs)
        self.w_loss = _fit_logistic(x, np.concatenate(r_t), self.ridge)
        self.w_gain = _fit_logistic(x, np.concatenate(q_t), self.ridge)
        self.kappa_loss = _fit_kappa(expit(x @ self.w_loss), np.concatenate(right), np.concatenate(loss))
        self.kappa_gain = _fit_kappa(expit(x @ self.w_gain), np.concatenate(wrong), np.concatenate(gain))
        m, v = float(np.mean(full)), float(np.var(full)) + 1e-6  # Beta prior on full EM by moments
        k = max(m * (1 - m) / v - 1.0, 0.5)
        self.full_prior = (k * m, k * (1 - m))
        return self

    def predicted_drop(self, stats: SupportStats) -> np.ndarray:
        """(E, J) posterior mean of ``p * r_j - (1 - p) * q_j`` (posteriors of p, r, q independent)."""
        x = stats.design()
        right = stats.full_em[:, None]
        wrong = stats.n[:, None] - right
        r = (self.kappa_loss * expit(x @ self.w_loss) + stats.loss) / (self.kappa_loss + right)
        q = (self.kappa_gain * expit(x @ self.w_gain) + stats.gain) / (self.kappa_gain + wrong)
        a, b = self.full_prior
        p = (a + right) / (a + b + stats.n[:, None])
        return p * r - (1 - p) * q

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ridge": self.ridge, "meta": self.meta, "w_loss": self.w_loss.tolist(),
                "w_gain": self.w_gain.tolist(), "kappa_loss": self.kappa_loss, "kappa_gain": self.kappa_gain,
                "full_prior": list(self.full_prior)}

    def load_state_dict(self, state: dict[str, Any]) -> "EmpiricalBayesSelector":
        super().load_state_dict(state)
        self.ridge, self.meta = float(state["ridge"]), bool(state["meta"])
        self.w_loss, self.w_gain = np.asarray(state["w_loss"]), np.asarray(state["w_gain"])
        self.kappa_loss, self.kappa_gain = float(state["kappa_loss"]), float(state["kappa_gain"])
        self.full_prior = tuple(float(v) for v in state["full_prior"])
        return self


def _map_design(stats: SupportStats) -> np.ndarray:
    """(E, J, D) support statistics and their pairwise products (the learned map's inputs)."""
    base = stats.design()[..., 1:]  # without the constant
    n = stats.n[:, None]
    cols = [base[..., i] for i in range(base.shape[-1])] + [stats.drop, stats.loss / n, stats.gain / n, stats.savings]
    x = np.stack(cols, -1)
    d = x.shape[-1]
    pairs = [x[..., a] * x[..., b] for a in range(d) for b in range(a, d)]
    return np.concatenate([np.ones(x.shape[:-1] + (1,)), x, np.stack(pairs, -1)], -1)


class LearnedMapSelector(MetaSelector):
    """Ridge regression from support statistics to each candidate's query drop (module docstring)."""

    name = "meta_map"

    def __init__(self, delta: float = 0.01, margin: float = 0.0, ridge: float = 0.01) -> None:
        super().__init__(delta, margin)
        self.ridge = float(ridge)
        self.weights: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def fit(self, families: Sequence[EpisodeSweeps]) -> "LearnedMapSelector":
        if not families:
            raise ValueError(f"{self.name}: no training families to fit the map on")
        xs, ys = [], []
        for sw in families:
            xs.append(_map_design(SupportStats.from_sums(sw.support_sums())).reshape(-1, _width()))
            ys.append(sw.query_figures()[0][:, 1:].reshape(-1))
        x, y = np.concatenate(xs), np.concatenate(ys)
        self.mean, self.scale = x.mean(0), x.std(0) + 1e-9
        self.mean[0], self.scale[0] = 0.0, 1.0
        z = (x - self.mean) / self.scale
        self.weights = np.linalg.solve(z.T @ z + self.ridge * len(z) * np.eye(z.shape[1]), z.T @ y)
        return self

    def predicted_drop(self, stats: SupportStats) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError(f"{self.name}: fit it on the training families' episodes first")
        return ((_map_design(stats) - self.mean) / self.scale) @ self.weights

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ridge": self.ridge,
                **{k: None if v is None else v.tolist() for k, v in
                   (("weights", self.weights), ("mean", self.mean), ("scale", self.scale))}}

    def load_state_dict(self, state: dict[str, Any]) -> "LearnedMapSelector":
        super().load_state_dict(state)
        self.ridge = float(state["ridge"])
        self.weights, self.mean, self.scale = (None if state[k] is None else np.asarray(state[k])
                                               for k in ("weights", "mean", "scale"))
        return self


def _width() -> int:
    d = 6 + 4  # design without the constant, plus drop, loss, gain, savings
    return 1 + d + d * (d + 1) // 2


META_SELECTORS: dict[str, type[MetaSelector]] = {
    "support_drop": SupportDrop,
    "ltt": SupportLTT,
    "meta_eb": EmpiricalBayesSelector,
    "meta_map": LearnedMapSelector,
}
