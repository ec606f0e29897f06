"""What a fold of ``maml-stop evaluate`` reads: the feature columns of its held-out and source corpora,
checked (and narrowed to its checkpoint's subset) before any fold is trained or evaluated."""

from __future__ import annotations

from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.datamodule import select_features
from maml_stop.evaluate.config import EvaluateConfig
from maml_stop.evaluate.folds import data_settings

__all__ = ["may_read_subset", "check_columns"]


def may_read_subset(cfg: EvaluateConfig) -> bool:
    """Whether a fold may read a feature subset: ``features`` set, a checkpoint (its own subset), or a
    fit config with ``data.features``."""
    return (cfg.features is not None or bool(cfg.checkpoint or cfg.checkpoints)
            or data_settings(cfg.train_configs).get("features") is not None)


def check_columns(fold, corpus: TraceCorpus, source: TraceCorpus, cfg: EvaluateConfig) -> tuple[TraceCorpus, TraceCorpus]:
    """The held-out and source corpora narrowed to the columns ``fold`` reads (``fold`` None or its
    ``feature_names`` None: every column, which must then be the same in both corpora). Raises a
    ``ValueError`` naming the missing features."""
    names = None if fold is None else fold.feature_names
    reads = corpus.feature_names if names is None else names
    for what, path, c in (("source corpus", cfg.source_corpus, source), ("corpus", cfg.corpus, corpus)):
        missing = [n for n in reads if n not in c.feature_names]
        if missing or (names is None and c.feature_names != reads):
            whose = f"the corpus {cfg.corpus}" if names is None else f"the fold of {fold.family} (its checkpoint or features:)"
            raise ValueError(
                f"the {what} {path} has other features than {whose} reads"
                + (f": it lacks {missing}" if missing else "") + ":\n"
                f"  {what} ({len(c.feature_names)}): {c.feature_names}\n"
                f"  read   ({len(reads)}): {list(reads)}"
            )
    if names is None:
        return corpus, source
    narrow = select_features(corpus, names)
    return narrow, (narrow if source is corpus else select_features(source, names))
