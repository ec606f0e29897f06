"""Meta-learned threshold selectors (issue 25 items 2a-2c), behind :class:`~maml_stop.decide.selector.StopSelector`.

Each selector predicts, for every candidate of a support set, the net paired EM drop the candidate will
have on the family's queries, and takes the candidate with the largest support savings whose predicted
drop plus ``margin`` is within ``delta`` (:func:`decide`; none: full generation, always a candidate).
What they learn across the meta-training families' simulated episodes (:class:`~.features.FamilyEpisodes`):

* :class:`EmpiricalBayesSelector` (``meta_eb``, 2a): the drop is ``p * r_j - (1 - p) * q_j`` with ``p``
  the family's full-generation EM, ``r_j`` its loss rate among questions full generation gets right,
  ``q_j`` its gain rate among those it gets wrong. Each rate has a Beta prior whose mean is a logistic
  function of the support statistics (:meth:`~.features.SupportStats.design`: the precision of the
  candidate's support stops, the support EM, the stop rate, the candidate's rank), fitted to the
  training families' rates, and whose concentration maximises the beta-binomial likelihood of their
  support counts; the support's own counts update it. ``meta=False`` is its twin without meta-training.
* :class:`LearnedMapSelector` (``meta_map``, 2b): a ridge regression from support statistics (and their
  pairwise products) to the query drop of each (episode, candidate).
* :class:`SupportDrop` (``em_target_margin``): the support drop itself, ``em_target``'s estimate.

With ``family_alpha`` set, :meth:`MetaSelector.fit` also meta-calibrates the margin (2c,
:mod:`.calibration`): the selector then keeps the held-out family's mean drop within ``delta`` with
probability >= 1 - family_alpha over exchangeable families. :class:`SupportLTT` is Learn-then-Test on
the support alone, batched over episodes (the study's risk-controlled selector without meta-training).

>>> sel = EmpiricalBayesSelector(delta=0.01, family_alpha=0.1).fit(policy.candidates, episodes)  # doctest: +SKIP
>>> sel.select(policy.candidates, policy.support_sweep, default=None)                            # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats
from scipy.special import betaln, expit

from maml_stop.decide.meta.calibration import meta_calibrate
from maml_stop.decide.meta.features import FamilyEpisodes, SupportStats, by_family
from maml_stop.decide.selector import SelectorEpisode, StopSelector, check_inputs

log = logging.getLogger(__name__)

__all__ = ["decide", "MetaSelector", "SupportDrop", "SupportLTT", "EmpiricalBayesSelector", "LearnedMapSelector",
           "META_SELECTORS"]

_TOL = 1e-9
KAPPAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)  # prior concentrations tried


def decide(pred_drop: np.ndarray, savings: np.ndarray, delta: float, margin: float) -> np.ndarray:
    """(E,) choice per episode: 0 full generation, j + 1 candidate j (largest support savings among those
    with ``pred_drop + margin <= delta`` and positive savings; the most conservative among ties)."""
    ok = (pred_drop + margin <= delta + _TOL) & (savings > 0)
    best = np.where(ok, savings, -np.inf).argmax(1)
    return np.where(ok.any(1), best + 1, 0)


class MetaSelector(StopSelector):
    """A selector that predicts each candidate's query drop from support statistics; ``fit`` learns
    across families' episodes and, with ``family_alpha``, meta-calibrates the margin."""

    name = "meta"
    params: tuple[str, ...] = ("delta", "margin", "family_alpha")
    fitted: tuple[str, ...] = ("calibration",)  # the fitted attributes state_dict records (the margin's, too)

    def __init__(self, delta: float = 0.01, margin: float = 0.0, family_alpha: float | None = None) -> None:
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"delta is an EM drop as a fraction in [0, 1) (0.01 = 1 point); got {delta}")
        if family_alpha is not None and not 0.0 < family_alpha < 1.0:
            raise ValueError(f"family_alpha is a miss rate over families in (0, 1), or None; got {family_alpha}")
        self.delta = float(delta)
        self.margin = float(margin)
        self.family_alpha = family_alpha
        self.calibration: dict[str, Any] | None = None

    # -- learning across families
    def learn(self, families: Sequence[FamilyEpisodes]) -> "MetaSelector":
        """Fit what the rule learns (prior, map) on the training families; no margin."""
        return self

    def fit_families(self, families: Mapping[str, FamilyEpisodes]) -> "MetaSelector":
        """:meth:`learn` on every family, then, with ``family_alpha``, the conformal margin over them."""
        self.learn(list(families.values()))
        if self.family_alpha is not None:

            calib = meta_calibrate(lambda: type(self)(**self._settings()), families, self.family_alpha)
            self.margin = calib.margin
            self.calibration = calib.to_json()
        return self

    def fit(self, candidates: Sequence[float], episodes: Sequence[SelectorEpisode]) -> "MetaSelector":
        return self.fit_families(by_family(episodes))

    def _settings(self) -> dict[str, Any]:
        """The constructor settings without the margin calibration (the leave-one-family-out fits)."""
        return {**{p: getattr(self, p) for p in self.params}, "family_alpha": None}

    # -- the decision
    def predicted_drop(self, stats: SupportStats) -> np.ndarray:
        raise NotImplementedError

    def decide(self, stats: SupportStats, margin: float | None = None) -> np.ndarray:
        """(E,) 0 = full generation, j + 1 = candidate j, at ``margin`` (default: the selector's)."""
        return decide(self.predicted_drop(stats), stats.savings, self.delta, self.margin if margin is None else margin)

    def select(self, candidates: Sequence[float], sweep, default: float | None) -> float | None:
        check_inputs(candidates, sweep)
        choice = int(self.decide(SupportStats.from_sweep(sweep, getattr(sweep, "stopped", None)))[0])
        return None if choice == 0 else float(candidates[choice - 1])

    # -- what an artifact records
    def state_dict(self) -> dict[str, Any]:
        fitted = {f: (v.tolist() if isinstance(v, np.ndarray) else v) for f in self.fitted
                  for v in [getattr(self, f)]}
        return {**super().state_dict(), **fitted}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "MetaSelector":
        state = dict(state)
        fitted = {f: state.pop(f) for f in cls.fitted if f in state}
        selector = super().from_state(state)
        for f, v in fitted.items():
            setattr(selector, f, np.asarray(v, dtype=np.float64) if isinstance(v, list) else v)
        return selector  # type: ignore[return-value]


class SupportDrop(MetaSelector):
    """The support drop as the prediction: ``em_target`` plus a margin (meta-calibrated with ``family_alpha``)."""

    name = "em_target_margin"

    def __init__(self, delta: float = 0.01, margin: float = 0.0, family_alpha: float | None = 0.1) -> None:
        super().__init__(delta, margin, family_alpha)

    def predicted_drop(self, stats: SupportStats) -> np.ndarray:
        return stats.drop


class SupportLTT(MetaSelector):
    """Learn-then-Test on the support alone, batched over episodes (per episode the same choice as
    :class:`~maml_stop.decide.thresholds.LTTThreshold`): binomial-tail p-values of the support loss
    counts, fixed-sequence testing from conservative to aggressive, the largest support savings among
    the certified candidates. Learns nothing across families."""

    name = "ltt_batched"
    params = ("delta", "alpha")
    fitted = ()

    def __init__(self, delta: float = 0.01, alpha: float = 0.1) -> None:
        super().__init__(delta)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha is a probability in (0, 1); got {alpha}")
        self.alpha = float(alpha)

    def fit_families(self, families: Mapping[str, FamilyEpisodes]) -> "SupportLTT":
        return self

    def decide(self, stats: SupportStats, margin: float | None = None) -> np.ndarray:

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


class EmpiricalBayesSelector(MetaSelector):
    """Support-conditioned empirical Bayes on the loss and gain rates (module docstring)."""

    name = "meta_eb"
    params = ("delta", "margin", "family_alpha", "ridge", "meta")
    fitted = ("w_loss", "w_gain", "kappa_loss", "kappa_gain", "full_prior", "calibration")

    def __init__(self, delta: float = 0.01, margin: float = 0.0, family_alpha: float | None = 0.1,
                 ridge: float = 0.01, meta: bool = True) -> None:
        super().__init__(delta, margin, family_alpha)
        self.ridge = float(ridge)
        self.meta = bool(meta)
        n = 7  # SupportStats.design width
        # uniform priors until fitted (the twin without meta-training keeps them): mean 1/2, kappa 2
        self.w_loss, self.w_gain = np.zeros(n), np.zeros(n)
        self.kappa_loss = self.kappa_gain = 2.0
        self.full_prior = [1.0, 1.0]

    def learn(self, families: Sequence[FamilyEpisodes]) -> "EmpiricalBayesSelector":
        if not self.meta:
            return self
        if not families:
            raise ValueError(f"{self.name}: no training families to fit the prior on")
        x = np.concatenate([f.stats.design() for f in families])
        rates = lambda attr: np.concatenate([np.broadcast_to(getattr(f, attr), f.stats.loss.shape)  # noqa: E731
                                             for f in families])
        counts = lambda fn: np.concatenate([fn(f.stats) for f in families])  # noqa: E731
        self.w_loss = _fit_logistic(x, rates("loss_rate"), self.ridge)
        self.w_gain = _fit_logistic(x, rates("gain_rate"), self.ridge)
        right = counts(lambda s: np.broadcast_to(s.full_em[:, None], s.loss.shape))
        wrong = counts(lambda s: np.broadcast_to((s.n - s.full_em)[:, None], s.loss.shape))
        self.kappa_loss = _fit_kappa(expit(x @ self.w_loss), right, counts(lambda s: s.loss))
        self.kappa_gain = _fit_kappa(expit(x @ self.w_gain), wrong, counts(lambda s: s.gain))
        full = np.array([f.full_em for f in families])
        m, v = float(full.mean()), float(full.var()) + 1e-6  # Beta prior on full EM by moments
        k = max(m * (1 - m) / v - 1.0, 0.5)
        self.full_prior = [k * m, k * (1 - m)]
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
    params = ("delta", "margin", "family_alpha", "ridge")
    fitted = ("weights", "mean", "scale", "calibration")

    def __init__(self, delta: float = 0.01, margin: float = 0.0, family_alpha: float | None = 0.1,
                 ridge: float = 0.01) -> None:
        super().__init__(delta, margin, family_alpha)
        self.ridge = float(ridge)
        self.weights: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def learn(self, families: Sequence[FamilyEpisodes]) -> "LearnedMapSelector":
        if not families:
            raise ValueError(f"{self.name}: no training families to fit the map on")
        xs = [_map_design(f.stats) for f in families]
        x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in xs])
        y = np.concatenate([f.query_drop[:, 1:].reshape(-1) for f in families])
        self.mean, self.scale = x.mean(0), x.std(0) + 1e-9
        self.mean[0], self.scale[0] = 0.0, 1.0
        z = (x - self.mean) / self.scale
        self.weights = np.linalg.solve(z.T @ z + self.ridge * len(z) * np.eye(z.shape[1]), z.T @ y)
        return self

    def predicted_drop(self, stats: SupportStats) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError(f"{self.name}: fit it on the training families' episodes first")
        return ((_map_design(stats) - self.mean) / self.scale) @ self.weights


META_SELECTORS: dict[str, type[MetaSelector]] = {
    "em_target_margin": SupportDrop,
    "meta_eb": EmpiricalBayesSelector,
    "meta_map": LearnedMapSelector,
}
