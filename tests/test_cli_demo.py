"""`perp demo`: the README's main job runs end to end on the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

from perp_cli import checkpoint

from conftest import run_cli


def test_demo_runs_the_whole_pipeline_on_the_embedded_default(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_cli("demo", "-o", out, "--steps", "3", "--seqlen", "64", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "embedded default" in result.stderr
    for step in ("0-dense", "1-pruned", "2-retrained", "3-merged"):
        assert (out / step / "perp.json").is_file(), step
    merged = checkpoint.load(out / "3-merged")  # verifies masks: every pruned weight exactly 0
    assert abs(merged.masks.total_sparsity() - 0.5) < 1e-6
    history = [h["command"] for h in json.loads((out / "3-merged" / "perp.json").read_text())["history"]]
    assert history == ["demo-init", "prune", "retrain", "merge"]
    assert not (out / "3-merged" / "adapters.safetensors").exists()
    # the pruned masks survive retraining and merging unchanged
    pruned = checkpoint.load(out / "1-pruned")
    for name, keep in pruned.masks.masks.items():
        assert (merged.masks[name] == keep).all()


def test_demo_refuses_an_existing_output(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    result = run_cli("demo", "-o", tmp_path / "demo")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
