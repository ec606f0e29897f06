"""One name per idea (issue 31 item 5): the stop threshold's value is ``tau`` in the runtime, and a key
that moved is refused naming its new home."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the old name of tau's value; gate_threshold (another value), threshold_method(s) (a selector's name) and
# the threshold selectors of decide/thresholds.py are other ideas and do not match
# (a variable ``threshold: str`` holding a threshold method's name is the selector's name, kept)
OLD_TAU = re.compile(r"\.threshold\b|\blive_threshold\b|\brow_thresholds\b|\b_check_threshold\b"
                     r"|(?<![\w.])threshold(=|: float)|['\"]threshold['\"]")
# where the word must stay: the migrations that read the old name, and the meta study's results.json,
# whose "threshold" names its headline selector (a threshold method, not tau), read back by its report
KEPT = {
    ("experiments/meta_study.py", '"config": config, "evaluate": evaluate, "threshold": headline, "folds": grouped["folds"],'),
    ("experiments/meta_study.py", "f\"episodes per held-out family and K, every method on the same episodes; threshold `{study['threshold']}` \""),
    ("maml_stop/live/artifact.py", 'out = {k: v for k, v in blob.items() if k != "threshold"}'),
    ("maml_stop/live/artifact.py", 'out.update(format=FORMAT, tau=blob.get("threshold"))'),
    ("maml_stop/live/artifact.py", '# older formats load_adapted reads, through migrate_adapted: /1 stored tau as "threshold" (issue 31)'),
    ("maml_stop/online/stopper.py", 'MOVED_KEYS = {"threshold": "rule"}'),
}


def test_tau_has_one_name_in_the_package():
    """maml_stop/, and what reads it: experiments/ scripts, scripts/, notebooks/."""
    paths = [*(ROOT / "maml_stop").rglob("*.py"), *(ROOT / "experiments").glob("*.py"),
             *(ROOT / "experiments" / "studies").glob("*.py"), *(ROOT / "scripts").glob("*"),
             *(ROOT / "notebooks").glob("*.ipynb")]
    assert len(paths) > 100
    hits = []
    for path in sorted(p for p in paths if p.is_file()):
        rel = str(path.relative_to(ROOT))
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if OLD_TAU.search(line) and (rel, line.strip()) not in KEPT:
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "the stop threshold's value is tau (issue 31):\n" + "\n".join(hits)


def test_the_pattern_catches_the_old_names_and_spares_the_kept_ones():
    for old in ("adapted.threshold", "adapted.live_threshold", "criteria.row_thresholds = x", "threshold: float",
                'parts["threshold"]', "StopRule(names, p, threshold=0.5)", "_check_threshold('x', 1)"):
        assert OLD_TAU.search(old), old
    for kept in ("gate_threshold: float = 0.5", "self.gate_threshold", "cfg.threshold_methods", "--threshold_method",
                 "threshold_method=args.threshold_method", "FixedThreshold(0.5)", "choose the threshold on support",
                 "def summarise(results: dict, threshold: str | None = None)"):
        assert not OLD_TAU.search(kept), kept


def test_online_threshold_moved_to_online_rule():
    from maml_stop.online import OnlineConfig, refuse_moved_keys

    assert OnlineConfig(rule="em_target").rule == "em_target"
    with pytest.raises(ValueError, match=r"online\.threshold -> online\.rule"):
        refuse_moved_keys({"threshold": "sa", "window": 8})
    refuse_moved_keys({"rule": "sa"})  # the new key passes


def test_serve_refuses_online_threshold_naming_online_rule(tmp_path):
    pytest.importorskip("fastapi")
    from maml_stop.serve.cli import parse_config

    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("model: m\nartifact: a.pt\nonline:\n  threshold: sa\n")
    for argv in (["--config", str(yaml_file)], ["--model", "m", "--artifact", "a.pt", "--online.threshold", "sa"],
                 ["--model", "m", "--artifact", "a.pt", "--online.threshold=sa"]):
        with pytest.raises(ValueError, match=r"online\.threshold -> online\.rule"):
            parse_config(argv)
    yaml_file.write_text("model: m\nartifact: a.pt\nonline:\n  rule: em_target\n")
    assert parse_config(["--config", str(yaml_file)]).online.rule == "em_target"


def test_drift_config_refuses_online_threshold(tmp_path):
    from experiment_scripts import load_script

    module = load_script("drift_simulation")
    path = tmp_path / "drift.yaml"
    path.write_text("online:\n  threshold: sa\n")
    with pytest.raises(ValueError, match=r"drift\.yaml: these online keys were renamed: online\.threshold -> online\.rule"):
        module.DriftConfig.load(path)
    path.write_text("online:\n  rule: ltt\n")
    assert module.DriftConfig.load(path).online.rule == "ltt"
