"""`perp prune` end to end: output directory, manifest, JSON, reproducibility, untouched
inputs, and one-line errors with the right exit codes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perp_cli import checkpoint

from conftest import run_cli, save_tiny, tree_digest


pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(calib_file: Path) -> list[str]:
    return ["--calib", str(calib_file), "--nsamples", "4", "--seqlen", "64", "--device", "cpu"]


def test_prune_writes_a_consistent_checkpoint_with_manifest_and_json(tiny_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    before = tree_digest(tiny_dir)
    out = tmp_path / "pruned"
    result = run_cli("prune", tiny_dir, "-o", out, "--method", "sparsegpt", "--sparsity", "0.6", *_calib(calib_file), "--json")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["method"] == "sparsegpt" and summary["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert summary["calibration"]["shape"] == [4, 64] and len(summary["calibration"]["token_ids_sha256"]) == 64
    assert tree_digest(tiny_dir) == before  # the input is never modified

    ckpt = checkpoint.open(out)  # verifies mask hash, exact zeros, finiteness
    assert ckpt.masks is not None and len(ckpt.masks) == 12
    step = json.loads((out / "perp.json").read_text())["history"][-1]
    assert step["command"] == "prune" and step["args"]["method"] == "sparsegpt" and step["seed"] == 0
    assert step["data"]["token_ids_sha256"] == summary["calibration"]["token_ids_sha256"]
    assert step["data"]["sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
    assert set(step["results"]["sparsity_achieved"]["per_tensor"]) == set(ckpt.masks.names())
    assert step["results"]["pruning_time_s"] > 0 and "host_rss_mib" in step["peak_memory"]

    from transformers import AutoModelForCausalLM  # a plain transformers load works

    plain = AutoModelForCausalLM.from_pretrained(out)
    w = plain.model.decoder.layers[0].fc1.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nm_output_passes_inspect_and_is_bit_identical_for_the_same_seed(tiny_dir: Path, calib_file: Path, tmp_path: Path, method: str) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = run_cli("prune", tiny_dir, "-o", out, "--method", method, "--pattern", "2:4", *_calib(calib_file), "-q")
        assert result.exit_code == 0, result.stderr
    assert run_cli("inspect", outs[0], "--expect-pattern", "2:4", "--expect-sparsity", "0.5", "-q").exit_code == 0
    for name in ("model.safetensors", "masks.safetensors"):
        a, b = load_file(outs[0] / name), load_file(outs[1] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pruning_a_pruned_checkpoint_keeps_old_zeros(tiny_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "m50", tmp_path / "w70"
    assert run_cli("prune", tiny_dir, "-o", first, "--method", "magnitude", "-q").exit_code == 0
    result = run_cli("prune", first, "-o", second, "--method", "wanda", "--sparsity", "0.7", *_calib(calib_file), "--json", "-q")
    assert result.exit_code == 0, result.stderr
    old, new = checkpoint.open(first).masks, checkpoint.open(second).masks
    assert all(not (new[n] & ~old[n]).any() for n in old.names())
    history = json.loads((second / "perp.json").read_text())["history"]
    assert [h["command"] for h in history] == ["prune", "prune"]


def test_skip_indivisible_reports_what_stayed_dense(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "odd", "opt", ffn_dim=120)
    failed = run_cli("prune", src, "-o", tmp_path / "x", "--method", "magnitude", "--pattern", "8:16")
    assert failed.exit_code == 2 and "fc2" in failed.stderr and "--skip-indivisible" in failed.stderr
    assert not (tmp_path / "x").exists()
    result = run_cli("prune", src, "-o", tmp_path / "y", "--method", "magnitude", "--pattern", "8:16", "--skip-indivisible", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.json()["skipped_indivisible"] == ["model.decoder.layers.0.fc2.weight", "model.decoder.layers.1.fc2.weight"]


@pytest.mark.parametrize("args,needle", [
    (["--method", "obs"], "--method"),
    (["--method", "magnitude", "--sparsity", "1.0"], "--sparsity"),
    (["--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.7"], "2:4"),
    (["--method", "magnitude", "--pattern", "3:2"], "0 < N < M"),
    (["--method", "wanda", "--pattern", "2:4", "--scope", "row"], "--scope"),
    (["--method", "sparsegpt", "--scope", "global"], "global"),
    (["--method", "magnitude", "--targets", "nothing_matches"], "--targets"),
    (["--method", "magnitude", "--exclude", "[oops"], "--exclude"),
    (["--method", "wanda", "--calib", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--method", "wanda", "--calib", "{calib}", "--seqlen", "100000"], "--seqlen"),
    (["--method", "wanda", "--calib", "{calib}", "--nsamples", "0"], "--nsamples"),
])
def test_bad_requests_are_one_line_usage_errors(tiny_dir: Path, calib_file: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    result = run_cli("prune", tiny_dir, "-o", out, *[a.replace("{calib}", str(calib_file)) for a in args])
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and result.stderr.strip().count("\n") == 0
    assert not out.exists()


def test_runtime_failures_exit_1_and_write_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    out = tmp_path / "out"
    result = run_cli("prune", tiny_dir, "-o", out, "--method", "wanda", "--calib", short, "--seqlen", "64")
    assert result.exit_code == 1 and "fewer than one window" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert run_cli("prune", tmp_path / "missing", "-o", out, "--method", "magnitude").exit_code == 1


def test_existing_output_needs_overwrite(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("prune", tiny_dir, "-o", out, "--method", "random", "-q").exit_code == 0
    again = run_cli("prune", tiny_dir, "-o", out, "--method", "random", "-q")
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert run_cli("prune", tiny_dir, "-o", out, "--method", "random", "--overwrite", "-q").exit_code == 0


def test_help_documents_every_option() -> None:
    result = run_cli("prune", "--help")
    assert result.exit_code == 0
    for option in ("--method", "--sparsity", "--pattern", "--scope", "--targets", "--exclude", "--skip-indivisible",
                   "--calib", "--text-field", "--nsamples", "--seqlen", "--calib-concat", "--damp", "--blocksize",
                   "--batch-size", "--offload-activations", "--seed", "--device", "--json"):
        assert option in result.stdout, option
    assert "[default: 128]" in result.stdout and "[default: 0.01]" in result.stdout
