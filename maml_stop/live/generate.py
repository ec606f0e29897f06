"""``maml-stop generate``: answer questions with live stopping built from an adapted artifact alone.

The artifact of ``maml-stop adapt`` carries the predictor, its threshold and feature subset and the
probe recipe; :meth:`~maml_stop.live.stopping.LiveStopping.from_adapted` builds the stopping criterion
from it, and the artifact's family renders the prompts, extracts the answers and scores them::

    maml-stop generate --adapted runs/adapted/gcd.pt --model Qwen/Qwen2.5-Coder-0.5B-Instruct \\
        --questions questions.jsonl --field question --gold_field gold --batch_size 8 --out answers.jsonl

One JSON line per question (see :func:`result_row`): ``answer``; ``total_tokens`` (reasoning tokens plus
every forced-answer token the live rule ran: trigger + answer of each forced probe, the accounting of
:mod:`maml_stop.data.accounting`); ``reasoning_tokens`` (generated tokens until the stop, the EOS
included); ``stopped_at`` (generated tokens when the rule stopped the row, null when it did not);
``stopped_early`` (the rule stopped it before the token cap); ``end`` (``stop``, ``eos`` or ``cap``);
``probes`` and ``forced`` (probe points seen, answers forced); ``em`` only for a question with a gold
answer; with a think-mode recipe (``reasoning_format: think``, :mod:`maml_stop.probe.think`; the prompt
opens the think block) also ``think_tokens`` and ``after_think_tokens`` (the reasoning tokens inside the
think block and after the model's own ``</think>``: they add up to ``reasoning_tokens``) and
``think_closed`` (the model closed the block itself). ``--device cuda`` runs the model, the probes and
the criterion on the GPU (checked before the model loads). The answer of a stopped row is the forced answer it stopped with; of a row that ran to the cap
with a cap probe in the recipe, the answer forced at the cap (the answer of a capped run, DESIGN.md);
otherwise the family's ``extract_answer`` of its text.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from maml_stop.data.outputs import check_output_file

from maml_stop.harvest.model import load_model, model_identity, resolve_device
from maml_stop.live.artifact import AdaptError, load_adapted, missing_recipe_fields
from maml_stop.live.stopping import LiveStopping
from maml_stop.probe.forcing import eos_ids
from maml_stop.probe.think import count_think_tokens
from tasks import get_family
from tasks.base import Question, TaskError, question_id, split_of

log = logging.getLogger(__name__)

__all__ = ["GenerateError", "InputQuestion", "read_questions", "generate_answers", "result_row", "main"]


class GenerateError(ValueError):
    """A bad input of ``maml-stop generate`` (the message names what was wrong)."""


@dataclass
class InputQuestion:
    text: str
    gold: str | None = None
    id: str | None = None


def read_questions(path: str, field: str = "question", gold_field: str = "gold") -> list[InputQuestion]:
    """The questions of a JSONL file: one JSON object per non-blank line, the question text under ``field``,
    the gold answer (optional, per line) under ``gold_field``, an optional ``id``."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise GenerateError(f"cannot read the question file {path}: {err}") from err
    out: list[InputQuestion] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerateError(f"{path}, line {i}: not JSON ({err.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise GenerateError(f"{path}, line {i}: expected a JSON object with field {field!r}, got "
                                f"{type(row).__name__}")
        if field not in row:
            raise GenerateError(f"{path}, line {i}: no field {field!r} (pass --field); keys present: {sorted(row)}")
        gold = row.get(gold_field)
        out.append(InputQuestion(str(row[field]), None if gold is None else str(gold),
                                 None if row.get("id") is None else str(row["id"])))
    if not out:
        raise GenerateError(f"{path} holds no questions")
    return out


def check_model(adapted_path: str, model: str, allow_other_model: bool = False) -> None:
    """Refuse ``model`` unless its weight files hash to those of the model the artifact's traces were
    harvested with (its ``meta["provenance"]``, :mod:`maml_stop.data.provenance`): a model of the same
    width would run and give meaningless features (issue 29). Unknown on either side: a warning."""
    recorded = ((load_adapted(adapted_path).meta.get("provenance") or {}).get("parts") or {}).get("model")
    weights = model_identity(model, hash_weights=True).get("weights") if recorded else None
    if not recorded or not weights:
        log.warning("cannot check that %s is the model the traces of %s were harvested with (%s)", model,
                    adapted_path, "the artifact records no weight hashes" if not recorded else "no local weight files")
        return
    if weights != recorded:
        message = (f"--model {model} is not the model the traces of {adapted_path} were harvested with: its weight "
                   f"files hash to {weights}, the artifact records {recorded}")
        if not allow_other_model:
            raise GenerateError(message + ". Use that model, or pass --allow_other_model true for a deliberate use")
        log.warning("%s (allowed by --allow_other_model)", message)


def _family_of(adapted_path: str, family_args: dict | None = None):
    """The family named by the artifact's recipe (it renders the prompts and scores answers): a registry
    family, or one rebuilt from ``family_args``, the harvest's ``family_args`` (``{dataset: {path: ...,
    answer_format: ..., name: ...}}``: a ``dataset`` family is stored under its own name)."""
    adapted = load_adapted(adapted_path)
    missing = missing_recipe_fields(adapted.recipe)
    if missing:
        raise AdaptError(f"{adapted_path} carries no complete probe recipe: missing {missing}; adapt again with "
                         "`maml-stop adapt --corpus <corpus>`")
    name = adapted.recipe["extraction"]["family"]
    try:
        for registered, settings in (family_args or {}).items():  # the harvest's family_args, as it built them
            family = get_family(registered, **(settings or {}))
            if family.name == name:
                return family
        if family_args:
            raise GenerateError(f"--family_args build no family named {name!r}, the family {adapted_path} was "
                                f"adapted on: give the harvest's family_args")
        return get_family(name)
    except TaskError as err:
        raise GenerateError(f"{adapted_path} was adapted on family {name!r}, which is not in the task registry: "
                            f"generate needs it to render prompts ({err}); for a dataset family give "
                            "--family_args '{dataset: {path: ..., answer_format: ..., name: ...}}' as in the harvest") from None


def result_row(criteria, row: int, generated: Sequence[int], eos: set[int], family, tokenizer,
               max_new_tokens: int) -> dict[str, Any]:
    """Answer and token accounting of batch row ``row`` after ``generate`` (``generated``: its new tokens)."""
    stopped_at = criteria.stopped_at[row]
    if stopped_at is not None:
        reasoning, end = stopped_at, "stop"
        answer = criteria.answers[row]
    else:
        ids = list(generated)
        first_eos = next((i for i, t in enumerate(ids) if t in eos), None)
        if first_eos is not None:
            reasoning, end = first_eos + 1, "eos"
        else:
            reasoning, end = len(ids), "cap"
        reasons = criteria.reasons[row]
        if end == "cap" and reasons and reasons[-1] == "cap":  # the answer forced at the cap
            answer = criteria.answers[row]
        else:
            answer = family.extract_answer(tokenizer.decode(ids[:reasoning], skip_special_tokens=True))
    k = criteria.featurizer.feature_names.index("answer_tokens")
    trigger = len(criteria.trigger_ids)
    forced = [int(round(float(v[k]))) + trigger for v, f in zip(criteria.features[row], criteria.forced[row]) if f]
    think = {}
    if getattr(criteria, "reasoning_format", "plain") == "think":
        count = count_think_tokens(tokenizer, list(generated)[:reasoning])
        think = {"think_tokens": count.think_tokens, "after_think_tokens": count.after_think_tokens,
                 "think_closed": count.closed}
    return {
        "answer": answer,
        "total_tokens": int(reasoning + sum(forced)),
        "reasoning_tokens": int(reasoning),
        "stopped_at": stopped_at,
        "stopped_early": stopped_at is not None and stopped_at < max_new_tokens,
        "end": end,
        "probes": len(criteria.reasons[row]),
        "forced": len(forced),
        **think,
    }


def generate_answers(criteria, model, tokenizer, family, questions: Sequence[InputQuestion], batch_size: int = 8,
                     device: str | None = None,
                     emit: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One result per question (:func:`result_row`, plus ``id``, ``question``, ``gold`` and ``em`` when the
    question has a gold answer), generated ``batch_size`` at a time with left padding, on ``device`` (default:
    the model's). ``emit`` is called with each result as soon as its batch is done (``maml-stop generate``
    writes it out then, so that an interrupted run keeps the answers it made)."""
    import torch
    from transformers import StoppingCriteriaList

    qs = [Question(q.id or question_id(family.name, q.text), family.name, split_of(q.text), q.text, q.gold or "")
          for q in questions]
    max_new = criteria.max_new_tokens
    eos = set(eos_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    prev_side = tokenizer.padding_side
    out: list[dict[str, Any]] = []
    try:
        tokenizer.padding_side = "left"
        for start in range(0, len(qs), batch_size):
            chunk = qs[start:start + batch_size]
            prompts = [family.render_prompt(q, tokenizer, getattr(criteria, "reasoning_format", "plain"))
                       for q in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device if device is not None else next(model.parameters()).device)  # the model's device
            with torch.no_grad():
                seqs = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=pad,
                                      stopping_criteria=StoppingCriteriaList([criteria]))
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()
            for r, (q, src) in enumerate(zip(chunk, questions[start:start + batch_size])):
                row = {"id": q.id, "question": q.question}
                row.update(result_row(criteria, r, new[r], eos, family, tokenizer, max_new))
                if src.gold is not None:
                    row["gold"] = src.gold
                    row["em"] = bool(family.score(row["answer"], q))
                out.append(row)
                if emit is not None:
                    emit(row)
    finally:
        tokenizer.padding_side = prev_side
    return out


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="maml-stop generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--adapted", type=str, required=True, help="adapted predictor file (maml-stop adapt)")
    p.add_argument("--model", type=str, required=True, help="the model its traces were harvested with")
    p.add_argument("--question", type=str | None, default=None, help="one question")
    p.add_argument("--questions", type=str | None, default=None, help="or a JSONL file of questions")
    p.add_argument("--field", type=str, default="question", help="field of --questions holding the question")
    p.add_argument("--gold_field", type=str, default="gold", help="field holding the gold answer (EM when present)")
    p.add_argument("--batch_size", type=int, default=8, help="questions per generate() call")
    p.add_argument("--max_new_tokens", type=int | None, default=None, help="token cap (default: the recipe's)")
    p.add_argument("--dtype", type=str, default="float32", help="model dtype (float32, bfloat16, float16)")
    p.add_argument("--device", type=str, default="cpu", help="torch device of the model (cpu, cuda)")
    p.add_argument("--family_args", type=dict | None, default=None,
                   help="the harvest's family_args, to rebuild a dataset family the artifact was adapted on")
    p.add_argument("--out", type=str | None, default=None, help="JSONL output (default: stdout)")
    p.add_argument("--allow_other_model", type=bool, default=False,
                   help="run with a model whose weights differ from the artifact's traces' model (a warning)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    def fail(msg) -> int:
        print(f"maml-stop generate: {msg}", file=sys.stderr)
        return 2

    try:
        if args.out:  # a folder, a read-only or blocked path: refused before anything is generated
            check_output_file(args.out, "--out")
        if (args.question is None) == (args.questions is None):
            raise GenerateError("give exactly one of --question \"...\" (one question) and --questions FILE.jsonl")
        if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
            raise GenerateError("--batch_size and --max_new_tokens must be >= 1")
        questions = ([InputQuestion(args.question)] if args.question is not None
                     else read_questions(args.questions, args.field, args.gold_field))
        if not Path(args.adapted).is_file():
            raise GenerateError(f"adapted file {args.adapted} does not exist")
        try:
            resolve_device(args.device)  # a bad --device fails before anything loads
        except ValueError as err:
            raise GenerateError(f"--device: {err}") from None
        family = _family_of(args.adapted, args.family_args)  # before the model loads
        check_model(args.adapted, args.model, args.allow_other_model)
        model, tok = load_model(args.model, args.dtype, device=args.device)
        criteria = LiveStopping.from_adapted(args.adapted, model, tok, max_new_tokens=args.max_new_tokens)
    except (GenerateError, AdaptError, FileNotFoundError, OSError) as err:
        return fail(err)
    sink = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout

    def emit(row: dict[str, Any]) -> None:  # one JSON line per answer, flushed as it is made
        sink.write(json.dumps(row) + "\n")
        sink.flush()

    try:
        rows = generate_answers(criteria, model, tok, family, questions, args.batch_size, args.device, emit)
    finally:
        criteria.remove_hooks()
        if sink is not sys.stdout:
            sink.close()
    if args.out:
        scored = [r["em"] for r in rows if "em" in r]
        em = f"; EM {sum(scored) / len(scored):.3f} on {len(scored)}" if scored else ""
        print(f"{len(rows)} answers{em}; {sum(r['stopped_early'] for r in rows)} stopped early; saved: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
