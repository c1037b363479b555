"""`perp merge`: retrained adapters folded in, masks kept, function unchanged, LoRA guarded."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from conftest import random_tokens, run_cli, save_tiny

from perp_cli import adapters, checkpoint, mask

IDS = random_tokens(2, 24, 11, high=260)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    corpus = root / "corpus.txt"
    corpus.write_text(files("perp_cli").joinpath("demo/corpus.txt").read_text(encoding="utf-8"), encoding="utf-8")
    dense = save_tiny(root / "dense", "gpt2")  # Conv1D: the transposed layout end to end
    result = run_cli("prune", dense, "-o", root / "pruned", "--method", "magnitude", "--sparsity", "0.6", "-q")
    assert result.exit_code == 0, result.stderr
    return {"root": root, "corpus": corpus, "pruned": root / "pruned"}


def retrained(work, kind: str) -> Path:
    out = work["root"] / f"rt-{kind}"
    if not out.exists():
        result = run_cli("retrain", work["pruned"], "-o", out, "--data", work["corpus"], "--seqlen", "32", "--steps", "3",
                         "--batch-size", "2", "--lr", "2e-2", "--adapter", kind, "--rank", "4", "-q")
        assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("kind", ["masklora", "scalelora", "multlora", "lora-prune"])
def test_merge_keeps_masks_and_function(work, kind):
    src = retrained(work, kind)
    out = work["root"] / f"merged-{kind}"
    result = run_cli("merge", src, "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["masks_kept"] and summary["probe_relative_diff"] <= 1e-4
    assert summary["adapter"] == ("scalelora" if kind == "multlora" else kind)
    assert not (out / "adapters.safetensors").exists() and not (out / "adapters.json").exists()

    unmerged = checkpoint.open(src)
    adapters.attach_from_checkpoint(unmerged)
    merged = checkpoint.open(out)  # verifies masked weights are zero
    with torch.no_grad():
        assert torch.allclose(merged.model(IDS).logits, unmerged.model(IDS).logits, atol=1e-5, rtol=1e-4)
    assert merged.masks.masks.keys() == unmerged.masks.masks.keys()
    for name, keep in merged.masks.masks.items():
        assert torch.equal(keep, unmerged.masks[name])
        assert mask.nonzeros_outside(merged.model.get_parameter(name), keep) == 0
    history = json.loads((out / "perp.json").read_text())["history"]
    assert [h["command"] for h in history] == ["prune", "retrain", "merge"]
    assert "adapters" not in json.loads((out / "perp.json").read_text())


def test_plain_lora_needs_allow_densify(work):
    src = retrained(work, "lora")
    refused = run_cli("merge", src, "-o", work["root"] / "merged-lora", "-q")
    assert refused.exit_code == 2 and "--allow-densify" in refused.stderr
    assert not (work["root"] / "merged-lora").exists()
    ok = run_cli("merge", src, "-o", work["root"] / "merged-lora", "--allow-densify", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert "dense" in ok.stderr and ok.json()["densified_density"] > 0.99
    assert not (work["root"] / "merged-lora" / "masks.safetensors").exists()
    manifest = json.loads((work["root"] / "merged-lora" / "perp.json").read_text())
    assert "pattern" not in manifest and "masks_sha256" not in manifest  # no masks, so nothing describes them


def test_merge_without_adapters_is_a_usage_error(work):
    result = run_cli("merge", work["pruned"], "-o", work["root"] / "never", "-q")
    assert result.exit_code == 2 and "nothing to merge" in result.stderr
    assert not (work["root"] / "never").exists()


def test_merge_on_llama_after_add_biases(tmp_path, work):
    """A family without biases: --add-biases + masklora, then merge, loads as plain transformers."""
    dense = save_tiny(tmp_path / "llama", "llama")
    assert run_cli("prune", dense, "-o", tmp_path / "p", "--method", "magnitude", "--sparsity", "0.5", "-q").exit_code == 0
    rt = run_cli("retrain", tmp_path / "p", "-o", tmp_path / "rt", "--data", work["corpus"], "--seqlen", "32", "--steps", "2",
                 "--batch-size", "2", "--train", "biases,norms", "--add-biases", "--adapter", "masklora", "-q")
    assert rt.exit_code == 0, rt.stderr
    assert run_cli("merge", tmp_path / "rt", "-o", tmp_path / "m", "-q").exit_code == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.attention_bias
    reference = checkpoint.open(tmp_path / "rt")
    adapters.attach_from_checkpoint(reference)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, reference.model(IDS).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["masklora", "lora-prune"])
def test_streamed_merge_of_a_retrained_checkpoint_is_the_in_memory_merge(work, kind):
    """`perp retrain` output (GPT-2: Conv1D, tied head), merged block by block: the same
    tensors and masks, bit for bit, as the in-memory merge (tested per family and
    adapter type in test_streaming_merge.py)."""
    from safetensors.torch import load_file

    src = retrained(work, kind)
    memory, streamed = work["root"] / f"merged-{kind}", work["root"] / f"streamed-{kind}"
    if not memory.exists():
        assert run_cli("merge", src, "-o", memory, "-q").exit_code == 0
    result = run_cli("merge", src, "-o", streamed, "--streaming", "on", "--json")
    assert result.exit_code == 0, result.stderr
    assert "streaming (--streaming on)" in result.stderr and "no whole-model logits probe" in result.stderr
    assert result.json()["streaming"] and result.json()["probe_relative_diff"] is None
    for name in ("model.safetensors", "masks.safetensors"):
        a, b = load_file(memory / name), load_file(streamed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    step = json.loads((streamed / "perp.json").read_text())["history"][-1]
    assert step["args"]["streaming"] and step["results"]["checks"] == ["finite", "masks", "matrix_probe"]
