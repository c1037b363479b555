"""`perp eval`: side-by-side results, recording, JSON output, and exit codes for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import magnitude_masks, run_cli, save_tiny, tree_digest
from perp_cli import arch, checkpoint
from perp_cli.data import load_source
from perp_cli.manifest import StepRecord, sha256_file
from perp_cli.perplexity import eval_token_ids, perplexity

TASK_DIR = Path(__file__).parent / "data" / "tiny_mc"


@pytest.fixture
def dense_and_pruned(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny dense OPT directory and a 50% magnitude-pruned perp checkpoint of it whose
    history carries a retrain step reporting its trainable share."""
    dense = save_tiny(tmp_path / "dense", "opt", seed=0)
    ckpt = checkpoint.open(dense)
    masks = magnitude_masks(ckpt.model, 0.5)
    manifest = dict(ckpt.manifest)
    manifest["history"] = [StepRecord("retrain", {}, str(dense), results={"trainable_share": 0.0125}).finish()]
    pruned = tmp_path / "pruned"
    checkpoint.save(pruned, ckpt.model, ckpt.tokenizer, masks, manifest, StepRecord("prune", {"sparsity": 0.5}, str(dense)))
    return dense, pruned


def _direct_ppl(directory: Path, data: Path, seqlen: int) -> float:
    ckpt = checkpoint.open(directory)
    ids = eval_token_ids(ckpt.tokenizer, load_source(str(data), "test"), seqlen)
    return perplexity(ckpt.model, ids, seqlen).ppl


def test_side_by_side_results_and_inputs_untouched(dense_and_pruned, calib_file: Path) -> None:
    dense, pruned = dense_and_pruned
    before = {d: tree_digest(d, mtimes=True) for d in (dense, pruned)}
    result = run_cli("eval", dense, pruned, "--dataset", calib_file, "--seqlen", "64", "--batch-size", "4", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    out = result.json()["results"]
    assert [r["model"] for r in out] == [str(dense), str(pruned)]
    label = calib_file.name
    for r, d in zip(out, (dense, pruned)):
        ppl = r["perplexity"][label]
        assert ppl["ppl"] == pytest.approx(_direct_ppl(d, calib_file, 64), rel=1e-9)
        assert ppl["seqlen"] == 64 and ppl["windows"] == ppl["tokens"] // 64 and ppl["add_bos"] is False
        assert ppl["source_sha256"] == sha256_file(calib_file)
    assert out[0]["sparsity"] == 0.0 and out[0]["sparsity_from"] == "measured" and out[0]["trainable_share"] is None
    assert out[1]["sparsity"] == pytest.approx(0.5, abs=0.01) and out[1]["sparsity_from"] == "manifest"
    assert out[1]["trainable_share"] == 0.0125
    assert out[1]["perplexity"][label]["ppl"] != out[0]["perplexity"][label]["ppl"]
    # the table on stderr: one row per directory
    for word in ("sparsity", "trainable", f"ppl {label}", "50.00%", "1.250%"):
        assert word in result.stderr.replace("\n", " ") or word in result.stderr, word
    # eval never writes to a checkpoint
    assert {d: tree_digest(d, mtimes=True) for d in (dense, pruned)} == before


def test_record_appends_to_the_manifest_only(dense_and_pruned, calib_file: Path, tmp_path: Path) -> None:
    _, pruned = dense_and_pruned
    before = tree_digest(pruned, mtimes=True)
    old = json.loads((pruned / "perp.json").read_text())
    out_file = tmp_path / "results.json"
    args = ("eval", pruned, "-d", calib_file, "--seqlen", "32", "--max-windows", "3", "--record", "-q", "--json", "-o", out_file)
    first = run_cli(*args)
    assert first.exit_code == 0, first.stderr
    assert json.loads(out_file.read_text()) == first.json()
    assert run_cli(*args).exit_code == 0
    after = tree_digest(pruned, mtimes=True)
    assert {k: v for k, v in after.items() if k != "perp.json"} == {k: v for k, v in before.items() if k != "perp.json"}
    manifest = json.loads((pruned / "perp.json").read_text())
    assert len(manifest["evaluations"]) == 2
    entry = manifest["evaluations"][0]
    assert entry["command"] == "eval" and entry["args"]["max_windows"] == 3
    assert entry["results"]["perplexity"][calib_file.name]["windows"] == 3
    assert entry["data"][calib_file.name]["token_ids_sha256"]
    assert {k: v for k, v in manifest.items() if k != "evaluations"} == old  # history, masks hash untouched
    assert checkpoint.open(pruned).masks is not None  # still a valid checkpoint
    assert not list(pruned.glob(".perp.json*"))  # no temp file left behind


def test_record_eval_on_a_plain_directory_creates_a_manifest(tmp_path: Path) -> None:
    plain = save_tiny(tmp_path / "plain", "llama")
    checkpoint.record_eval(plain, {"command": "eval", "results": {"x": 1}})
    manifest = checkpoint.read_manifest(plain)
    assert manifest["evaluations"] == [{"command": "eval", "results": {"x": 1}}] and manifest["history"] == []


def test_zero_shot_and_perplexity_in_one_run(dense_and_pruned, calib_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'perp[eval]')")
    monkeypatch.chdir(TASK_DIR)  # the task's local data file is resolved from the working directory
    dense, pruned = dense_and_pruned
    result = run_cli("eval", dense, pruned, "-d", calib_file, "--seqlen", "64", "--max-windows", "2",
                     "--tasks", "perp_tiny_mc", "--include-path", TASK_DIR, "--limit", "6", "--json")
    assert result.exit_code == 0, result.stderr
    for r in result.json()["results"]:
        zs = r["zeroshot"]
        assert zs["tasks"]["perp_tiny_mc"]["samples"] == 6
        assert zs["mean_acc"] == zs["tasks"]["perp_tiny_mc"]["acc"]
        assert r["perplexity"][calib_file.name]["windows"] == 2
    assert "mean acc" in result.stderr and "perp_tiny_mc" in result.stderr


def test_tasks_only_skips_perplexity(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'perp[eval]')")
    monkeypatch.chdir(TASK_DIR)
    result = run_cli("eval", tiny_dir, "--tasks", "perp_tiny_mc", "--include-path", TASK_DIR, "--limit", "3", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.json()["results"][0]["perplexity"] == {}


def test_missing_lm_eval_exits_1_with_install_hint(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = run_cli("eval", tiny_dir, "--tasks", "boolq")
    assert result.exit_code == 1
    assert "pip install 'perp[eval]'" in result.stderr and result.stderr.strip().count("\n") == 0


def _save_with_masklora(pruned: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """`pruned` plus unmerged MaskLoRA adapters (rank 4, alpha 8) with nonzero B."""
    from perp_cli import adapters

    ckpt = checkpoint.open(pruned)
    torch.manual_seed(0)
    attached = adapters.attach(ckpt.model, "masklora", rank=4, alpha=8.0, masks=ckpt.masks)
    with torch.no_grad():
        for a in attached.values():
            a.lora_B.normal_(0.0, 0.5)
    tensors, config = adapters.state_dict(attached), adapters.config(attached, None)
    adapters.detach(ckpt.model)
    checkpoint.save(out, ckpt.model, ckpt.tokenizer, ckpt.masks, ckpt.manifest, StepRecord("retrain", {}, str(pruned)),
                    adapters=tensors, adapters_config=config)
    return tensors, config


def test_unmerged_adapters_are_applied(dense_and_pruned, calib_file: Path, tmp_path: Path) -> None:
    _, pruned = dense_and_pruned
    out = tmp_path / "with-adapters"
    tensors, config = _save_with_masklora(pruned, out)
    # expected, by hand: W + (alpha / r) * (M * BA) written into a plain copy of the model
    plain = checkpoint.open(pruned)
    by_name = {m.name: m for m in arch.matrices(plain.model)}
    with torch.no_grad():
        for key in config["matrices"]:
            update = tensors[f"{key}.lora_B"] @ tensors[f"{key}.lora_A"]
            by_name[key].weight().add_((8.0 / 4) * plain.masks[key].float() * update)
    ids = eval_token_ids(plain.tokenizer, load_source(str(calib_file), "test"), 32)
    expected = perplexity(plain.model, ids, 32, max_windows=4).ppl
    result = run_cli("eval", out, pruned, "-d", calib_file, "--seqlen", "32", "--max-windows", "4", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    adapted, base = result.json()["results"]
    assert adapted["adapters"]["type"] == "masklora" and base["adapters"] is None
    assert adapted["perplexity"][calib_file.name]["ppl"] == pytest.approx(expected, rel=1e-5)
    assert adapted["perplexity"][calib_file.name]["ppl"] != pytest.approx(base["perplexity"][calib_file.name]["ppl"], rel=1e-3)
    assert adapted["sparsity"] == base["sparsity"]


def test_adapters_without_adapter_support_exit_1(dense_and_pruned, calib_file: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "with-adapters"
    _save_with_masklora(dense_and_pruned[1], out)
    monkeypatch.setitem(sys.modules, "perp_cli.adapters", None)  # a build without the adapters module
    result = run_cli("eval", out, "-d", calib_file, "--seqlen", "32", "--max-windows", "1")
    assert result.exit_code == 1 and "adapters" in result.stderr and "perp merge" in result.stderr


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (("--seqlen", "100000"), 2, "exceeds the model's 256 positions"),
        (("--seqlen", "1"), 2, "at least 2"),
        (("--max-windows", "0"), 2, "at least 1"),
        (("--batch-size", "0"), 2, "at least 1"),
        (("--dtype", "float8"), 2, "--dtype"),
    ],
)
def test_bad_options_exit_2(tiny_dir: Path, calib_file: Path, extra, code: int, message: str) -> None:
    result = run_cli("eval", tiny_dir, "-d", calib_file, *extra)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 0


def test_bad_inputs_fail_before_any_model_loads(tiny_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    missing = run_cli("eval", tiny_dir, tmp_path / "nope", "-d", calib_file)
    assert missing.exit_code == 2 and "no such directory" in missing.stderr
    bad_path = run_cli("eval", tiny_dir, "-d", tmp_path / "no-such-file.txt")
    assert bad_path.exit_code == 2 and "no-such-file.txt" in bad_path.stderr
    (tmp_path / "data.csv").write_text("a,b\n")
    assert run_cli("eval", tiny_dir, "-d", tmp_path / "data.csv").exit_code == 2
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    too_short = run_cli("eval", tiny_dir, "-d", short, "--seqlen", "64")
    assert too_short.exit_code == 1 and "fewer than one window" in too_short.stderr
    inside = run_cli("eval", tiny_dir, "-d", calib_file, "-o", tiny_dir / "results.json")
    assert inside.exit_code == 2 and not (tiny_dir / "results.json").exists()
    assert run_cli("eval", "--dataset", calib_file).exit_code == 2  # no directory at all


def test_help_documents_every_option() -> None:
    result = run_cli("eval", "--help")
    assert result.exit_code == 0
    for option in ("--dataset", "--seqlen", "--batch-size", "--max-windows", "--add-bos", "--tasks", "--limit",
                   "--include-path", "--output", "--record", "--json", "--dtype", "--device", "--quiet"):
        assert option in result.stdout, option


def test_hub_dataset_offline_exits_1_with_a_hint(tiny_dir: Path) -> None:
    """conftest makes the hub unreachable; the default dataset (wikitext2) then fails clearly."""
    result = run_cli("eval", tiny_dir)
    assert result.exit_code == 1
    assert "wikitext2" in result.stderr and "local file" in result.stderr and result.stderr.strip().count("\n") == 0
