"""`perp demo`: the README's main job, end to end, on the real embedded model and on a given one."""

from __future__ import annotations

import json
import math
import re
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

import pytest

from perp_cli import checkpoint
from perp_cli.cli.demo import gap_closed, lacks_biases

from conftest import ROOT, run_cli, save_tiny

DEMO_DIR = ROOT / "perp_cli" / "demo"


def test_demo_on_the_embedded_model_prunes_visibly_and_recovers(tmp_path: Path, one_thread) -> None:
    """The first command of the README, with its defaults: on held-out text the trained
    embedded model gets clearly worse when pruned, and PERP wins back part of the gap,
    never all of it: dense < recovered < pruned."""
    out = tmp_path / "demo"
    result = run_cli("demo", "-o", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "embedded default" in result.stderr
    for step in ("0-dense", "1-pruned", "2-retrained", "3-merged"):
        assert (out / step / "perp.json").is_file(), step

    results = json.loads((out / "eval.json").read_text())["results"]
    dense, pruned, recovered = (r["perplexity"]["heldout.jsonl"]["ppl"] for r in results)
    assert dense < recovered < pruned
    assert pruned > 1.3 * dense, "pruning must visibly hurt the embedded model"
    share = gap_closed(dense, pruned, recovered)
    assert 0.2 < share < 1
    assert 0 < results[2]["trainable_share"] < 0.1  # PERP trains a small share of the parameters
    assert f"PERP closed {share:.0%} of the gap" in result.stderr

    merged = checkpoint.open(out / "3-merged")  # verifies masks: every pruned weight exactly 0
    assert abs(merged.masks.total_sparsity() - 0.8) < 1e-3  # 80% of 128-column blocks, rounded
    history = json.loads((out / "3-merged" / "perp.json").read_text())["history"]
    assert [h["command"] for h in history] == ["demo-init", "prune", "retrain", "merge"]
    assert history[2]["args"]["add_biases"] is True  # LLaMA has no biases: the demo adds them
    assert merged.model.config.attention_bias and merged.model.config.mlp_bias
    assert not (out / "3-merged" / "adapters.safetensors").exists()
    pruned_ckpt = checkpoint.open(out / "1-pruned")
    for name, keep in pruned_ckpt.masks.masks.items():  # the masks survive retraining and merging unchanged
        assert (merged.masks[name] == keep).all()


def test_demo_runs_on_a_given_model_directory(tmp_path: Path, one_thread) -> None:
    model = save_tiny(tmp_path / "tiny-opt", "opt")
    out = tmp_path / "demo"
    result = run_cli("demo", model, "-o", out, "--steps", "3", "--seqlen", "64", "--sparsity", "0.5",
                     "--method", "magnitude", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "embedded default" not in result.stderr
    assert not (out / "0-dense").exists()  # the given model is the dense one, used in place
    results = json.loads((out / "eval.json").read_text())["results"]
    assert [Path(r["model"]).name for r in results] == ["tiny-opt", "1-pruned", "3-merged"]
    history = json.loads((out / "3-merged" / "perp.json").read_text())["history"]
    assert history[1]["args"]["add_biases"] is False  # OPT has biases already
    assert "PERP closed" in result.stderr


def test_lacks_biases_tells_llama_from_opt_and_gpt2(tmp_path: Path) -> None:
    assert lacks_biases(str(save_tiny(tmp_path / "llama", "llama")))
    assert not lacks_biases(str(save_tiny(tmp_path / "opt", "opt")))
    assert not lacks_biases(str(save_tiny(tmp_path / "gpt2", "gpt2")))  # biased, and no flag to add them
    assert not lacks_biases(str(tmp_path / "absent"))  # prune reports it


def test_gap_closed() -> None:
    assert gap_closed(10.0, 20.0, 15.0) == 0.5
    assert gap_closed(10.0, 20.0, 20.0) == 0.0
    assert gap_closed(10.0, 20.0, 8.0) == 1.2
    assert math.isnan(gap_closed(10.0, 10.0, 10.0))


def test_demo_refuses_an_existing_output(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    result = run_cli("demo", "-o", tmp_path / "demo")
    assert result.exit_code == 2 and "--overwrite" in result.stderr


@pytest.mark.parametrize("bad", [["--method", "random"], ["--sparsity", "1.5"]])
def test_demo_refuses_bad_options_before_writing(tmp_path: Path, bad: list[str]) -> None:
    result = run_cli("demo", "-o", tmp_path / "demo", *bad)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()


def test_every_demo_file_is_package_data() -> None:
    """The wheel must carry the model, tokenizer and texts: each file under perp_cli/demo
    matches a package-data pattern (scripts/check_dist.py builds the wheel to be sure)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["perp_cli"]
    shipped = [p.relative_to(ROOT / "perp_cli").as_posix() for p in DEMO_DIR.rglob("*") if p.is_file()]
    for name in ("model/model.safetensors", "model/tokenizer.json", "model/MODEL_CARD.md", "calibration.jsonl", "heldout.jsonl"):
        assert f"demo/{name}" in shipped
    for rel in shipped:
        assert any(fnmatch(rel, pattern) for pattern in patterns), f"{rel} is not package data"


def test_embedded_model_is_small_trained_and_documented() -> None:
    model_dir = files("perp_cli").joinpath("demo/model")
    assert model_dir.joinpath("model.safetensors").stat().st_size < 4e6  # a few MB at most
    config = json.loads(model_dir.joinpath("config.json").read_text())
    assert config["model_type"] == "llama" and not config["attention_bias"] and not config["mlp_bias"]
    metrics = json.loads(model_dir.joinpath("training.json").read_text())
    card = model_dir.joinpath("MODEL_CARD.md").read_text()
    assert f"{metrics['ppl_heldout_128']:.2f}" in card  # the card states the measured held-out perplexity
    assert re.search(r"ODC-BY", card)
    heldout = set(DEMO_DIR.joinpath("heldout.jsonl").read_text().splitlines())
    calibration = set(DEMO_DIR.joinpath("calibration.jsonl").read_text().splitlines())
    assert len(heldout) == len(calibration) == 50 and not heldout & calibration
