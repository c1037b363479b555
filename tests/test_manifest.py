"""Manifest step records and hashing."""

from __future__ import annotations

from pathlib import Path

import torch

from perp_cli.manifest import StepRecord, sha256_file, sha256_tensor


def test_step_record_is_json_ready(tmp_path: Path) -> None:
    step = StepRecord("prune", {"sparsity": 0.5, "out": tmp_path, "dtype": torch.float32}, input="in", seed=3)
    step.results["sparsity"] = 0.5
    record = step.finish()
    assert record["args"] == {"sparsity": 0.5, "out": str(tmp_path), "dtype": "float32"}
    assert record["seed"] == 3 and record["wall_time_s"] >= 0
    assert record["peak_memory"]["host_rss_mib"] > 0
    assert {"torch", "transformers", "perp"} <= set(record["versions"])


def test_hashes() -> None:
    t = torch.arange(10)
    assert sha256_tensor(t) == sha256_tensor(t.clone()) != sha256_tensor(t + 1)
    f = Path(__file__)
    assert len(sha256_file(f)) == 64
