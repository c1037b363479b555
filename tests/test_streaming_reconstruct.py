"""Streaming `perp reconstruct`: the same weights, masks and per-block errors, bit for bit,
as the in-memory path; one pruned and one dense block in memory at a time; masks read
per block; nothing written on an interrupt or a bad tensor; the choice between paths."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, read_weights, run_cli, save_tiny, shared_path
from safetensors.torch import load_file, save_file

from perp_cli import arch, checkpoint, reconstruction, shards, streaming, tiny
from perp_cli.manifest import StepRecord
from perp_cli.reconstruction import ReconstructConfig
from perp_cli.shards import ShardWriter

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = str(files("perp_cli").joinpath("demo/corpus.txt"))
QUICK = ["--calib", CORPUS, "--nsamples", "6", "--seqlen", "32", "--batch-size", "3",
         "--steps-per-block", "6", "--lr", "3e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """family -> (wanda-pruned checkpoint, its dense model); LLaMA sharded, OPT single-file."""
    out = {}
    for family, shard in (("llama", "60KB"), ("opt", None)):
        root = tmp_path_factory.mktemp(family)
        dense = root / "dense"
        if shard:
            tiny.build_model(family).save_pretrained(dense, max_shard_size=shard)
            tiny.build_tokenizer().save_pretrained(dense)
            assert (dense / "model.safetensors.index.json").is_file()
        else:
            save_tiny(dense, family)
        result = run_cli("prune", dense, "-o", root / "wanda", "--method", "wanda", "--sparsity", "0.6", "--calib", CORPUS,
                         "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--max-shard-size", shard or "5GB", "-q")
        assert result.exit_code == 0, result.stderr
        out[family] = (root / "wanda", dense)
    return out


def _blocks(summary: dict) -> list[dict]:
    return [{k: v for k, v in b.items() if k != "time_s"} for b in summary["blocks"]]


def _reconstruct_both(src: Path, tmp_path: Path, args: list[str], shard: str) -> tuple[Path, Path, dict, dict]:
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    a = run_cli("reconstruct", src, "-o", memory, *args, "--streaming", "off", "--json", "-q")
    assert a.exit_code == 0, a.stderr
    b = run_cli("reconstruct", src, "-o", streamed, *args, "--streaming", "on", "--max-shard-size", shard, "--json", "-q")
    assert b.exit_code == 0, b.stderr
    return memory, streamed, a.json(), b.json()


def _assert_same_checkpoint(src: Path, memory: Path, streamed: Path, sum_a: dict, sum_b: dict) -> None:
    assert_same_tensors(read_weights(memory), read_weights(streamed))
    masks = memory / "masks.safetensors"
    assert_same_tensors(load_file(masks), load_file(streamed / "masks.safetensors"))
    assert_same_tensors(load_file(masks), load_file(src / "masks.safetensors"))  # masks never change
    assert masks.read_bytes() == (streamed / "masks.safetensors").read_bytes()  # perp writes them deterministically
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (memory / name).read_text() == (streamed / name).read_text(), name
    ma, mb = (json.loads((d / "perp.json").read_text()) for d in (memory, streamed))
    for key in ("sparsity", "pattern", "source_model", "masks_sha256"):
        assert ma[key] == mb[key], key
    step_a, step_b = ma["history"][-1], mb["history"][-1]
    assert step_a["data"] == step_b["data"]
    assert _blocks(step_a["results"]) == _blocks(step_b["results"]) == _blocks(sum_a) == _blocks(sum_b)
    for key in ("trained", "adapter", "added_biases", "trainable_parameters", "total_parameters", "restored_blocks"):
        assert sum_a[key] == sum_b[key], key
    assert not sum_a["streaming"] and sum_b["streaming"] and step_b["results"]["streaming"]["shards"] == sum_b["shards"]["shards"]
    assert not list(streamed.glob(".*"))  # no mask spool left behind
    checkpoint.load(streamed)  # mask hash, exact zeros, finiteness: the reader's own checks


CASES = [
    # LLaMA: sharded input, sharded output; biases added, so the output has tensors the input lacks
    ("llama", ["--add-biases"], "40KB"),
    ("llama", ["--train", "norms", "--target", "dense-stream"], "40KB"),
    # OPT: tied embeddings, biases and LayerNorm; the default biases,norms + masklora
    ("opt", [], "5GB"),
    ("opt", ["--target", "dense-stream", "--adapter", "scalelora"], "100KB"),
    # sublayer granularity: the attention and MLP halves, dense block read once per step
    ("llama", ["--add-biases", "--granularity", "sublayer", "--target", "dense-stream"], "40KB"),
    ("opt", ["--granularity", "sublayer"], "100KB"),
]


@pytest.mark.parametrize(("family", "extra", "shard"), CASES, ids=["llama-add-biases", "llama-dense-stream", "opt-default", "opt-dense-stream",
                                                                   "llama-sublayer-dense-stream", "opt-sublayer"])
def test_streamed_reconstruct_is_bit_identical_to_the_in_memory_one(
    family: str, extra: list[str], shard: str, pruned: dict, tmp_path: Path
) -> None:
    src, dense = pruned[family]
    memory, streamed, sum_a, sum_b = _reconstruct_both(src, tmp_path, [*QUICK, *extra], shard)
    _assert_same_checkpoint(src, memory, streamed, sum_a, sum_b)
    assert Path(sum_b["dense"]) == dense.resolve()
    assert any(b["mse_after"] < b["mse_before"] for b in sum_b["blocks"])  # it did train
    if "sublayer" in extra:
        assert [b["part"] for b in sum_b["blocks"]] == ["attention", "mlp"] * 2 and sum_b["granularity"] == "sublayer"
    sharded = (streamed / "model.safetensors.index.json").is_file()
    assert sharded == (shard != "5GB")
    if "--add-biases" in extra:
        assert sum_b["added_biases"] > 0 and "model.layers.1.mlp.down_proj.bias" in read_weights(streamed)
        assert json.loads((streamed / "config.json").read_text())["mlp_bias"] is True


def test_streamed_output_loads_in_plain_transformers(pruned: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src, _ = pruned["opt"]
    memory, streamed, _, _ = _reconstruct_both(src, tmp_path, QUICK, "5GB")
    # one file each: the same bytes as save_pretrained writes
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(streamed)
    assert model.lm_head.weight is model.get_input_embeddings().weight


# ----------------------------------------------------------------------------- memory


def _live(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.is_meta}


def test_one_pruned_and_one_dense_block_in_memory_at_a_time(pruned: dict, tmp_path: Path, monkeypatch) -> None:
    src, dense = pruned["llama"]
    ckpt = checkpoint.open(src, lazy_masks=True, streamed=True)
    reference = checkpoint.open(dense, lazy_masks=True, streamed=True)
    model, dense_model = ckpt.model, reference.model
    prefix = arch.spec_for(model).blocks + "."
    assert not _live(model) and not _live(dense_model)
    assert len(ckpt.masks) == 14 and all(m.is_meta for m in ckpt.masks.masks.values())
    seen: list[str] = []

    def only_block(names: set[str], index: int) -> bool:
        return all(n.startswith(f"{prefix}{index}.") for n in names)

    def real_masks() -> set[str]:
        return {n for n, m in ckpt.masks.masks.items() if not m.is_meta}

    def on_pruned(index: int):
        def hook(module, args, kwargs):
            pruned_live, dense_live = _live(model), _live(dense_model)
            if not any(n.startswith(prefix) for n in pruned_live):  # the engine catching block 0's inputs
                assert index == 0 and not dense_live
                return
            assert only_block(pruned_live, index) and only_block(dense_live, index), (pruned_live, dense_live)
            assert real_masks() and only_block(real_masks(), index)
            seen.append(f"pruned {index}")
        return hook

    def on_dense(index: int):
        def hook(module, args, kwargs):
            dense_live = _live(dense_model)
            if not any(n.startswith(prefix) for n in dense_live):  # catching the dense stream's inputs
                assert index == 0 and not _live(model)
                return
            assert only_block(dense_live, index) and only_block(_live(model), index)
            seen.append(f"dense {index}")
        return hook

    n_blocks = len(arch.blocks(model))
    for i in range(n_blocks):
        arch.blocks(model)[i].register_forward_pre_hook(on_pruned(i), with_kwargs=True)
        arch.blocks(dense_model)[i].register_forward_pre_hook(on_dense(i), with_kwargs=True)
    real_write, writes = ShardWriter.write, []

    def observed_write(self, name, tensor):
        live = _live(model)
        assert not _live(dense_model) and len({n[len(prefix):].split(".")[0] for n in live}) <= 1, live
        writes.append(name)
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", observed_write)
    real_write_rows = ShardWriter.write_rows

    def observed_write_rows(self, name, start, rows):  # the embeddings and head, a slice of rows at a time
        assert not _live(dense_model) and not any(n.startswith(prefix) for n in _live(model))
        if start == 0:
            writes.append(name)
        real_write_rows(self, name, start, rows)

    monkeypatch.setattr(ShardWriter, "write_rows", observed_write_rows)
    tokens = torch.randint(4, tiny.VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    config = ReconstructConfig(train="norms", target="dense-stream", steps_per_block=3, batch_size=2, device="cpu")
    reconstruction.prepare(ckpt, reference.model, config)
    with checkpoint.writing(ckpt, tmp_path / "out", StepRecord("reconstruct", {}, str(src))) as sink:
        outcome = reconstruction.reconstruct(ckpt, reference, tokens, config, blocks=sink.blocks)
        sink.finish(outcome.masks)
    assert [b.block for b in outcome.blocks] == list(range(n_blocks))
    for i in range(n_blocks):
        assert f"pruned {i}" in seen and f"dense {i}" in seen
    assert seen.index("dense 1") > seen.index("pruned 0")  # dense block 1 is read after block 0 is done
    # every weight, then every mask (assembled from the spool at the end), written once
    assert len(writes) == len(read_weights(tmp_path / "out")) + len(load_file(tmp_path / "out" / "masks.safetensors"))
    assert not _live(model) and not _live(dense_model) and not real_masks()
    checkpoint.load(tmp_path / "out")


# ----------------------------------------------------------------------------- failures


def test_an_interrupt_during_the_streamed_write_leaves_no_output(pruned: dict, tmp_path: Path, monkeypatch) -> None:
    src, _ = pruned["opt"]
    out = tmp_path / "out"
    real_write, calls = ShardWriter.write, []

    def interrupted(self, name, tensor):
        calls.append(name)
        if len(calls) > 3:  # block 0 is partly on disk
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", interrupted)
    result = run_cli("reconstruct", src, "-o", out, *QUICK, "--streaming", "on", "-q")
    assert result.exit_code == 130 and "no output was written" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_non_finite_dense_weight_aborts_without_output(pruned: dict, tmp_path: Path) -> None:
    src, _ = pruned["opt"]
    broken = tmp_path / "dense"
    save_tiny(broken, "opt")
    weights = load_file(broken / "model.safetensors")
    weights["model.decoder.layers.1.fc1.weight"][2, 3] = float("inf")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    # --trust-inputs: past the source-weights hash, to the check under test
    result = run_cli("reconstruct", src, "-o", out, "--dense", broken, *QUICK, "--streaming", "on", "-q", "--trust-inputs")
    assert result.exit_code == 1, result.stderr
    assert "model.decoder.layers.1.fc1.weight contains NaN or inf" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_tampered_masks_are_refused_before_any_work(pruned: dict, tmp_path: Path) -> None:
    import shutil

    src, dense = pruned["opt"]
    copy = tmp_path / "pruned"
    shutil.copytree(src, copy)
    masks = load_file(copy / "masks.safetensors")
    first = min(masks)
    masks[first][0] ^= 1
    save_file(masks, str(copy / "masks.safetensors"))
    result = run_cli("reconstruct", copy, "-o", tmp_path / "out", "--dense", dense, *QUICK, "--streaming", "on", "-q")
    # re-saved without perp's metadata: the header check refuses it, before the hash is even read
    assert result.exit_code == 1 and "masks.safetensors cannot be read" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--streaming", "maybe"], "--streaming 'maybe' is not one of"),
        (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
        (["--streaming", "on", "--dense", "org/some-model"], "--dense: streaming reads a local directory"),
    ],
)
def test_usage_errors(args: list[str], message: str, pruned: dict, tmp_path: Path) -> None:
    src, _ = pruned["opt"]
    result = run_cli("reconstruct", src, "-o", tmp_path / "out", *QUICK, *args, "-q")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_auto_counts_both_models(pruned: dict, monkeypatch) -> None:
    src, _ = pruned["opt"]
    size = streaming.weights_bytes(src, "auto")
    monkeypatch.setattr(streaming, "available_memory", lambda: 3 * size)
    assert not streaming.decide("auto", src).stream  # one model: 1/3 of the memory
    assert streaming.decide("auto", src, models=2).stream  # pruned + dense: 2/3
    assert not streaming.decide("off", src, models=2).stream


def test_mask_reader_reads_one_block_of_masks(pruned: dict) -> None:
    src, _ = pruned["llama"]
    reader = shards.MaskReader.open(src, checkpoint.read_manifest(src))
    full = checkpoint.read_masks(src, checkpoint.read_manifest(src))
    names = [n for n in sorted(full.names()) if n.startswith("model.layers.1.")]
    got = reader.read(names)
    assert list(got) == names and all(torch.equal(got[n], full[n]) for n in names)
    placeholders = reader.placeholders()
    assert placeholders.pattern == full.pattern and placeholders.names() == sorted(full.names())
    assert all(placeholders[n].shape == full[n].shape for n in full.names())


# ----------------------------------------------------------------------------- a real checkpoint


@pytest.mark.slow
@pytest.mark.shared
def test_real_checkpoint_streams_bit_identically(tmp_path: Path) -> None:
    src = shared_path("models", "stories260K")
    data = str(shared_path("data", "wikitext-2-raw", "wiki.valid.raw"))
    calib = ["--calib", data, "--nsamples", "8", "--seqlen", "128", "--batch-size", "4", "--device", "cpu"]
    result = run_cli("prune", src, "-o", tmp_path / "wanda", "--method", "wanda", *calib, "-q")
    assert result.exit_code == 0, result.stderr
    args = [*calib, "--steps-per-block", "5", "--train", "norms"]
    memory, streamed, sum_a, sum_b = _reconstruct_both(tmp_path / "wanda", tmp_path, args, "200KB")
    _assert_same_checkpoint(tmp_path / "wanda", memory, streamed, sum_a, sum_b)
