"""Each recipe's `run(config)` called directly (no CLI) on a tiny model: the output it
writes, the step perp.json records, exact sparsity, and silence (the library never
prints; a quiet run writes nothing on stdout or stderr)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_same_tensors, read_weights, save_tiny
from perp_cli import checkpoint, data
from perp_cli.errors import UsageError
from perp_cli.evaluation import EvalSettings
from perp_cli.pruner import PruneConfig
from perp_cli.reconstruction import ReconstructConfig
from perp_cli.recipes import evaluate, merge, prune, reconstruct, retrain, shrink
from perp_cli.shrinking import ShrinkConfig
from perp_cli.training import TrainConfig

CORPUS = str(Path(__file__).resolve().parents[1] / "perp_cli" / "demo" / "corpus.txt")
CALIB = dict(calib=CORPUS, calib_concat=True, nsamples=4, seqlen=32)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("recipes") / "dense", "llama")


@pytest.fixture(scope="module")
def pruned(dense: Path) -> Path:
    out = dense.parent / "pruned"
    prune.run(prune.Config(model=str(dense), output=out, prune=PruneConfig("wanda", sparsity=0.5, device="cpu", **CALIB)))
    return out


def _last_step(path: Path) -> dict:
    return json.loads((path / "perp.json").read_text())["history"][-1]


def _masked_weights_are_zero(path: Path) -> float:
    """The fraction of masked weights over the masked tensors, after checking each is exactly 0 under its mask."""
    ckpt = checkpoint.open(path, need_tokenizer=False)
    params = dict(ckpt.model.named_parameters())
    kept = total = 0
    for name, keep in ckpt.masks.masks.items():
        weight = params[name].detach()
        assert torch.all(weight.reshape(keep.shape)[~keep] == 0), name
        kept, total = kept + int(keep.sum()), total + keep.numel()
    return 1 - kept / total


def test_prune_writes_the_masks_and_the_calibration_record_silently(pruned: Path, dense: Path, capsys, one_thread) -> None:
    step = _last_step(pruned)
    assert step["command"] == "prune" and step["args"]["calib"] == CORPUS
    assert step["data"]["shape"] == [4, 32] and step["data"]["concat"] is True  # sampled by the recipe
    assert step["results"]["sparsity_achieved"]["pruned_tensors"] == 0.5  # wanda row scope: exactly half of every row
    assert _masked_weights_are_zero(pruned) == 0.5
    out = dense.parent / "pruned-again"
    outcome = prune.run(prune.Config(model=str(dense), output=out, streaming="on",
                                     prune=PruneConfig("wanda", sparsity=0.5, device="cpu", **CALIB)))
    assert outcome.streaming and outcome.data == step["data"]
    assert_same_tensors(read_weights(out), read_weights(pruned))  # streamed: the same bytes
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_prune_refuses_before_reading_data(dense: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--dense is for --method keep"):
        prune.run(prune.Config(model=str(dense), output=tmp_path / "x", dense=str(dense), prune=PruneConfig("wanda", calib="missing.txt")))
    assert not (tmp_path / "x").exists()


def test_retrain_then_merge_keep_every_pruned_weight_zero(pruned: Path, tmp_path: Path, calib_file: Path, capsys, one_thread) -> None:
    retrained, merged = tmp_path / "retrained", tmp_path / "merged"
    outcome = retrain.run(retrain.Config(
        model=str(pruned), output=retrained, options=retrain.RetrainOptions(train="norms", adapter="masklora", rank=2),
        train=TrainConfig(steps=2, batch_size=2, lr=1e-2), data=str(calib_file), seqlen=32, steps=2, device="cpu",
    ))
    assert outcome.written and outcome.results["steps"] == 2 and outcome.results["adapters"] > 0
    assert (retrained / "adapters.safetensors").exists() and _last_step(retrained)["command"] == "retrain"
    out = merge.run(merge.Config(model=str(retrained), output=merged))
    assert out.report.masks_kept and not out.streaming and _last_step(merged)["command"] == "merge"
    assert not (merged / "adapters.safetensors").exists()
    assert _masked_weights_are_zero(merged) == 0.5
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_reconstruct_against_the_recorded_dense_model(pruned: Path, dense: Path, tmp_path: Path, capsys, one_thread) -> None:
    out = tmp_path / "reconstructed"
    outcome = reconstruct.run(reconstruct.Config(
        model=str(pruned), output=out, reconstruct=ReconstructConfig(train="norms", steps_per_block=2, batch_size=2, rank=2, device="cpu", **CALIB),
    ))
    assert outcome.dense == str(dense) and outcome.data["shape"] == [4, 32]
    step = _last_step(out)
    assert step["command"] == "reconstruct" and step["args"]["dense"] == str(dense) and step["data"] == outcome.data
    assert len(outcome.results["blocks"]) == 2
    assert _masked_weights_are_zero(out) == 0.5
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_reconstruct_validates_its_config_before_loading(pruned: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fill the pruned weights"):
        reconstruct.run(reconstruct.Config(model=str(pruned), output=tmp_path / "x", reconstruct=ReconstructConfig(adapter="lora")))
    assert not (tmp_path / "x").exists()


def test_shrink_writes_a_smaller_dense_model(dense: Path, tmp_path: Path, capsys, one_thread) -> None:
    out = tmp_path / "shrunk"
    outcome = shrink.run(shrink.Config(model=str(dense), output=out,
                                       shrink=ShrinkConfig(structure="depth", remove_count=1, device="cpu", **CALIB)))
    assert outcome.results["sizes"]["num_hidden_layers"] == [2, 1]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert _last_step(out)["data"] == outcome.data and not (out / "masks.safetensors").exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_evaluate_scores_each_model_and_writes_the_summary(dense: Path, pruned: Path, tmp_path: Path, capsys, one_thread) -> None:
    report = tmp_path / "eval.json"
    settings = EvalSettings(datasets=[CORPUS], seqlen=32, max_windows=2, device="cpu")
    outcome = evaluate.run(evaluate.Config([str(dense), str(pruned)], settings, output=report))
    assert [r["model"] for r in outcome.results] == [str(dense), str(pruned)]
    assert outcome.results[1]["sparsity"] > outcome.results[0]["sparsity"]
    assert json.loads(report.read_text())["results"][0]["perplexity"]["corpus.txt"]["windows"] == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_calibration_is_sampled_once_with_its_record(dense: Path) -> None:
    ckpt = checkpoint.open(dense, need_tokenizer=True)
    config = data.CalibrationConfig(**CALIB)
    first, second = data.calibration(ckpt.tokenizer, ckpt.model, config, 0), data.calibration(ckpt.tokenizer, ckpt.model, config, 0)
    assert torch.equal(first.tokens, second.tokens) and first.record == second.record
    assert data.calibration_of(lambda: first) is first
    assert data.calibration_of(first.tokens).record["source"] == "tokens given by the caller"
