"""`perp reconstruct` end to end: a normal checkpoint with the same masks and a manifest
step with per-block errors, the dense default from the manifest, bit-identical reruns,
one-line errors with the right exit codes, and on the real tiny-opt checkpoint: Wanda
or SparseGPT followed by reconstruction beats the pruning alone on WikiText-2."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_tiny, shared_path, tree_digest
from safetensors.torch import load_file

from perp_cli import checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def _quick(calib_file: Path) -> list[str]:
    return ["--calib", str(calib_file), "--nsamples", "8", "--seqlen", "32", "--batch-size", "4",
            "--steps-per-block", "10", "--lr", "3e-3", "--device", "cpu"]


@pytest.fixture
def pruned_dir(tiny_dir: Path, calib_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "wanda60"
    result = run_cli("prune", tiny_dir, "-o", out, "--method", "wanda", "--sparsity", "0.6", "--calib", calib_file,
                     "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    return out


def test_reconstruct_writes_a_normal_checkpoint_with_per_block_errors(pruned_dir: Path, tiny_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    inputs = {p: tree_digest(p) for p in (pruned_dir, tiny_dir)}
    outs = [tmp_path / "rec-a", tmp_path / "rec-b"]
    for out in outs:  # --dense defaults to the source recorded by `perp prune`
        result = run_cli("reconstruct", pruned_dir, "-o", out, *_quick(calib_file), "--json")
        assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert Path(summary["dense"]) == tiny_dir.resolve()
    assert {p: tree_digest(p) for p in inputs} == inputs  # inputs never modified

    blocks = summary["blocks"]
    assert [b["block"] for b in blocks] == [0, 1]
    assert all(b["mse_after"] <= b["mse_before"] for b in blocks)
    assert summary["adapter"] == "masklora" and summary["trained"] == ["biases", "norms"]

    out = outs[-1]  # the run `summary` describes
    assert not (out / "adapters.safetensors").exists() and not (out / "adapters.json").exists()
    rec, pruned = checkpoint.open(out), checkpoint.open(pruned_dir)  # verifies masks and exact zeros
    assert rec.masks.names() == pruned.masks.names()
    assert all(torch.equal(rec.masks[n], pruned.masks[n]) for n in pruned.masks.names())
    history = json.loads((out / "perp.json").read_text())["history"]
    assert [h["command"] for h in history] == ["prune", "reconstruct"]
    step = history[-1]
    assert step["data"]["token_ids_sha256"] == summary["calibration"]["token_ids_sha256"]
    assert step["data"]["sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
    assert step["results"]["blocks"] == blocks and step["results"]["reconstruction_time_s"] > 0
    assert step["wall_time_s"] > 0 and step["args"]["target"] == "dense"

    # same seed: bit-identical weights
    a, b = load_file(outs[0] / "model.safetensors"), load_file(outs[1] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from transformers import AutoModelForCausalLM  # loads in plain transformers

    plain = AutoModelForCausalLM.from_pretrained(out)
    keep = rec.masks["model.decoder.layers.1.fc2.weight"]
    assert torch.all(plain.model.decoder.layers[1].fc2.weight[~keep] == 0)


def test_dense_stream_and_explicit_dense(pruned_dir: Path, tiny_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    result = run_cli("reconstruct", pruned_dir, "-o", tmp_path / "rec", "--dense", tiny_dir, "--target", "dense-stream",
                     "--train", "norms", "--adapter", "scalelora", *_quick(calib_file))
    assert result.exit_code == 0, result.stderr
    assert "reconstruct" in result.stderr and "MSE before" in result.stderr  # the Rich table
    step = json.loads((tmp_path / "rec" / "perp.json").read_text())["history"][-1]
    assert step["results"]["target"] == "dense-stream" and step["results"]["adapter"] == "scalelora"


def test_dense_is_required_when_the_manifest_has_none(pruned_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    orphan = tmp_path / "orphan"
    shutil.copytree(pruned_dir, orphan)
    manifest = json.loads((orphan / "perp.json").read_text())
    manifest["source_model"] = None
    (orphan / "perp.json").write_text(json.dumps(manifest))
    result = run_cli("reconstruct", orphan, "-o", tmp_path / "out", *_quick(calib_file))
    assert result.exit_code == 2 and "--dense" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_usage_errors(pruned_dir: Path, tiny_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    other = save_tiny(tmp_path / "other", "opt", ffn_dim=64)
    llama = save_tiny(tmp_path / "llama", "llama")
    cases = [
        (["--dense", other], "does not match"),
        (["--dense", llama], "llama"),
        (["--adapter", "lora"], "fill the pruned weights"),
        (["--train", "none", "--adapter", "none"], "trains nothing"),
        (["--train", "embeddings"], "outside the decoder blocks"),
        (["--target", "nope"], "--target"),
        (["--nsamples", "0"], "--nsamples"),
        (["--granularity", "foo"], "--granularity 'foo' is not one of block, sublayer"),
    ]
    for extra, message in cases:
        result = run_cli("reconstruct", pruned_dir, "-o", tmp_path / "out", *_quick(calib_file), *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    # an unpruned input has nothing to reconstruct
    result = run_cli("reconstruct", tiny_dir, "-o", tmp_path / "out", "--dense", tiny_dir, *_quick(calib_file))
    assert result.exit_code == 2 and "no masks" in result.stderr
    # the output exists already
    (tmp_path / "taken").mkdir()
    result = run_cli("reconstruct", pruned_dir, "-o", tmp_path / "taken", *_quick(calib_file))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sublayer_granularity_end_to_end(pruned_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    result = run_cli("reconstruct", pruned_dir, "-o", tmp_path / "out", *_quick(calib_file), "--granularity", "sublayer")
    assert result.exit_code == 0, result.stderr
    assert "sublayer" in result.stderr and "0 attention" in result.stderr and "1 mlp" in result.stderr  # the table (console on stderr)
    step = json.loads((tmp_path / "out" / "perp.json").read_text())["history"][-1]
    assert step["args"]["granularity"] == step["results"]["granularity"] == "sublayer"
    assert [(b["block"], b["part"]) for b in step["results"]["blocks"]] == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    rec, pruned = checkpoint.open(tmp_path / "out"), checkpoint.open(pruned_dir)  # verifies masks and exact zeros
    assert all(torch.equal(rec.masks[n], pruned.masks[n]) for n in pruned.masks.names())
    # interleaved pruning reconstructs whole blocks only
    result = run_cli("reconstruct", pruned_dir, "-o", tmp_path / "x", *_quick(calib_file), "--granularity", "sublayer", "--prune-method", "wanda")
    assert result.exit_code == 2 and "--granularity block only" in result.stderr


def test_sublayer_refuses_parallel_blocks(calib_file: Path, tmp_path: Path) -> None:
    import transformers as T

    from perp_cli import tiny

    dense = tmp_path / "gptj"
    torch.manual_seed(0)
    T.GPTJForCausalLM(T.GPTJConfig(vocab_size=tiny.VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
                                   bos_token_id=1, eos_token_id=2)).save_pretrained(dense)
    tiny.build_tokenizer().save_pretrained(dense)
    result = run_cli("prune", dense, "-o", tmp_path / "pruned", "--method", "magnitude", "--sparsity", "0.5", "-q")
    assert result.exit_code == 0, result.stderr
    result = run_cli("reconstruct", tmp_path / "pruned", "-o", tmp_path / "out", *_quick(calib_file), "--granularity", "sublayer")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "in parallel" in result.stderr and "--granularity block" in result.stderr
    assert not (tmp_path / "out").exists()


def test_prune_method_prunes_and_reconstructs_in_one_pass(tiny_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "interleaved"
    quick = [a for a in _quick(calib_file) if a not in ("--steps-per-block", "10")]
    result = run_cli("reconstruct", tiny_dir, "-o", out, *quick, "--prune-method", "wanda", "--recipe", "paper",
                     "--steps-per-block", "4", "--json")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["interleaved_pruning"]["method"] == "wanda"
    assert summary["interleaved_pruning"]["scope"] == "matrix"  # the paper recipe picks PERP's comparison group
    assert (summary["order"], summary["mode"], summary["restore"], summary["lr"]) == ("fixed", "train", False, 3e-3)
    rec = checkpoint.open(out)  # verifies masks and exact zeros
    assert abs(rec.masks.total_sparsity() - 0.5) < 1e-6
    step = json.loads((out / "perp.json").read_text())["history"][-1]
    assert step["args"]["prune"]["method"] == "wanda" and step["args"]["recipe"] == "paper"
    for extra, message in [
        (["--prune-method", "wanda", "--dense", tiny_dir], "--dense is not used"),
        (["--prune-method", "wanda", "--scope", "global"], "cannot interleave"),
        (["--prune-method", "wanda", "--streaming", "on"], "does not stream"),
        (["--sparsity", "0.5"], "without it MODEL is already pruned"),
        (["--prune-method", "nope"], "--method"),
        (["--recipe", "nope"], "--recipe"),
        (["--order", "nope", "--prune-method", "wanda"], "--order"),
    ]:
        result = run_cli("reconstruct", tiny_dir, "-o", tmp_path / "bad", *_quick(calib_file), *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_reconstruction_beats_pruning_alone_on_tiny_opt(method: str, tmp_path: Path) -> None:
    """Real checkpoint, real data: 60% unstructured, then reconstruction (biases, norms,
    MaskLoRA) on the same C4 windows; WikiText-2 test perplexity on the first 24
    windows of 256 tokens must drop."""
    model = shared_path("models", "tiny-opt")
    c4 = shared_path("data", "c4", "c4-train.00000-of-01024.first1000.jsonl")
    wiki = shared_path("data", "wikitext-2-raw", "wiki.test.raw")
    calib = ["--calib", c4, "--nsamples", "16", "--seqlen", "128", "--device", "cpu"]
    pruned, rec = tmp_path / "pruned", tmp_path / "rec"
    assert run_cli("prune", model, "-o", pruned, "--method", method, "--sparsity", "0.6", *calib, "-q").exit_code == 0
    result = run_cli("reconstruct", pruned, "-o", rec, *calib, "--batch-size", "4", "--steps-per-block", "40", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert Path(result.json()["dense"]) == model.resolve()

    from perp_cli import data
    from perp_cli.perplexity import eval_token_ids, perplexity

    base = checkpoint.open(pruned, need_tokenizer=True)
    ids = eval_token_ids(base.tokenizer, data.load_source(str(wiki)), 256)
    before = perplexity(base.model, ids, 256, batch_size=8, max_windows=24).ppl
    after = perplexity(checkpoint.open(rec).model, ids, 256, batch_size=8, max_windows=24).ppl
    print(f"{method} 60%: {before:.2f} -> {after:.2f}")
    assert after < before, (method, before, after)
