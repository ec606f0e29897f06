"""Token accounting: the one place that turns a stopping decision on a trace into tokens (DESIGN.md,
"Honest accounting"), and the one savings formula.

* stopping at probe ``i`` having run the probes ``ran`` (by default every probe up to ``i``, what a
  policy that probes at every probe point pays) costs ``positions[i] + sum(probe_tokens[ran])`` tokens,
  of which ``positions[i]`` are reasoning tokens; the forced answer of probe ``i`` is the output;
* running to the end (``index=None``) costs ``reasoning_tokens`` (the model's own answer is part of
  what it generated) plus the probes it ran (by default all of them);
* plain full generation, with no probes, costs ``reasoning_tokens``; a run that hits the token cap in a
  corpus whose capped runs answer with the answer forced at the cap (``trace.cap_probe``, see
  :mod:`maml_stop.probe.labels`) also pays that forced answer, and so does every policy that runs to the
  end (it is the run's output);
* savings against full generation are ``1 - spent / full`` (negative when probing costs more than it
  saves); with nothing to save (``full <= 0``) they are NaN.

It lives in ``data/`` (not ``evaluate/``) because the training data use it too (cost-weighted losses):
imports run one way, from the later stages of the pipeline to the earlier ones.

>>> import numpy as np
>>> from types import SimpleNamespace as T
>>> t = T(positions=np.array([10, 20]), probe_tokens=np.array([5, 6]), reasoning_tokens=40)
>>> stop_cost(t, 1), stop_cost(t, 1, ran=[1]), stop_cost(t, None), full_cost(t)
((31, 20), (26, 20), (51, 40), 40)
>>> stop_costs(t)[0].tolist()                  # stop_cost(t, i)[0] for every probe i
[15, 31]
>>> round(savings(31, 40), 4)
0.225
>>> c = T(positions=np.array([10, 40]), probe_tokens=np.array([5, 6]), reasoning_tokens=40, cap_probe=1)
>>> full_cost(c), stop_cost(c, None, ran=[]), stop_cost(c, None, ran=[0])   # capped: the cap answer is paid
(46, (46, 40), (51, 40))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def stop_cost(trace, index: int | None, ran: Sequence[int] | None = None) -> tuple[int, int]:
    """(total tokens, reasoning tokens) of stopping at probe ``index`` (None: run to the end) having run
    the forced answers of the probes ``ran`` (default: every probe up to ``index``; all when None)."""
    probes = np.asarray(trace.probe_tokens)
    if ran is None:
        paid = int(probes.sum()) if index is None else int(probes[: index + 1].sum())
    else:
        paid = int(probes[np.asarray(list(ran), dtype=np.int64)].sum()) if len(ran) else 0
    if index is None:
        cap = getattr(trace, "cap_probe", None)
        if cap is not None and ran is not None and cap not in set(int(r) for r in ran):
            paid += int(probes[cap])  # the capped run's answer is forced at the cap
        return int(trace.reasoning_tokens) + paid, int(trace.reasoning_tokens)
    return int(trace.positions[index]) + paid, int(trace.positions[index])


def stop_costs(trace) -> tuple[np.ndarray, np.ndarray]:
    """(total (P,), reasoning (P,)) tokens of stopping at each probe having run every probe up to it:
    ``stop_cost(trace, i)`` for every ``i`` at once (int64)."""
    positions = np.asarray(trace.positions, dtype=np.int64)
    return positions + np.cumsum(np.asarray(trace.probe_tokens, dtype=np.int64)), positions


def full_cost(trace) -> int:
    """Tokens of plain full generation (no probes): every token the model generated, plus the forced
    answer at the cap of a capped run whose answer is that forced answer (``trace.cap_probe``)."""
    cap = getattr(trace, "cap_probe", None)
    return int(trace.reasoning_tokens) + (int(np.asarray(trace.probe_tokens)[cap]) if cap is not None else 0)


def savings(spent, full):
    """``1 - spent / full``: the fraction of full-generation tokens saved (floats, NumPy arrays or torch
    tensors, elementwise); NaN where ``full <= 0``."""
    if isinstance(spent, (int, float)) and isinstance(full, (int, float)):
        return 1.0 - spent / full if full > 0 else float("nan")
    try:
        import torch

        if isinstance(spent, torch.Tensor) or isinstance(full, torch.Tensor):
            full_t = torch.as_tensor(full, dtype=torch.float64)
            spent_t = torch.as_tensor(spent, dtype=torch.float64)
            return torch.where(full_t > 0, 1.0 - spent_t / full_t.clamp(min=1e-300), torch.full_like(full_t, float("nan")))
    except ImportError:  # pragma: no cover
        pass
    spent_a, full_a = np.asarray(spent, dtype=np.float64), np.asarray(full, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(full_a > 0, 1.0 - spent_a / np.where(full_a > 0, full_a, 1.0), np.nan)
    return out if out.ndim else float(out)
