"""The corpus and meta-training plots of maml_stop.evaluate.report.plots that the datasheet and the notebooks use."""

from __future__ import annotations

import numpy as np
import pytest

from maml_stop.data.corpus import TraceCorpus
from maml_stop.evaluate.report.plots import plot_probe_accuracy, plot_training_curves, probe_accuracy_by_position


def test_probe_accuracy_matches_a_loop_over_probe_points(tiny_corpus):
    traces = TraceCorpus.load(tiny_corpus).traces("fam_a")
    out = probe_accuracy_by_position(traces, bin_width=7)
    seen: dict[int, list[float]] = {}
    for t in traces:
        for pos, label in zip(t.positions.tolist(), t.labels.tolist()):
            seen.setdefault(pos // 7 * 7, []).append(label)
    assert out["left"].tolist() == sorted(seen)
    np.testing.assert_allclose(out["fraction"], [np.mean(seen[k]) for k in sorted(seen)])
    assert out["count"].tolist() == [len(seen[k]) for k in sorted(seen)]
    assert out["count"].sum() == sum(t.n_probes for t in traces)


def test_probe_accuracy_of_no_traces_is_empty_and_bad_bins_are_refused():
    assert probe_accuracy_by_position([], bin_width=4)["left"].size == 0
    with pytest.raises(ValueError, match="bin_width"):
        probe_accuracy_by_position([], bin_width=0)


def test_plot_probe_accuracy_writes_a_png(tiny_corpus, tmp_path):
    corpus = TraceCorpus.load(tiny_corpus)
    path = plot_probe_accuracy({f: corpus.traces(f) for f in corpus.families}, tmp_path / "acc.png", bin_width=8)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_training_curves_reads_a_csvlogger_file(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,train/loss,val/loss,val/loss_random_init\n"
        "0,0,0.7,,\n0,1,0.6,,\n0,1,,0.65,0.69\n1,2,0.5,,\n"
    )
    path = plot_training_curves(csv, tmp_path / "loss.png")  # val/loss_unadapted absent: skipped
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"its columns: \['epoch', 'step'"):
        plot_training_curves(csv, tmp_path / "none.png", keys=("test/loss",))
