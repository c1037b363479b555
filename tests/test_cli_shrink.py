"""`perp shrink` end to end: a plain Hugging Face directory out, recovery accepts it, and
bad requests fail with one line, exit 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, save_tiny, shared_path

CORPUS = Path(__file__).resolve().parents[1] / "perp_cli" / "demo" / "corpus.txt"
CALIB = ["--calib", str(CORPUS), "--calib-concat", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("shrink") / "llama", "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def shrunk(llama: Path) -> dict[str, Path]:
    out = {}
    for structure, amount in (("depth", ["--remove-blocks", "1"]), ("width", ["--remove-ratio", "0.25"])):
        out[structure] = llama.parent / structure
        result = run_cli("shrink", llama, "-o", out[structure], "--structure", structure, *amount, *CALIB, "--json", "-q")
        assert result.exit_code == 0, result.stderr
    return out


def test_output_is_a_smaller_plain_checkpoint(llama, shrunk, one_thread):
    dense = _load(llama)
    for structure, path in shrunk.items():
        assert not (path / "masks.safetensors").exists()
        small = _load(path)
        manifest = json.loads((path / "perp.json").read_text())
        step = manifest["history"][-1]
        assert step["command"] == "shrink" and step["results"]["structure"] == structure
        assert step["results"]["parameters"] == {"before": _count(dense), "after": _count(small),
                                                 "removed_fraction": step["results"]["parameters"]["removed_fraction"]}
        assert _count(small) < _count(dense)
        with torch.no_grad():
            assert torch.isfinite(small(input_ids=torch.arange(4, 20)[None]).logits).all()
    assert _load(shrunk["depth"]).config.num_hidden_layers == 2
    assert _load(shrunk["width"]).config.intermediate_size == 96


def test_retrain_lora_merges_without_allow_densify(shrunk, tmp_path, one_thread):
    trained = tmp_path / "lora"
    result = run_cli("retrain", shrunk["width"], "-o", trained, "--train", "norms", "--adapter", "lora", "--data", CORPUS,
                     "--steps", "2", "--seqlen", "32", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    result = run_cli("merge", trained, "-o", tmp_path / "merged", "-q")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "merged" / "masks.safetensors").exists()
    _load(tmp_path / "merged")


@pytest.mark.parametrize("structure", ["depth", "width"])
def test_reconstruct_against_the_source_model(shrunk, structure, tmp_path, one_thread):
    out = tmp_path / "rec"
    result = run_cli("reconstruct", shrunk[structure], "-o", out, "--train", "norms", "--adapter", "lora", "--rank", "4",
                     "--steps-per-block", "3", "--batch-size", "2", *CALIB, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    blocks = result.json()["blocks"]
    assert len(blocks) == (2 if structure == "depth" else 3)
    assert not (out / "masks.safetensors").exists()
    _load(out)


def test_reconstruct_default_adapter_needs_masks(shrunk, tmp_path):
    result = run_cli("reconstruct", shrunk["width"], "-o", tmp_path / "rec", "--train", "norms", *CALIB, "-q")
    assert result.exit_code == 2 and "no masks.safetensors" in result.stderr
    assert not (tmp_path / "rec").exists()


@pytest.mark.parametrize(
    ("family", "args", "message"),
    [
        ("llama", ["--structure", "depth", "--remove-blocks", "3"], "removes all 3"),
        ("llama", ["--structure", "depth", "--keep-ratio", "0.1"], "removes all 3"),
        ("llama", ["--structure", "heads", "--remove-heads", "6"], "removes all 4 attention heads"),
        ("llama", ["--structure", "heads", "--remove-heads", "1"], "not a multiple of 2"),
        ("llama", ["--structure", "experts", "--remove-experts", "1"], "dense model"),
        ("llama", ["--structure", "width"], "exactly one of --remove-ratio or --remove-channels"),
        ("llama", ["--structure", "width", "--remove-ratio", "0.5", "--remove-channels", "3"], "exactly one"),
        ("llama", ["--structure", "width", "--remove-blocks", "1"], "does not apply"),
        ("llama", ["--structure", "width", "--remove-ratio", "1.5"], "must be in (0, 1)"),
        ("llama", ["--structure", "bricks", "--remove-ratio", "0.5"], "is not one of"),
        ("opt", ["--structure", "heads", "--remove-ratio", "0.5"], "cannot be written"),
    ],
)
def test_bad_requests_fail_cleanly(llama, tmp_path, family, args, message):
    model = llama if family == "llama" else save_tiny(tmp_path / family, family)
    out = tmp_path / "out"
    result = run_cli("shrink", model, "-o", out, *args, *CALIB)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.perp-tmp-*"))


def test_pruned_input_is_refused(llama, tmp_path):
    pruned = tmp_path / "pruned"
    assert run_cli("prune", llama, "-o", pruned, "--method", "magnitude", "-q").exit_code == 0
    result = run_cli("shrink", pruned, "-o", tmp_path / "out", "--structure", "depth", "--remove-blocks", "1", *CALIB)
    assert result.exit_code == 2 and "has pruning masks" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("model", "structure", "amount"), [
    ("stories260K", "depth", "0.4"), ("stories260K", "width", "0.25"), ("stories260K", "heads", "0.5"),
    ("tiny-opt", "depth", "0.25"), ("tiny-opt", "width", "0.5"),
])
def test_shared_checkpoints(model, structure, amount, tmp_path, one_thread):
    source = shared_path("models", model)
    c4 = shared_path("data", "c4", "c4-train.00000-of-01024.first1000.jsonl")
    out = tmp_path / "out"
    result = run_cli("shrink", source, "-o", out, "--structure", structure, "--remove-ratio", amount, "--calib", c4,
                     "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    small, dense = _load(out), _load(source)
    assert _count(small) == result.json()["parameters"]["after"] < _count(dense)
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=torch.arange(4, 40)[None]).logits).all()


def test_eval_compares_with_the_original(llama, shrunk, one_thread):
    result = run_cli("eval", llama, shrunk["depth"], shrunk["width"], "-d", CORPUS, "--seqlen", "32", "--max-windows", "2",
                     "--device", "cpu", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert "perplexity" in result.stdout and str(shrunk["width"]) in result.stdout
