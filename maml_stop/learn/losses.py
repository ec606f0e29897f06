"""The losses of the inner loop and of the meta-objective: weighted binary cross-entropies and the expected
cost of the soft first-stop policy, by name (:func:`parse_loss`).

Losses (``loss``): one kind for the inner (support) and the outer (query) loss, or ``"INNER/QUERY"``
(e.g. ``balanced/expected_cost``: adapt with the balanced BCE, meta-train the query on the expected cost;
YAML ``model.adapter.loss: balanced/expected_cost``, the checkpoint records the spec). Inner kinds (:data:`LOSSES`,
weighted binary cross-entropies):

* ``bce``: mean over probe points;
* ``balanced``: each class present in the batch weighs half, so a support set with few correct probes
  still teaches both sides;
* ``cost`` (cost-sensitive, issue 13 item 4): each probe weighted by what a wrong decision there costs,
  ``ProbeBatch.cost_weights`` (``ProbeBatch.weights`` on hand-built batches, which lack them): a correct
  probe (a safe stop) by ``lambda * saved`` (the share of the run's tokens that a missed stop there
  wastes), a wrong one by its EM at stake (1 when the full run is correct, else ``COST_FLOOR``);
  ``lambda`` is ``data.cost_lambda`` (:mod:`maml_stop.data.batches`). The minimiser of a weighted BCE is
  ``P(correct) * w+ / (P(correct) * w+ + P(wrong) * w-)``: a larger lambda raises the predicted stop
  probability of every probe with tokens at stake, so the first probe above a fixed threshold comes
  earlier. ``lambda = 0`` is the EM-only limit: correct probes weigh ``COST_FLOOR``, wrong ones their EM
  at stake. A plain ``loss: cost`` needs ``data.weighting: cost`` (the module checks it); the query part
  of ``INNER/cost`` reads ``cost_weights``, which every collated batch carries.

Query-only kind (:data:`QUERY_LOSSES`), a meta-objective aimed at the decision (issue 11 item 4):

* ``expected_cost``: the expected cost of the soft first-stop policy. Read the predicted probabilities
  ``p_i = sigmoid(logit_i)`` of a trace as a policy that stops at probe ``i`` with probability ``p_i``
  if it has not stopped before: it stops first at ``i`` with probability ``P_i = p_i * prod_{j<i}
  (1 - p_j)`` and runs to the end with ``prod_j (1 - p_j)``. Stopping at ``i`` costs
  ``ProbeBatch.stop_penalty[i] = em_lost_i - lambda * saved_i`` (EM points lost minus lambda times the
  share of tokens saved; running to the end costs 0), so the loss, averaged over the batch's traces, is
  ``E[EM lost] - lambda * E[share saved]``: the Lagrangian of "save tokens at an EM-drop target", with
  ``1 / lambda`` the price of one EM point, and the same first-crossing structure as the evaluated
  threshold policy (stop at the first probe with ``p >= tau``). ``lambda = 0``: the expected EM lost
  alone (stopping pays only where the forced answer is right and the full run's wrong).

``lambda`` reaches the batches from the data (``data.cost_lambda``), because ``MetaStoppingModule`` passes
``model.adapter.loss`` through as it is. Evaluation adapts with the inner kind only (:meth:`fit_support`), so
``INNER/QUERY`` with a lambda-free inner kind evaluates exactly as it was meta-trained; an inner
``cost`` kind is collated at evaluation with lambda = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maml_stop.data.batches import DataError, ProbeBatch

__all__ = ["LOSSES", "QUERY_LOSSES", "parse_loss", "loss_weights", "inner_loss", "stop_penalty", "expected_cost",
           "expected_stop_cost", "query_loss"]

LOSSES = ("bce", "balanced", "cost")  # inner kinds: weighted BCEs (a spec "KIND" uses one for both losses)
QUERY_LOSSES = LOSSES + ("expected_cost",)  # query kinds: the second half of a spec "INNER/QUERY"


def parse_loss(spec: str) -> tuple[str, str]:
    """(inner kind, query kind) of a loss spec: ``"KIND"`` (both the same, one of :data:`LOSSES`) or
    ``"INNER/QUERY"`` (INNER one of :data:`LOSSES`, QUERY one of :data:`QUERY_LOSSES`).

    >>> parse_loss("balanced"), parse_loss("balanced/expected_cost")
    (('balanced', 'balanced'), ('balanced', 'expected_cost'))
    """
    valid = (f"valid: {', '.join(LOSSES)}, or INNER/QUERY with INNER one of those and QUERY one of "
             f"{', '.join(QUERY_LOSSES)} (e.g. balanced/expected_cost)")
    parts = str(spec).split("/") if isinstance(spec, str) else [None]
    if len(parts) == 1 and parts[0] in QUERY_LOSSES and parts[0] not in LOSSES:
        raise ValueError(f"loss {spec!r} is a query loss (the inner loop fits a weighted BCE): use INNER/{spec}, "
                         f"e.g. balanced/{spec}; {valid}")
    if len(parts) == 1 and parts[0] in LOSSES:
        return parts[0], parts[0]
    if len(parts) == 2 and parts[0] in LOSSES and parts[1] in QUERY_LOSSES:
        return parts[0], parts[1]
    raise ValueError(f"unknown loss {spec!r}; {valid}")


def loss_weights(batch: ProbeBatch, kind: str = "balanced") -> Tensor:
    """Per-probe weights of the inner loss ``kind``, summing to 1. (N,)"""
    if kind == "bce":
        return torch.full_like(batch.labels, 1.0 / max(len(batch), 1))
    if kind == "balanced":  # each class present weighs half (all of it when the other is absent)
        pos = batch.labels
        n_pos = pos.sum()
        w = pos / n_pos.clamp(min=1.0) + (1.0 - pos) / (pos.numel() - n_pos).clamp(min=1.0)
    elif kind == "cost":  # the cost weights every collated batch carries; a hand-built batch's own weights
        w = batch.cost_weights if batch.cost_weights is not None else batch.weights
    else:
        raise ValueError(f"unknown inner loss {kind!r}; valid: {', '.join(LOSSES)}")
    return w / w.sum().clamp(min=1e-12)


def inner_loss(logits: Tensor, batch: ProbeBatch, kind: str = "balanced", weights: Tensor | None = None) -> Tensor:
    """Weighted binary cross-entropy of ``logits`` (N,) against ``batch.labels``; ``weights`` (N,),
    summing to 1, default ``loss_weights(batch, kind)`` (pass them to skip recomputing in a loop)."""
    w = loss_weights(batch, kind) if weights is None else weights
    return F.binary_cross_entropy_with_logits(logits, batch.labels, weight=w, reduction="sum")


def stop_penalty(batch: ProbeBatch) -> Tensor:
    if batch.stop_penalty is None:
        raise DataError("loss expected_cost reads ProbeBatch.stop_penalty, which batches collated from traces carry "
                        "(collate_traces, TraceTensors); this batch was built without it")
    return batch.stop_penalty


def expected_cost(logits: Tensor, probe_index: Tensor, penalty: Tensor, n_traces: Tensor | int) -> Tensor:
    """Expected stop penalty per trace of the soft first-stop policy, over the last axis of ``logits``
    (..., N) (rows of a trace contiguous, ``probe_index`` their positions; zero-penalty padding rows
    with position 0 add nothing): ``sum_i p_i prod_{j<i, same trace} (1 - p_j) penalty_i / n_traces``. (...)"""
    lg = logits.double()
    log_q = -F.softplus(lg)  # log(1 - p), stable
    before = torch.cumsum(log_q, dim=-1) - log_q  # (..., N) sum of log(1 - p_j) over the rows before i
    rows = torch.arange(lg.shape[-1], device=lg.device).expand_as(probe_index)
    start = before.gather(-1, rows - probe_index)  # (..., N) the same sum at the first row of i's trace
    first = torch.sigmoid(lg) * torch.exp(before - start)  # P(the first stop is at probe i)
    total = (first * penalty.double()).sum(dim=-1)
    return (total / torch.as_tensor(n_traces, dtype=total.dtype, device=total.device).clamp(min=1)).to(logits.dtype)


def expected_stop_cost(logits: Tensor, batch: ProbeBatch) -> Tensor:
    """The ``expected_cost`` query loss (module docstring): ``E[EM lost] - lambda * E[share saved]`` of the
    soft first-stop policy ``sigmoid(logits)`` (N,), averaged over the batch's traces. ()"""
    return expected_cost(logits, batch.probe_index, stop_penalty(batch), batch.n_traces)


def query_loss(logits: Tensor, batch: ProbeBatch, kind: str = "balanced") -> Tensor:
    """The query (outer) loss ``kind`` (one of :data:`QUERY_LOSSES`) of ``logits`` (N,) on ``batch``. ()"""
    if kind == "expected_cost":
        return expected_stop_cost(logits, batch)
    if kind not in LOSSES:
        raise ValueError(f"unknown query loss {kind!r}; valid: {', '.join(QUERY_LOSSES)}")
    return inner_loss(logits, batch, kind)
