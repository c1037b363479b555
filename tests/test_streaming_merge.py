"""Streaming `perp merge`: the same output, bit for bit, as the in-memory merge; only one
block's weights, masks and adapters in memory at a time; the in-memory merge's refusals
and checks, with nothing written on failure; the manifest says which checks ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, read_weights, run_cli, shared_path
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from perp_cli import adapters, arch, checkpoint, mask, merging, shards, streaming, tiny
from perp_cli.manifest import StepRecord, empty_manifest
from perp_cli.mask import MaskSet


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small tensor ops on 2 shared cores are many times faster single-threaded."""
    yield


def _masks(model: torch.nn.Module, sparsity: float = 0.6) -> MaskSet:
    """Magnitude masks per matrix (per expert slice for fused experts), applied."""
    masks: dict[str, torch.Tensor] = {}
    for m in arch.matrices(model):
        w = m.weight()
        keep = w.abs() > w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values
        if m.expert is None:
            masks[m.name] = m.to_param_layout(keep).contiguous()
        else:
            masks.setdefault(m.name, torch.ones(m.parameter.shape, dtype=torch.bool))[m.expert] = keep
    ms = MaskSet(masks)
    mask.apply(model, ms)
    return ms


def adapted(path: Path, family: str, kind: str, shard: str = "60KB", pruned: bool = True) -> Path:
    """A (pruned) tiny checkpoint with `kind` adapters whose factors look trained, written
    by `checkpoint.save` as `perp retrain` writes it (sharded at `shard`)."""
    model = tiny.build_model(family)
    masks = _masks(model) if pruned else None
    ads = adapters.attach(model, kind, rank=4, alpha=8, masks=masks)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in ads.values():
            a.lora_A.add_(0.1 * torch.randn(a.lora_A.shape, generator=gen))
            a.lora_B.add_(0.1 * torch.randn(a.lora_B.shape, generator=gen))
    adapters.detach(model)
    checkpoint.save(path, model, tiny.build_tokenizer(), masks, manifest_in=empty_manifest(f"tiny-{family}"),
                    step=StepRecord("retrain", {"adapter": kind}, f"tiny-{family}"), adapters=adapters.state_dict(ads),
                    adapters_config=adapters.config(ads, None), max_shard_size=shard)
    return path


def _merge_both(src: Path, tmp_path: Path, extra: list[str], shard: str = "40KB") -> tuple[Path, Path, dict, dict]:
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    a = run_cli("merge", src, "-o", memory, *extra, "--streaming", "off", "--json", "-q")
    assert a.exit_code == 0, a.stderr
    b = run_cli("merge", src, "-o", streamed, *extra, "--streaming", "on", "--max-shard-size", shard, "--json", "-q")
    assert b.exit_code == 0, b.stderr
    return memory, streamed, a.json(), b.json()


CASES = [
    ("llama", "masklora", []),
    ("llama", "scalelora", []),
    ("llama", "lora-prune", []),
    ("llama", "lora", ["--allow-densify"]),
    ("llama", "masklora", ["--dtype", "bfloat16"]),
    ("opt", "masklora", []),  # biases, LayerNorm, tied embeddings
    ("opt", "scalelora", []),
    ("opt", "lora-prune", []),
    ("opt", "lora", ["--allow-densify"]),
    ("mixtral", "masklora", []),  # one adapter per expert slice of a fused 3-D weight
    ("mixtral", "scalelora", []),
    ("mixtral", "lora", ["--allow-densify"]),
    ("gpt2", "lora-prune", []),  # Conv1D: transposed weights and masks
]


@pytest.mark.parametrize(("family", "kind", "extra"), CASES, ids=[f"{f}-{k}{''.join(e)}" for f, k, e in CASES])
def test_streamed_merge_is_bit_identical_to_the_in_memory_one(family: str, kind: str, extra: list[str], tmp_path: Path) -> None:
    src = adapted(tmp_path / "in", family, kind)
    assert (src / "model.safetensors.index.json").is_file()  # a sharded input
    memory, streamed, sum_a, sum_b = _merge_both(src, tmp_path, extra)
    assert_same_tensors(read_weights(memory), read_weights(streamed))
    densified = kind == "lora"
    for d in (memory, streamed):
        assert (d / "masks.safetensors").exists() != densified
        assert not (d / "adapters.safetensors").exists() and not (d / "adapters.json").exists()
    if not densified:
        assert_same_tensors(load_file(memory / "masks.safetensors"), load_file(streamed / "masks.safetensors"))
        with safe_open(str(memory / "masks.safetensors"), "pt") as fa, safe_open(str(streamed / "masks.safetensors"), "pt") as fb:
            assert fa.metadata() == fb.metadata()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (memory / name).read_text() == (streamed / name).read_text(), name
    ma, mb = (json.loads((d / "perp.json").read_text()) for d in (memory, streamed))
    assert set(ma) == set(mb) and "adapters" not in mb
    for key in ("sparsity", "pattern", "source_model"):
        assert ma.get(key) == mb.get(key), key
    ra, rb = ma["history"][-1]["results"], mb["history"][-1]["results"]
    for key in ("adapter", "merged_tensors", "masks_kept", "densified_density", "matrix_probe_max_relative_diff", "tolerance"):
        assert ra[key] == rb[key] == sum_a[key] == sum_b[key], key
    assert ra["merged_tensors"] == len(arch.matrices(tiny.build_model(family)))
    assert ra["masks_kept"] != densified
    # which checks ran, and why the logits probe did not when streaming
    assert ra["checks"] == ["finite"] + ([] if densified else ["masks"]) + ["matrix_probe", "logits_probe"]
    assert rb["checks"] == ra["checks"][:-1] and "logits_probe" in rb["checks_skipped"]
    assert sum_a["checks_skipped"] == {} and sum_b["checks_skipped"] == rb["checks_skipped"]
    assert rb["probe_relative_diff"] is None and ra["probe_relative_diff"] <= ra["tolerance"]
    assert not sum_a["streaming"] and sum_b["streaming"] and rb["streaming"]["shards"] > 1
    assert not list(streamed.glob(".*")) and not list(tmp_path.glob(".streamed*"))  # no spool, no temporary
    checkpoint.load(streamed)  # mask hash, exact zeros, finiteness: the reader's own checks


def test_single_file_output_has_the_bytes_save_pretrained_writes(tmp_path: Path) -> None:
    """An unsharded input and output: one file each, byte for byte the same, and the
    merged model computes what the unmerged one with adapters attached computes."""
    from transformers import AutoModelForCausalLM

    src = adapted(tmp_path / "in", "opt", "masklora", shard="5GB")
    memory, streamed, _, _ = _merge_both(src, tmp_path, [], shard="5GB")
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    merged = AutoModelForCausalLM.from_pretrained(streamed)
    reference = checkpoint.load(src)
    adapters.attach_from_checkpoint(reference)
    ids = torch.randint(4, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference.model(ids).logits, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- memory


def _live(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.is_meta}


def test_only_one_block_of_weights_masks_and_adapters_is_in_memory(tmp_path: Path, monkeypatch) -> None:
    src = adapted(tmp_path / "in", "llama", "masklora")
    ckpt = checkpoint.open(src, lazy_masks=True, lazy_adapters=True, streamed=True)
    model, prefix = ckpt.model, arch.spec_for(ckpt.model).blocks + "."
    assert ckpt.adapters is None and ckpt.adapters_config is not None  # adapters.safetensors not loaded
    assert all(k.is_meta for k in ckpt.masks.masks.values())  # masks not unpacked
    reads: list[tuple[str, str]] = []

    def block_of(name: str) -> str:
        return name[len(prefix) :].split(".")[0]

    def watch(cls, what: str, method: str = "read"):
        real = getattr(cls, method)

        def read(self, names):
            live = {block_of(n) for n in _live(model)}
            wanted = {block_of(n) for n in names}
            assert len(wanted) == 1, names
            # masks are read before their block's weights; adapters while the block is in memory
            assert live <= wanted and (what == "masks" or live == wanted), (what, live, wanted)
            reads.extend((what, n) for n in names)
            return real(self, names)

        monkeypatch.setattr(cls, method, read)

    watch(shards.AdapterReader, "adapters")
    watch(shards.MaskReader, "masks")  # unpacked (the densify check)
    watch(shards.MaskReader, "masks", "read_packed")  # held packed (the block's own masks)
    with checkpoint.writing(ckpt, tmp_path / "out", StepRecord("merge", {}, str(src))) as sink:
        merging.merge(ckpt, blocks=sink.blocks)
        sink.finish()
    assert not _live(model)  # every block went back to the meta device
    cfg = json.loads((src / "adapters.json").read_text())
    assert sorted(n for w, n in reads if w == "adapters") == sorted(f"{k}.lora_{ab}" for k in cfg["matrices"] for ab in "AB")
    assert sorted(n for w, n in reads if w == "masks") == sorted(load_file(src / "masks.safetensors"))  # each once


# ----------------------------------------------------------------------------- refusals


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary left behind


def test_plain_lora_is_refused_before_anything_is_read_or_written(tmp_path: Path) -> None:
    src = adapted(tmp_path / "in", "llama", "lora")
    result = run_cli("merge", src, "-o", tmp_path / "out", "--streaming", "on", "-q")
    assert result.exit_code == 2 and "--allow-densify" in result.stderr
    _nothing_written(tmp_path / "out")


def test_a_non_finite_adapter_in_the_last_block_leaves_no_output(tmp_path: Path) -> None:
    src = adapted(tmp_path / "in", "opt", "masklora")
    tensors = load_file(src / "adapters.safetensors")  # perp never writes one: tamper with the file
    last = json.loads((src / "adapters.json").read_text())["matrices"][-1]
    tensors[f"{last}.lora_B"][0, 0] = float("nan")  # in the last block: found after the others were merged
    save_file(tensors, str(src / "adapters.safetensors"))
    # --trust-inputs: past the adapters' hash, to the check under test
    result = run_cli("merge", src, "-o", tmp_path / "out", "--streaming", "on", "-q", "--trust-inputs")
    assert result.exit_code == 1 and "NaN" in result.stderr
    _nothing_written(tmp_path / "out")


def test_weights_that_disagree_with_their_masks_are_refused(tmp_path: Path) -> None:
    src = adapted(tmp_path / "in", "llama", "scalelora", shard="5GB")
    tensors = load_file(src / "model.safetensors")
    masks = checkpoint.read_masks(src, None)
    name = next(n for n in masks.names() if n.startswith("model.layers.1."))
    tensors[name][~masks[name]] = 1.0  # pruned weights of block 1 come back
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    # --trust-inputs: past the weights' hash, to the check under test
    result = run_cli("merge", src, "-o", tmp_path / "out", "--streaming", "on", "-q", "--trust-inputs")
    assert result.exit_code == 1 and "disagree" in result.stderr and name in result.stderr
    _nothing_written(tmp_path / "out")


def test_usage_errors(tmp_path: Path) -> None:
    dense = tmp_path / "dense"
    tiny.build_model("llama").save_pretrained(dense)
    none = run_cli("merge", dense, "-o", tmp_path / "a", "--streaming", "on", "-q")
    assert none.exit_code == 2 and "nothing to merge" in none.stderr
    hub = run_cli("merge", "someone/model", "-o", tmp_path / "b", "--streaming", "on", "-q")
    assert hub.exit_code == 2 and "--streaming off" in hub.stderr
    bad = run_cli("merge", dense, "-o", tmp_path / "c", "--streaming", "sometimes", "-q")
    assert bad.exit_code == 2 and "--streaming" in bad.stderr
    for out in ("a", "b", "c"):
        _nothing_written(tmp_path / out)


def test_lora_on_a_dense_model_streams_without_masks(tmp_path: Path) -> None:
    src = adapted(tmp_path / "in", "qwen2", "lora", pruned=False)
    memory, streamed, _, sum_b = _merge_both(src, tmp_path, [])
    assert_same_tensors(read_weights(memory), read_weights(streamed))
    assert not (streamed / "masks.safetensors").exists() and not sum_b["masks_kept"]
    assert "masks_sha256" not in json.loads((streamed / "perp.json").read_text())
    assert sum_b["checks"] == ["finite", "matrix_probe"]



@pytest.mark.slow
def test_real_tiny_opt_pruned_retrained_and_merged_both_ways(tmp_path: Path, calib_file: Path) -> None:
    """The real 4.3M-parameter OPT from ../shared: magnitude 50%, one MaskLoRA step of
    `perp retrain`, then the merge in memory and streamed into 5 MB shards: the same tensors."""
    src = shared_path("models", "tiny-opt")
    pruned, retrained = tmp_path / "p", tmp_path / "rt"
    assert run_cli("prune", src, "-o", pruned, "--method", "magnitude", "-q").exit_code == 0
    rt = run_cli("retrain", pruned, "-o", retrained, "--data", calib_file, "--seqlen", "32", "--steps", "1",
                 "--batch-size", "2", "--lr", "1e-2", "--adapter", "masklora", "--rank", "4", "-q")
    assert rt.exit_code == 0, rt.stderr
    memory, streamed, sum_a, sum_b = _merge_both(retrained, tmp_path, [], shard="5MB")
    assert_same_tensors(read_weights(memory), read_weights(streamed))
    assert_same_tensors(load_file(memory / "masks.safetensors"), load_file(streamed / "masks.safetensors"))
    assert sum_a["merged_tensors"] == sum_b["merged_tensors"] > 0 and sum_b["masks_kept"]
