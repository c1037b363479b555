"""The residency contract: every command writes the same bytes whether its checkpoint is
in memory or streamed block by block from its shards, and whether its activations are in
memory or on disk. Then, per command, what only streaming promises: one block in memory at
a time, masks and adapters read per block, nothing written on an interrupt or a bad tensor,
the choice between residencies, and the engine hooks it relies on."""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, magnitude_masks, read_weights, run_cli, save_tiny, shared_path, trained_adapters
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from perp_cli import adapters, arch, checkpoint, engine, memory, merging, pruner, reconstruction, shards, streaming, tiny
from perp_cli.manifest import StepRecord, empty_manifest
from perp_cli.pruner import PruneConfig
from perp_cli.reconstruction import ReconstructConfig
from perp_cli.shards import ShardWriter

pytestmark = pytest.mark.usefixtures("one_thread")


def _live(model: torch.nn.Module) -> set[str]:
    """Parameters with values (the rest are the skeleton's meta tensors)."""
    return {n for n, p in model.named_parameters() if not p.is_meta}


# ----------------------------------------------------------------------------- the contract
# each command x {streamed, activations on disk, both}: the in-memory output, tensor for
# tensor and the masks byte for byte. The per-command sections below go deeper.

RESIDENCIES = {
    "streamed": ["--streaming", "on", "--max-shard-size", "40KB"],
    "activations-on-disk": ["--streaming", "off", "--offload-dir", "{acts}"],
    "streamed-activations-on-disk": ["--streaming", "on", "--max-shard-size", "40KB", "--offload-dir", "{acts}"],
}


def _command(command: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """The input and the arguments of one quick run of `command`."""
    if command == "prune":
        src = tmp_path / "in"
        tiny.build_model("llama").save_pretrained(src, max_shard_size="60KB")
        tiny.build_tokenizer().save_pretrained(src)
        return src, ["--method", "wanda", "--calib", CORPUS, "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
    if command == "reconstruct":
        dense = save_tiny(tmp_path / "dense", "llama")
        src = tmp_path / "in"
        assert run_cli("prune", dense, "-o", src, "--method", "magnitude", "-q").exit_code == 0
        return src, [*QUICK, "--train", "norms", "--adapter", "masklora"]
    return adapted(tmp_path / "in", "llama", "masklora"), []


# a merge runs no activations: only its streamed residency differs from in memory
CASES = [(c, r) for c in ("prune", "reconstruct", "merge") for r in RESIDENCIES if c != "merge" or "activations" not in r]


@pytest.mark.parametrize(("command", "residency"), CASES)
def test_every_command_writes_the_same_output_in_every_residency(command: str, residency: str, tmp_path: Path) -> None:
    src, args = _command(command, tmp_path)
    reference, other = tmp_path / "memory", tmp_path / residency
    a = run_cli(command, src, "-o", reference, *args, "--streaming", "off", "-q")
    assert a.exit_code == 0, a.stderr
    extra = [x.format(acts=tmp_path / "acts") for x in RESIDENCIES[residency]]
    b = run_cli(command, src, "-o", other, *args, *extra, "-q")
    assert b.exit_code == 0, b.stderr
    assert_same_tensors(read_weights(reference), read_weights(other))
    assert (reference / "masks.safetensors").read_bytes() == (other / "masks.safetensors").read_bytes()
    ma, mb = (json.loads((d / "perp.json").read_text()) for d in (reference, other))
    assert ma["sparsity"] == mb["sparsity"] and ma["masks_sha256"] == mb["masks_sha256"]
    assert not list(other.glob(".*"))  # no spool left behind
    checkpoint.open(other)


# ----------------------------------------------------------------------------- prune


def _calib(calib_file: Path, nsamples: int = 4, seqlen: int = 64) -> list[str]:
    return ["--calib", str(calib_file), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", "cpu"]


def _metadata(file: Path) -> dict[str, str]:
    """A safetensors header's metadata (compared as a dict: safetensors writes its keys
    in a random order, so the bytes of two equal files may differ)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata()


def _both(command: str, src: Path, tmp_path: Path, args: list[str], shard: str = "40KB") -> tuple[Path, Path, dict, dict]:
    """Run `command` on `src` in memory and streamed; return both outputs and their JSON summaries."""
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    a = run_cli(command, src, "-o", memory, *args, "--streaming", "off", "--json", "-q")
    assert a.exit_code == 0, a.stderr
    b = run_cli(command, src, "-o", streamed, *args, "--streaming", "on", "--max-shard-size", shard, "--json", "-q")
    assert b.exit_code == 0, b.stderr
    return memory, streamed, a.json(), b.json()


_prune_both, _reconstruct_both, _merge_both = (functools.partial(_both, c) for c in ("prune", "reconstruct", "merge"))


def _assert_same_pruned(memory: Path, streamed: Path, sum_a: dict, sum_b: dict) -> None:
    assert_same_tensors(read_weights(memory), read_weights(streamed))
    assert_same_tensors(load_file(memory / "masks.safetensors"), load_file(streamed / "masks.safetensors"))
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (memory / name).read_text() == (streamed / name).read_text(), name
    ma, mb = (json.loads((d / "perp.json").read_text()) for d in (memory, streamed))
    assert ma["sparsity"] == mb["sparsity"] and ma["pattern"] == mb["pattern"]
    assert _metadata(memory / "masks.safetensors") == _metadata(streamed / "masks.safetensors")
    # one writer for both paths: the same bytes, so the manifests carry the same hash
    assert (memory / "masks.safetensors").read_bytes() == (streamed / "masks.safetensors").read_bytes()
    assert ma["masks_sha256"] == mb["masks_sha256"]
    assert not list(streamed.glob(".*"))  # no scratch file (the mask spool) left behind
    assert ma["history"][-1]["results"]["sparsity_achieved"] == mb["history"][-1]["results"]["sparsity_achieved"]
    assert ma["history"][-1]["data"] == mb["history"][-1]["data"]
    assert not sum_a["streaming"] and sum_b["streaming"]
    for key in ("sparsity", "sparsity_all_masked", "per_tensor", "calibration", "notes"):
        assert sum_a[key] == sum_b[key], key
    checkpoint.open(streamed)  # mask hash, exact zeros, finiteness: the reader's own checks


# Each family once, each method at least twice; sharded input everywhere.
PRUNE_CASES = [
    ("llama", "magnitude", []),
    ("llama", "wanda", []),
    ("llama", "sparsegpt", ["--pattern", "2:4"]),
    ("opt", "wanda", ["--sparsity", "0.6"]),  # tied embeddings, biases, LayerNorm
    ("gpt2", "sparsegpt", []),  # Conv1D, tied, no rotary
    ("mixtral", "wanda", []),  # per-expert names on disk, fused in the model
    ("qwen2", "random", []),
    ("gpt_oss", "sparsegpt", ["--pattern", "2:4"]),  # experts [E, in, out] with biases; no probe on a skeleton
    ("llama4_text", "wanda", []),  # batched experts, dense and MoE paths
    ("phi3", "sparsegpt", []),  # fused qkv
    ("bloom", "wanda", []),  # ALiBi call arguments per micro-batch size
]


@pytest.mark.parametrize(("family", "method", "extra"), PRUNE_CASES, ids=[f"{f}-{m}" for f, m, _ in PRUNE_CASES])
def test_streamed_prune_is_bit_identical_to_the_in_memory_one(
    family: str, method: str, extra: list[str], tmp_path: Path, calib_file: Path
) -> None:
    src = tmp_path / "in"
    tiny.build_model(family).save_pretrained(src, max_shard_size="60KB")
    tiny.build_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    memory, streamed, sum_a, sum_b = _prune_both(src, tmp_path, ["--method", method, *extra, *_calib(calib_file)])
    _assert_same_pruned(memory, streamed, sum_a, sum_b)
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the output is sharded as asked


def test_streamed_output_loads_in_plain_transformers_with_tied_embeddings(tmp_path: Path, calib_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / "in", "opt")
    memory, streamed, sum_a, sum_b = _prune_both(src, tmp_path, ["--method", "wanda", *_calib(calib_file)], shard="5GB")
    assert (streamed / "model.safetensors").is_file() and not (streamed / "model.safetensors.index.json").exists()
    # one file each: the same bytes as save_pretrained writes
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    a, b = AutoModelForCausalLM.from_pretrained(memory), AutoModelForCausalLM.from_pretrained(streamed)
    assert b.lm_head.weight is b.get_input_embeddings().weight
    assert "lm_head.weight" not in read_weights(streamed)
    tokens = torch.randint(4, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def test_pruning_a_pruned_bfloat16_checkpoint_keeps_its_masks_and_dtype(tmp_path: Path, calib_file: Path) -> None:
    src = tmp_path / "bf16"
    tiny.build_model("llama").to(torch.bfloat16).save_pretrained(src)
    tiny.build_tokenizer().save_pretrained(src)
    first = tmp_path / "m50"
    assert run_cli("prune", src, "-o", first, "--method", "magnitude", "--streaming", "on", "-q").exit_code == 0
    assert next(iter(read_weights(first).values())).dtype == torch.bfloat16
    memory, streamed, sum_a, sum_b = _prune_both(first, tmp_path, ["--method", "sparsegpt", "--sparsity", "0.7", *_calib(calib_file)])
    _assert_same_pruned(memory, streamed, sum_a, sum_b)
    old, new = checkpoint.open(first).masks, checkpoint.open(streamed).masks
    assert all(not (new[n] & ~old[n]).any() for n in old.names())


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_at_most_one_block_is_in_memory_at_any_time(method: str, tmp_path: Path, monkeypatch) -> None:
    family = "llama"
    src = save_tiny(tmp_path / "in", family)
    ckpt = checkpoint.open(src, streamed=True)
    model = ckpt.model
    prefix = arch.spec_for(model).blocks
    assert not _live(model)  # the skeleton holds no weights
    seen: list[tuple[str, set[str]]] = []

    def check_block(index: int):
        def hook(module, args, kwargs):
            live = _live(model)
            if not any(n.startswith(f"{prefix}.{index}.") for n in live):
                # the engine catching the inputs (a stand-in per block): only the embeddings are in memory
                assert live and not any(n.startswith(prefix + ".") for n in live), live
                seen.append((f"capture {index}", live))
                return
            assert all(n.startswith(f"{prefix}.{index}.") for n in live), live
            seen.append((f"block {index}", live))
        return hook

    def check_embedding(module, args):
        live = _live(model)
        assert live and not any(n.startswith(prefix + ".") for n in live), live
        seen.append(("embedding", live))

    for i, block in enumerate(arch.blocks(model)):
        block.register_forward_pre_hook(check_block(i), with_kwargs=True)
    model.get_input_embeddings().register_forward_pre_hook(check_embedding)

    writes: list[str] = []
    real_write = ShardWriter.write

    def observed_write(self, name, tensor):  # the real write, after checking what is in memory
        live = _live(model)  # outside tensors are copied without entering the model
        block_ids = {n[len(prefix) + 1 :].split(".")[0] for n in live if n.startswith(prefix + ".")}
        assert len(block_ids) <= 1 and all(n.startswith(prefix + ".") for n in live), live
        writes.append(name)
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", observed_write)
    real_write_rows = ShardWriter.write_rows

    def observed_write_rows(self, name, start, rows):  # the embeddings and head, a slice of rows at a time
        assert not any(n.startswith(prefix + ".") for n in _live(model))
        if start == 0:
            writes.append(name)
        real_write_rows(self, name, start, rows)

    monkeypatch.setattr(ShardWriter, "write_rows", observed_write_rows)
    tokens = torch.randint(4, tiny.VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(method=method, device="cpu", quiet=True)
    with checkpoint.writing(ckpt, tmp_path / "out", StepRecord("prune", {}, str(src))) as sink:
        sink.finish(pruner.prune(ckpt, config, tokens=tokens, blocks=sink.blocks).masks)
    n_blocks = len(arch.blocks(model))
    if method == "wanda":  # each block runs twice per micro-batch: statistics, propagation (none after the last)
        runs = [2] * (n_blocks - 1) + [1]
        assert [s for s, _ in seen if s.startswith("block")] == [f"block {i}" for i in range(n_blocks) for _ in range(runs[i])]
        # the one-window call and one micro-batch: embeddings run, each block's call is caught before it runs
        assert [s for s, _ in seen].count("embedding") == [s for s, _ in seen].count("capture 0") == 2
    # every weight, then every mask (assembled from the spool at the end), written once
    assert len(writes) == len(read_weights(tmp_path / "out")) + len(load_file(tmp_path / "out" / "masks.safetensors"))
    assert not _live(model)  # every weight went back to meta


# ----------------------------------------------------------------------------- failures


def test_an_interrupt_during_a_streamed_prune_leaves_no_output(tmp_path: Path, calib_file: Path, monkeypatch) -> None:
    src = save_tiny(tmp_path / "in", "llama")
    out = tmp_path / "out"
    real_write, calls = ShardWriter.write, []

    def interrupted(self, name, tensor):
        calls.append(name)
        if len(calls) > 9:  # block 0 (9 tensors) is on disk, block 1 is being written
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", interrupted)
    result = run_cli("prune", src, "-o", out, "--method", "wanda", "--streaming", "on", *_calib(calib_file), "-q")
    assert result.exit_code == 130 and "no output was written" in result.stderr
    assert len(calls) == 10
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_non_finite_weight_in_a_later_block_aborts_without_output(tmp_path: Path, calib_file: Path) -> None:
    src = save_tiny(tmp_path / "in", "llama")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = run_cli("prune", src, "-o", out, "--method", "wanda", "--streaming", "on", *_calib(calib_file), "-q")
    assert result.exit_code == 1
    assert "model.layers.1.mlp.up_proj.weight contains NaN or inf" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--streaming", "maybe"], "--streaming 'maybe' is not one of"),
        (["--streaming", "on", "--scope", "global"], "--scope global"),
        (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
    ],
)
def test_prune_usage_errors(args: list[str], message: str, tiny_dir: Path, tmp_path: Path) -> None:
    result = run_cli("prune", tiny_dir, "-o", tmp_path / "out", "--method", "magnitude", *args, "-q")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_streaming_on_needs_local_safetensors(tmp_path: Path) -> None:
    result = run_cli("prune", "org/some-model", "-o", tmp_path / "out", "--method", "magnitude", "--streaming", "on", "-q")
    assert result.exit_code == 2 and "not a local directory" in result.stderr
    pickled = tmp_path / "pickled"
    tiny.build_model("opt").save_pretrained(pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    result = run_cli("prune", pickled, "-o", tmp_path / "out", "--method", "magnitude", "--streaming", "on", "-q")
    assert result.exit_code == 2 and "no safetensors weights" in result.stderr


def test_auto_streams_only_when_the_weights_would_not_fit(tiny_dir: Path, monkeypatch) -> None:
    config = PruneConfig(method="wanda")
    size = streaming.weights_bytes(tiny_dir, "auto")
    assert size == sum(t.numel() * t.element_size() for t in load_file(tiny_dir / "model.safetensors").values())
    assert streaming.weights_bytes(tiny_dir, "bfloat16") == size // 2
    monkeypatch.setattr(memory, "process_limit", lambda: 100 * size)
    assert not streaming.decide("auto", tiny_dir, refusal=pruner.streaming_refusal(config)).stream
    monkeypatch.setattr(memory, "process_limit", lambda: size)
    assert streaming.decide("auto", tiny_dir, refusal=pruner.streaming_refusal(config)).stream
    assert not streaming.decide("auto", tiny_dir, refusal=pruner.streaming_refusal(PruneConfig(method="wanda", scope="global"))).stream
    assert not streaming.decide("auto", "org/hub-id", refusal=pruner.streaming_refusal(config)).stream
    assert not streaming.decide("off", tiny_dir, refusal=pruner.streaming_refusal(config)).stream


# ----------------------------------------------------------------------------- engine hooks


def test_in_place_propagation_gives_the_same_activations() -> None:
    model = tiny.build_model("llama")
    tokens = torch.randint(4, tiny.VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    a = engine.calibrate(model, tokens, lambda s: None, batch_size=2)
    b = engine.calibrate(model, tokens, lambda s: None, batch_size=2, in_place=True)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden, b.hidden))


def test_data_free_pass_visits_each_block_once_with_its_residency() -> None:
    model = tiny.build_model("opt")
    events: list[str] = []
    residency = engine.Residency(load=lambda i, b: events.append(f"load {i}"), release=lambda i, b: events.append(f"release {i}"))
    engine.run_blocks(model, None, lambda s: events.append(f"step {s.index} {s.inputs}"), residency=residency)
    assert events == ["load 0", "step 0 None", "release 0", "load 1", "step 1 None", "release 1"]


# ----------------------------------------------------------------------------- real checkpoints


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize(
    ("model", "method", "calib"),
    [
        ("stories260K", "sparsegpt", ("wikitext-2-raw", "wiki.valid.raw")),
        ("tiny-opt", "wanda", ("c4", "c4-train.00000-of-01024.first1000.jsonl")),
    ],
)
def test_real_checkpoints_stream_bit_identically(model: str, method: str, calib: tuple[str, str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = shared_path("models", model)
    data = shared_path("data", *calib)
    args = ["--method", method, "--calib", str(data), "--nsamples", "8", "--seqlen", "128", "--device", "cpu"]
    memory, streamed, sum_a, sum_b = _prune_both(src, tmp_path, args, shard="2MB")
    _assert_same_pruned(memory, streamed, sum_a, sum_b)
    plain = AutoModelForCausalLM.from_pretrained(streamed)  # both tie lm_head to the embeddings
    assert plain.lm_head.weight is plain.get_input_embeddings().weight


def test_embeddings_and_head_are_copied_in_row_slices_with_the_bytes_of_a_whole_copy(tmp_path: Path, calib_file: Path, monkeypatch) -> None:
    """A large vocabulary (untied head) streams a slice of rows at a time: no read of the
    embedding or the head is larger than the slice, the embedding pass reads only the
    rows of the calibration tokens, and the output is byte for byte the in-memory one."""
    from perp_cli.shards import ShardReader

    vocab, hidden = 4096, tiny.build_config("llama").hidden_size
    src = save_tiny(tmp_path / "in", "llama", vocab_size=vocab, tie_word_embeddings=False)
    row_bytes = hidden * 4
    monkeypatch.setattr(streaming, "TAIL_CHUNK_BYTES", 100 * row_bytes)  # 41 slices of <= 100 rows
    largest: dict[str, int] = {}
    real_read, real_rows = ShardReader.read, ShardReader.read_rows

    def read(self, wanted):
        out = real_read(self, wanted)
        for name, t in out.items():
            largest[name] = max(largest.get(name, 0), t.nbytes)
        return out

    def read_rows(self, name, start, stop):
        t = real_rows(self, name, start, stop)
        largest[name] = max(largest.get(name, 0), t.nbytes)
        return t

    monkeypatch.setattr(ShardReader, "read", read)
    monkeypatch.setattr(ShardReader, "read_rows", read_rows)
    memory, streamed, sum_a, sum_b = _prune_both(src, tmp_path, ["--method", "wanda", *_calib(calib_file, 2, 32)], shard="5GB")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert 0 < largest[name] <= 100 * row_bytes < vocab * row_bytes, (name, largest[name])
    # one file each: the same bytes as save_pretrained of the in-memory model
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    assert sum_a["per_tensor"] == sum_b["per_tensor"]


# ----------------------------------------------------------------------------- reconstruct


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


def _assert_same_reconstruction(src: Path, memory: Path, streamed: Path, sum_a: dict, sum_b: dict) -> None:
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
    checkpoint.open(streamed)  # mask hash, exact zeros, finiteness: the reader's own checks


RECONSTRUCT_CASES = [
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


@pytest.mark.parametrize(("family", "extra", "shard"), RECONSTRUCT_CASES, ids=["llama-add-biases", "llama-dense-stream", "opt-default", "opt-dense-stream",
                                                                   "llama-sublayer-dense-stream", "opt-sublayer"])
def test_streamed_reconstruct_is_bit_identical_to_the_in_memory_one(
    family: str, extra: list[str], shard: str, pruned: dict, tmp_path: Path
) -> None:
    src, dense = pruned[family]
    memory, streamed, sum_a, sum_b = _reconstruct_both(src, tmp_path, [*QUICK, *extra], shard)
    _assert_same_reconstruction(src, memory, streamed, sum_a, sum_b)
    assert Path(sum_b["dense"]) == dense.resolve()
    assert any(b["mse_after"] < b["mse_before"] for b in sum_b["blocks"])  # it did train
    if "sublayer" in extra:
        assert [b["part"] for b in sum_b["blocks"]] == ["attention", "mlp"] * 2 and sum_b["granularity"] == "sublayer"
    sharded = (streamed / "model.safetensors.index.json").is_file()
    assert sharded == (shard != "5GB")
    if "--add-biases" in extra:
        assert sum_b["added_biases"] > 0 and "model.layers.1.mlp.down_proj.bias" in read_weights(streamed)
        assert json.loads((streamed / "config.json").read_text())["mlp_bias"] is True


def test_a_permuted_nm_checkpoint_reconstructs_and_merges_streamed_as_in_memory(tmp_path: Path) -> None:
    """RIA's --permute stores N:M masks whose groups run in a permuted input order; the
    streamed per-block checks must read them in that order (they once refused them)."""
    dense = save_tiny(tmp_path / "dense", "llama")
    src = tmp_path / "ria"
    result = run_cli("prune", dense, "-o", src, "--method", "ria", "--pattern", "2:4", "--permute", "--calib", CORPUS,
                     "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    assert "input_permutations" in _metadata(src / "masks.safetensors")
    rec = tmp_path / "reconstruct"
    memory, streamed, sum_a, sum_b = _reconstruct_both(src, rec, [*QUICK, "--train", "norms", "--adapter", "masklora"])
    _assert_same_reconstruction(src, memory, streamed, sum_a, sum_b)
    assert _metadata(streamed / "masks.safetensors") == _metadata(src / "masks.safetensors")
    adapted = tmp_path / "retrained"
    result = run_cli("retrain", src, "-o", adapted, "--train", "norms", "--adapter", "masklora", "--data", CORPUS, "--seqlen", "32", "--steps", "2",
                     "--batch-size", "2", "--lr", "1e-2", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    merged_memory, merged_streamed, _, _ = _merge_both(adapted, tmp_path / "merge", [], "60KB")
    assert_same_tensors(read_weights(merged_memory), read_weights(merged_streamed))
    assert _metadata(merged_streamed / "masks.safetensors") == _metadata(src / "masks.safetensors")
    checkpoint.open(merged_streamed)


def test_streamed_reconstruct_loads_in_plain_transformers(pruned: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src, _ = pruned["opt"]
    memory, streamed, _, _ = _reconstruct_both(src, tmp_path, QUICK, "5GB")
    # one file each: the same bytes as save_pretrained writes
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(streamed)
    assert model.lm_head.weight is model.get_input_embeddings().weight


# ----------------------------------------------------------------------------- memory


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
            if not any(n.startswith(prefix) for n in pruned_live):  # the engine catching the blocks' inputs
                assert not dense_live
                return
            assert only_block(pruned_live, index) and only_block(dense_live, index), (pruned_live, dense_live)
            assert real_masks() and only_block(real_masks(), index)
            seen.append(f"pruned {index}")
        return hook

    def on_dense(index: int):
        def hook(module, args, kwargs):
            dense_live = _live(dense_model)
            if not any(n.startswith(prefix) for n in dense_live):  # catching the dense stream's inputs
                assert not _live(model)
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
    checkpoint.open(tmp_path / "out")


# ----------------------------------------------------------------------------- failures


def test_an_interrupt_during_a_streamed_reconstruct_leaves_no_output(pruned: dict, tmp_path: Path, monkeypatch) -> None:
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
def test_reconstruct_usage_errors(args: list[str], message: str, pruned: dict, tmp_path: Path) -> None:
    src, _ = pruned["opt"]
    result = run_cli("reconstruct", src, "-o", tmp_path / "out", *QUICK, *args, "-q")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_auto_counts_both_models_of_a_reconstruct(pruned: dict, monkeypatch) -> None:
    src, _ = pruned["opt"]
    size = streaming.weights_bytes(src, "auto")
    monkeypatch.setattr(memory, "process_limit", lambda: 3 * size)
    assert not streaming.decide("auto", src).stream  # one model: 1/3 of the memory
    assert streaming.decide("auto", src, models=2).stream  # pruned + dense: 2/3
    assert not streaming.decide("off", src, models=2).stream


def test_mask_reader_reads_one_block_of_masks(pruned: dict) -> None:
    src, _ = pruned["llama"]
    reader = shards.MaskReader.open(src, checkpoint.read_manifest(src))
    full = reader.mask_set()
    names = [n for n in sorted(full.names()) if n.startswith("model.layers.1.")]
    got = reader.read(names)
    assert list(got) == names and all(torch.equal(got[n], full[n]) for n in names)
    placeholders = reader.placeholders()
    assert placeholders.pattern == full.pattern and placeholders.names() == sorted(full.names())
    assert all(placeholders[n].shape == full[n].shape for n in full.names())


# ----------------------------------------------------------------------------- a real checkpoint


@pytest.mark.slow
@pytest.mark.shared
def test_real_checkpoint_reconstructs_bit_identically_streamed(tmp_path: Path) -> None:
    src = shared_path("models", "stories260K")
    data = str(shared_path("data", "wikitext-2-raw", "wiki.valid.raw"))
    calib = ["--calib", data, "--nsamples", "8", "--seqlen", "128", "--batch-size", "4", "--device", "cpu"]
    result = run_cli("prune", src, "-o", tmp_path / "wanda", "--method", "wanda", *calib, "-q")
    assert result.exit_code == 0, result.stderr
    args = [*calib, "--steps-per-block", "5", "--train", "norms"]
    memory, streamed, sum_a, sum_b = _reconstruct_both(tmp_path / "wanda", tmp_path, args, "200KB")
    _assert_same_reconstruction(tmp_path / "wanda", memory, streamed, sum_a, sum_b)


# ----------------------------------------------------------------------------- merge


def adapted(path: Path, family: str, kind: str, shard: str = "60KB", pruned: bool = True) -> Path:
    """A (pruned) tiny checkpoint with `kind` adapters whose factors look trained, written
    by `checkpoint.save` as `perp retrain` writes it (sharded at `shard`)."""
    model = tiny.build_model(family)
    masks = magnitude_masks(model, 0.6) if pruned else None
    ads = trained_adapters(model, kind, masks)
    adapters.detach(model)
    checkpoint.save(path, model, tiny.build_tokenizer(), masks, manifest_in=empty_manifest(f"tiny-{family}"),
                    step=StepRecord("retrain", {"adapter": kind}, f"tiny-{family}"), adapters=adapters.state_dict(ads),
                    adapters_config=adapters.config(ads, None), max_shard_size=shard)
    return path


MERGE_CASES = [
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


@pytest.mark.parametrize(("family", "kind", "extra"), MERGE_CASES, ids=[f"{f}-{k}{''.join(e)}" for f, k, e in MERGE_CASES])
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
    checkpoint.open(streamed)  # mask hash, exact zeros, finiteness: the reader's own checks


def test_single_file_merge_has_the_bytes_save_pretrained_writes(tmp_path: Path) -> None:
    """An unsharded input and output: one file each, byte for byte the same, and the
    merged model computes what the unmerged one with adapters attached computes."""
    from transformers import AutoModelForCausalLM

    src = adapted(tmp_path / "in", "opt", "masklora", shard="5GB")
    memory, streamed, _, _ = _merge_both(src, tmp_path, [], shard="5GB")
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    merged = AutoModelForCausalLM.from_pretrained(streamed)
    reference = checkpoint.open(src)
    adapters.attach_from_checkpoint(reference)
    ids = torch.randint(4, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference.model(ids).logits, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- memory


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
    masks = shards.MaskReader.open(src, None).mask_set()
    name = next(n for n in masks.names() if n.startswith("model.layers.1."))
    tensors[name][~masks[name]] = 1.0  # pruned weights of block 1 come back
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    # --trust-inputs: past the weights' hash, to the check under test
    result = run_cli("merge", src, "-o", tmp_path / "out", "--streaming", "on", "-q", "--trust-inputs")
    assert result.exit_code == 1 and "disagree" in result.stderr and name in result.stderr
    _nothing_written(tmp_path / "out")


def test_merge_usage_errors(tmp_path: Path) -> None:
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


def test_the_mask_spool_assembles_the_file_masks_in_memory_write(tmp_path: Path) -> None:
    """What a spool assembles is what `shards.write_masks` writes from masks held in
    memory: the same bytes, hash, statistics and read-back digests; a name spooled twice
    is an error, and an unused spool leaves nothing behind."""
    from perp_cli.mask import MaskSet, PackedMasks, Pattern, pack_bits

    generator = torch.Generator().manual_seed(0)
    keeps = {"b.weight": torch.rand(5, 24, generator=generator) < 0.5, "a.weight": torch.rand(3, 8, 2, generator=generator) < 0.25}
    order = {"b.weight": torch.randperm(24, generator=generator)}
    spooled, held = tmp_path / "spooled", tmp_path / "held"
    spooled.mkdir(), held.mkdir()
    spool = streaming.MaskSpool(spooled)
    for name, keep in keeps.items():
        spool.add(name, keep)
    with pytest.raises(ValueError, match="already spooled"):
        spool.set_packed("a.weight", pack_bits(keeps["a.weight"]), (3, 8, 2))
    spool.pattern, spool.permutations = Pattern(), order
    sha = spool.finish()
    masks = MaskSet(PackedMasks(keeps), Pattern(), order)
    shapes = {n: list(masks.masks.shape(n)) for n in masks.masks}
    assert shards.write_masks(held, shapes, masks.pattern, order, masks.masks.packed) == sha
    assert (spooled / shards.MASKS_NAME).read_bytes() == (held / shards.MASKS_NAME).read_bytes()
    assert spool.stats == masks.stats()
    shards.verify_masks(spooled, sha, spool.digests)
    assert sorted(p.name for p in spooled.iterdir()) == [shards.MASKS_NAME]
    unused = streaming.MaskSpool(tmp_path / "held")
    unused.discard()
    assert sorted(p.name for p in held.iterdir()) == [shards.MASKS_NAME]
