"""Every bad input gets one clear line, the documented exit code, and loses nothing.

Each case builds its broken input, runs the real CLI in-process through `main`, and checks:
the exit code, a message fragment, no traceback, a single line on stderr, no output
directory (and no temporary), and the input directories byte-for-byte unchanged.
docs/reliability.md lists the same cases.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from perp_cli import tiny
from perp_cli.manifest import sha256_file

from conftest import run_cli, save_tiny, tree_digest

CORPUS = Path(__file__).resolve().parents[2] / "perp_cli" / "demo" / "corpus.txt"
CALIB = ["--calib", str(CORPUS), "--calib-concat", "--nsamples", "4", "--seqlen", "32"]


@dataclass
class Env:
    root: Path
    dense: Path
    pruned: Path
    out: Path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad-inputs")
    dense = save_tiny(root / "dense", "opt")
    result = run_cli("prune", dense, "-o", root / "pruned", "--method", "magnitude", "--sparsity", "0.5", "-q")
    assert result.exit_code == 0, result.stderr
    return Env(root, dense, root / "pruned", root / "out")


@pytest.fixture
def env(base: Env, tmp_path: Path) -> Env:
    """Fresh copies per case, so a case may break its inputs freely."""
    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    shutil.copytree(base.dense, dense)
    shutil.copytree(base.pruned, pruned)
    return Env(tmp_path, dense, pruned, tmp_path / "out")


# --- input breakers -------------------------------------------------------------------


def truncate_weights(e: Env) -> None:
    f = e.dense / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def garbage_weights(e: Env) -> None:
    (e.dense / "model.safetensors").write_bytes(os.urandom(4096))


def drop_a_shard(e: Env) -> None:
    shutil.rmtree(e.dense)
    tiny.build_model("opt").save_pretrained(e.dense, max_shard_size="100KB")
    tiny.build_tokenizer().save_pretrained(e.dense)
    sorted(e.dense.glob("model-0*.safetensors"))[1].unlink()


def foreign_masks(e: Env) -> None:
    other = save_tiny(e.root / "llama", "llama")
    assert run_cli("prune", other, "-o", e.root / "llama-pruned", "--method", "magnitude", "--sparsity", "0.5", "-q").exit_code == 0
    shutil.copy(e.root / "llama-pruned" / "masks.safetensors", e.pruned / "masks.safetensors")
    manifest = json.loads((e.pruned / "perp.json").read_text())
    manifest["masks_sha256"] = sha256_file(e.pruned / "masks.safetensors")
    (e.pruned / "perp.json").write_text(json.dumps(manifest))


def tamper_mask_hash(e: Env) -> None:
    manifest = json.loads((e.pruned / "perp.json").read_text())
    manifest["masks_sha256"] = "f" * 64
    (e.pruned / "perp.json").write_text(json.dumps(manifest))


def revive_pruned_weights(e: Env) -> None:
    f = e.pruned / "model.safetensors"
    weights = load_file(str(f))
    name = "model.decoder.layers.0.fc1.weight"
    weights[name] = torch.where(weights[name] == 0, torch.full_like(weights[name], 0.01), weights[name])
    save_file(weights, str(f), metadata={"format": "pt"})


def newer_manifest(e: Env) -> None:
    manifest = json.loads((e.pruned / "perp.json").read_text())
    manifest["format_version"] = 999
    (e.pruned / "perp.json").write_text(json.dumps(manifest))


def remove_tokenizer(e: Env) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (e.dense / name).unlink(missing_ok=True)


def pickle_only(e: Env) -> None:
    state = load_file(str(e.dense / "model.safetensors"))
    torch.save(state, e.dense / "pytorch_model.bin")
    (e.dense / "model.safetensors").unlink()


def unknown_architecture(e: Env) -> None:
    from transformers import AutoModelForCausalLM

    shutil.rmtree(e.dense)
    # XLM keeps attention and feed-forward layers in separate lists: no decoder blocks to find
    AutoModelForCausalLM.from_config(tiny.shrunk_config("xlm")).save_pretrained(e.dense)


def nan_weights(e: Env) -> None:
    f = e.dense / "model.safetensors"
    weights = load_file(str(f))
    weights["model.decoder.layers.1.fc2.weight"][3, 3] = float("nan")
    save_file(weights, str(f), metadata={"format": "pt"})


def remote_code_config(e: Env) -> None:
    config = json.loads((e.dense / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (e.dense / "config.json").write_text(json.dumps(config))
    (e.dense / "evil.py").write_text("raise SystemExit('remote code ran')\n")


def write_file(name: str, content: bytes) -> Callable[[Env], None]:
    def make(e: Env) -> None:
        (e.root / name).write_bytes(content)

    return make


def output_is_symlink(e: Env) -> None:
    (e.root / "elsewhere").mkdir()
    e.out.symlink_to(e.root / "elsewhere")


def parent_is_a_file(e: Env) -> None:
    # permission bits do not stop root (CI runs as root), so use a path no one can create
    (e.root / "ro").write_text("a file, not a directory")


def retrained_with_plain_lora(e: Env) -> None:
    out = e.root / "lora"
    result = run_cli("retrain", e.pruned, "-o", out, "--train", "none", "--adapter", "lora", "--data", str(CORPUS),
                     "--steps", "2", "--batch-size", "1", "--seqlen", "32", "-q")
    assert result.exit_code == 0, result.stderr
    shutil.rmtree(e.pruned)
    shutil.copytree(out, e.pruned)


# --- the cases ------------------------------------------------------------------------

D, P, O = "{dense}", "{pruned}", "{out}"
PRUNE = ["prune", D, "-o", O, "--method", "magnitude", "--sparsity", "0.5"]
WANDA = ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.5", *CALIB]
RETRAIN = ["retrain", P, "-o", O, "--data", str(CORPUS), "--steps", "2", "--batch-size", "1", "--seqlen", "32"]

# (id, breaker, argv, exit code, message fragment)
CASES: list[tuple[str, Callable[[Env], None] | None, list[str], int, str]] = [
    # corrupt or mismatched inputs
    ("truncated-weights", truncate_weights, PRUNE, 1, "truncated"),
    ("garbage-weights", garbage_weights, PRUNE, 1, "not a readable safetensors"),
    ("missing-shard", drop_a_shard, PRUNE, 1, "missing shard"),
    ("masks-of-another-model", foreign_masks, ["merge", P, "-o", O], 1, "names no parameter"),
    ("mask-hash-mismatch", tamper_mask_hash, ["merge", P, "-o", O], 1, "sha256"),
    ("nonzero-where-pruned", revive_pruned_weights, RETRAIN, 1, "nonzero"),
    ("newer-manifest", newer_manifest, ["merge", P, "-o", O], 1, "format version"),
    ("no-tokenizer", remove_tokenizer, WANDA, 1, "tokenizer"),
    ("pickle-only", pickle_only, PRUNE, 1, "--allow-pickle"),
    ("unknown-architecture", unknown_architecture, PRUNE, 1, "cannot find the decoder blocks of XLMWithLMHeadModel"),
    ("nan-weights", nan_weights, PRUNE, 1, "NaN"),
    ("missing-input", None, ["prune", "{root}/nope", "-o", O, "--method", "magnitude", "--sparsity", "0.5"], 1, "no such directory"),
    # bad arguments
    ("sparsity-negative", None, ["prune", D, "-o", O, "--method", "magnitude", "--sparsity", "-0.1"], 2, "sparsity"),
    ("sparsity-one", None, ["prune", D, "-o", O, "--method", "magnitude", "--sparsity", "1.0"], 2, "sparsity"),
    ("nm-n-not-below-m", None, ["prune", D, "-o", O, "--method", "magnitude", "--pattern", "4:4"], 2, "N:M"),
    ("nm-indivisible", None, ["prune", D, "-o", O, "--method", "magnitude", "--pattern", "3:5"], 2, "5"),
    ("nm-contradicting-sparsity", None, ["prune", D, "-o", O, "--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.7"], 2, "2:4"),
    ("seqlen-above-positions", None, ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.5",
                                      "--calib", str(CORPUS), "--seqlen", "100000"], 2, "positions"),
    ("nsamples-zero", None, ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.5", "--calib", str(CORPUS),
                             "--nsamples", "0"], 2, "nsamples"),
    ("empty-calibration", write_file("empty.txt", b"\n\n"), ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.5",
                                                              "--calib", "{root}/empty.txt"], 1, "no text"),
    ("binary-calibration", write_file("bin.txt", bytes(range(256)) * 8), ["prune", D, "-o", O, "--method", "wanda",
                                                                          "--sparsity", "0.5", "--calib", "{root}/bin.txt"], 1, "UTF-8"),
    ("too-few-long-documents", write_file("short.jsonl", b'{"text": "tiny"}\n' * 20),
     ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.5", "--calib", "{root}/short.jsonl", "--seqlen", "64"], 1, "--calib-concat"),
    ("output-equals-input", None, ["prune", D, "-o", D, "--method", "magnitude", "--sparsity", "0.5", "--overwrite"], 2, "input"),
    ("output-inside-input", None, ["prune", D, "-o", D + "/sub", "--method", "magnitude", "--sparsity", "0.5"], 2, "input"),
    ("output-exists", None, ["prune", D, "-o", P, "--method", "magnitude", "--sparsity", "0.5"], 2, "--overwrite"),
    ("output-unwritable", parent_is_a_file, ["prune", D, "-o", "{root}/ro/out", "--method", "magnitude", "--sparsity", "0.5"], 2, "cannot write"),
    ("output-symlink", output_is_symlink, ["prune", D, "-o", O, "--method", "magnitude", "--sparsity", "0.5"], 2, "symlink"),
    ("targets-match-nothing", None, ["prune", D, "-o", O, "--method", "magnitude", "--sparsity", "0.5", "--targets", "no_such_layer"], 2, "matches no"),
    ("bad-dtype", None, ["prune", D, "-o", O, "--method", "magnitude", "--sparsity", "0.5", "--dtype", "float8"], 2, "dtype"),
    ("cuda-without-gpu", None, ["prune", D, "-o", O, "--method", "magnitude", "--sparsity", "0.5", "--device", "cuda"], 2, "CUDA"),
    ("unknown-method", None, ["prune", D, "-o", O, "--method", "obs"], 2, "method"),
    ("retrain-masklora-without-masks", None, ["retrain", D, "-o", O, "--adapter", "masklora", "--data", str(CORPUS),
                                              "--steps", "2", "--seqlen", "32"], 2, "mask"),
    ("merge-lora-densifies", retrained_with_plain_lora, ["merge", P, "-o", O], 2, "--allow-densify"),
    ("reconstruct-without-masks", None, ["reconstruct", D, "-o", O, "--dense", D, *CALIB], 2, "mask"),
    ("reconstruct-other-architecture", None, ["reconstruct", P, "-o", O, "--dense", "{root}/llama", *CALIB], 2, ""),
    # numerical faults
    ("reconstruct-loss-diverges", None, ["reconstruct", P, "-o", O, "--dense", D, *CALIB, "--lr", "1e30",
                                         "--train", "all", "--steps-per-block", "3"], 1, ""),
    ("retrain-loss-diverges", None, RETRAIN + ["--lr", "1e30", "--train", "all"], 1, ""),
]


# --- issue 19: hostile inputs that once lost or corrupted data ------------------------


def _manifest(path: Path) -> dict:
    return json.loads((path / "perp.json").read_text())


def _write_manifest(path: Path, manifest) -> None:
    (path / "perp.json").write_text(json.dumps(manifest))


def _rewrite_header(file: Path, edit: Callable[[dict], None], data_bytes: int | None = None) -> None:
    """Rewrite a safetensors header in place of the old one (data kept; optionally the
    data section resized, sparse, to what the new header declares)."""
    import struct

    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + length :])
        if data_bytes is not None:
            f.truncate(8 + len(text) + data_bytes)


def drop_a_tensor(e: Env) -> None:
    f = e.dense / "model.safetensors"
    weights = load_file(str(f))
    del weights["model.decoder.layers.1.fc1.weight"]
    save_file(weights, str(f), metadata={"format": "pt"})


def config_of_another_family(e: Env) -> None:
    other = save_tiny(e.root / "llama-config", "llama")
    shutil.copy(other / "config.json", e.dense / "config.json")


def header_claims_beyond_file(e: Env) -> None:
    def grow(header: dict) -> None:
        info = header["model.decoder.embed_tokens.weight"]
        info["shape"] = [20_000_000, info["shape"][1]]
        info["data_offsets"][1] = info["data_offsets"][0] + 20_000_000 * info["shape"][1] * 4

    _rewrite_header(e.dense / "model.safetensors", grow)


def sparse_embedding_bomb(e: Env) -> None:
    """A header whose 20M-row embedding the (sparse) file really holds: only the config
    can tell it is a lie, and it must, before 5 GB are allocated."""
    claim = 20_000_000 * 64 * 4
    state = {}

    def grow(header: dict) -> None:
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        header["model.decoder.embed_tokens.weight"] = {"dtype": "F32", "shape": [20_000_000, 64], "data_offsets": [end, end + claim]}
        state["size"] = end + claim

    f = e.dense / "model.safetensors"
    _rewrite_header(f, grow)
    import struct

    with open(f, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        fh.truncate(8 + length + state["size"])  # sparse: no disk is used


def config_vocab_bomb(e: Env) -> None:
    config = json.loads((e.dense / "config.json").read_text())
    config["vocab_size"] = 20_000_000
    (e.dense / "config.json").write_text(json.dumps(config))


def config_layer_bomb(e: Env) -> None:
    config = json.loads((e.dense / "config.json").read_text())
    config["num_hidden_layers"] = 1_000_000
    (e.dense / "config.json").write_text(json.dumps(config))


def _update_mask_hash(e: Env) -> None:
    manifest = _manifest(e.pruned)
    manifest["masks_sha256"] = sha256_file(e.pruned / "masks.safetensors")
    _write_manifest(e.pruned, manifest)


def mask_bomb(e: Env) -> None:
    """masks.safetensors declaring a 20000 x 1000000 mask (2.5 GB packed, sparse file)."""
    name = "model.decoder.layers.0.fc1.weight"
    packed = 20_000 * 1_000_000 // 8

    def grow(header: dict) -> None:
        for key in [k for k in header if k != "__metadata__"]:
            del header[key]
        header[name] = {"dtype": "U8", "shape": [packed], "data_offsets": [0, packed]}
        header["__metadata__"]["shapes"] = json.dumps({name: [20_000, 1_000_000]})

    _rewrite_header(e.pruned / "masks.safetensors", grow, data_bytes=packed)
    _update_mask_hash(e)


def mask_metadata(key: str, value: str) -> Callable[[Env], None]:
    def make(e: Env) -> None:
        def edit(header: dict) -> None:
            header["__metadata__"][key] = value

        _rewrite_header(e.pruned / "masks.safetensors", edit)
        _update_mask_hash(e)

    return make


def masks_of_another_sparsity(e: Env) -> None:
    other = e.root / "p70"
    assert run_cli("prune", e.dense, "-o", other, "--method", "magnitude", "--sparsity", "0.7", "-q").exit_code == 0
    shutil.copy(other / "masks.safetensors", e.pruned / "masks.safetensors")
    shutil.copy(other / "model.safetensors", e.pruned / "model.safetensors")
    manifest = _manifest(e.pruned)
    manifest["masks_sha256"] = sha256_file(e.pruned / "masks.safetensors")
    manifest["weights_sha256"] = _manifest(other)["weights_sha256"]
    _write_manifest(e.pruned, manifest)  # hashes updated, the recorded 50% sparsity left


def edit_kept_weight(e: Env) -> None:
    f = e.pruned / "model.safetensors"
    weights = load_file(str(f))
    w = weights["model.decoder.layers.0.fc1.weight"]
    w[w != 0] *= 1.5  # kept weights changed, pruned ones still zero: masks cannot tell
    save_file(weights, str(f), metadata={"format": "pt"})


def replace_source_weights(e: Env) -> None:
    shutil.rmtree(e.dense)
    save_tiny(e.dense, "opt", seed=1)


def manifest_field(key: str, value) -> Callable[[Env], None]:
    def make(e: Env) -> None:
        manifest = _manifest(e.pruned)
        manifest[key] = value
        _write_manifest(e.pruned, manifest)

    return make


def manifest_is_a_list(e: Env) -> None:
    (e.pruned / "perp.json").write_text("[]")


def retrained_with_masklora(e: Env) -> None:
    out = e.root / "adapted"
    result = run_cli("retrain", e.pruned, "-o", out, "--train", "none", "--adapter", "masklora", "--rank", "4",
                     "--data", str(CORPUS), "--steps", "2", "--batch-size", "1", "--seqlen", "32", "-q")
    assert result.exit_code == 0, result.stderr
    shutil.rmtree(e.pruned)
    shutil.copytree(out, e.pruned)


def swap_adapters(e: Env) -> None:
    retrained_with_masklora(e)
    f = e.pruned / "adapters.safetensors"
    tensors = load_file(str(f))
    for t in tensors.values():
        t.mul_(3.0)
    save_file(tensors, str(f))


def adapters_json_without_rank(e: Env) -> None:
    retrained_with_masklora(e)
    cfg = json.loads((e.pruned / "adapters.json").read_text())
    del cfg["rank"]
    (e.pruned / "adapters.json").write_text(json.dumps(cfg))


def foreign_output(e: Env) -> None:
    e.out.mkdir()
    (e.out / "notes.txt").write_text("a user's file")


def calibration_inside_output(e: Env) -> None:
    assert run_cli("prune", e.dense, "-o", e.out, "--method", "magnitude", "--sparsity", "0.5", "-q").exit_code == 0
    shutil.copy(CORPUS, e.out / "tokens.txt")


def symlink_loop(e: Env) -> None:
    (e.root / "loop").symlink_to(e.root / "loop")


def calibration_fifo(e: Env) -> None:
    os.mkfifo(e.root / "fifo.txt")


def tokenizer_beyond_vocabulary(e: Env) -> None:
    shutil.rmtree(e.dense)
    save_tiny(e.dense, "opt", vocab_size=100)


def memory_limited_cgroup(e: Env) -> None:
    root = e.root / "fakeroot"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text("MemAvailable: 999999999 kB\n")
    (root / "proc/self/cgroup").write_text("0::/job\n")
    (root / "sys/fs/cgroup/job").mkdir(parents=True)
    (root / "sys/fs/cgroup/cgroup.controllers").write_text("memory\n")
    (root / "sys/fs/cgroup/job/memory.max").write_text("100000\n")
    (root / "sys/fs/cgroup/job/memory.current").write_text("0\n")
    os.environ["PERP_MEMORY_ROOT"] = str(root)


@pytest.fixture(autouse=True)
def _no_fake_memory_root():
    yield
    os.environ.pop("PERP_MEMORY_ROOT", None)


MERGE = ["merge", P, "-o", O]
RECONSTRUCT = ["reconstruct", P, "-o", O, "--dense", D, *CALIB, "--steps-per-block", "1"]
CASES += [
    # 1. outputs that would delete inputs or a user's files
    ("output-ancestor-of-input", None, ["prune", D, "-o", "{root}", "--method", "magnitude", "--sparsity", "0.5", "--overwrite"], 2, "contains the input"),
    ("merge-output-ancestor", None, ["merge", P, "-o", "{root}", "--overwrite"], 2, "contains the input"),
    ("overwrite-foreign-directory", foreign_output, PRUNE + ["--overwrite"], 2, "--overwrite-foreign"),
    ("overwrite-holds-calibration", calibration_inside_output, WANDA[:-7] + ["--calib", O + "/tokens.txt", "--calib-concat",
                                                                         "--nsamples", "4", "--seqlen", "32", "--overwrite"], 2, "contains the input"),
    ("output-with-newline", None, ["prune", D, "-o", "{root}/a\nb", "--method", "magnitude", "--sparsity", "0.5"], 2, "control character"),
    # 2. weights that do not fit the config
    ("missing-tensor", drop_a_tensor, PRUNE, 1, "model.decoder.layers.1.fc1.weight is not in"),
    ("missing-tensor-retrain", drop_a_tensor, ["retrain", D, "-o", O, "--data", str(CORPUS), "--steps", "2", "--batch-size", "1", "--seqlen", "32"], 1, "is not in"),
    ("config-of-another-family", config_of_another_family, PRUNE, 1, "another model"),
    # 3. memory bombs
    ("header-claims-beyond-file", header_claims_beyond_file, PRUNE, 1, "header that lies"),
    ("sparse-embedding-bomb", sparse_embedding_bomb, PRUNE, 1, "config"),
    ("config-vocab-bomb", config_vocab_bomb, PRUNE, 1, "do not fit config.json"),
    ("config-vocab-bomb-inspect", config_vocab_bomb, ["inspect", D, "-q"], 1, "do not fit config.json"),
    ("config-layer-bomb", config_layer_bomb, PRUNE, 1, "1000000 layers"),
    ("mask-bomb-merge", mask_bomb, MERGE, 1, "(20000, 1000000)"),
    ("mask-bomb-inspect", mask_bomb, ["inspect", P, "-q"], 3, "(20000, 1000000)"),
    ("memory-limit-cgroup", memory_limited_cgroup, PRUNE + ["--streaming", "off"], 1, "cgroup v2 memory.max"),
    # 4-5. request sizes
    ("nsamples-beyond-data", None, ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.5", "--calib", str(CORPUS),
                                    "--calib-concat", "--seqlen", "32", "--nsamples", "10000"], 2, "windows of 32"),
    ("nsamples-beyond-memory", None, ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.5", "--calib", str(CORPUS),
                                      "--calib-concat", "--seqlen", "32", "--nsamples", "1000000000"], 1, "activations needs about"),
    ("retrain-tokens-absurd", None, RETRAIN[:-6] + ["--batch-size", "1", "--seqlen", "32", "--tokens", "1000000000000000"], 1, "needs about"),
    ("rank-above-matrix", None, RETRAIN + ["--adapter", "masklora", "--rank", "100000"], 2, "min(out, in)"),
    ("steps-zero", None, RETRAIN[:-6] + ["--batch-size", "1", "--seqlen", "32", "--steps", "0"], 2, "--steps"),
    ("steps-per-block-negative", None, ["reconstruct", P, "-o", O, "--dense", D, *CALIB, "--steps-per-block", "-1"], 2, "--steps-per-block"),
    ("granularity-unknown", None, RECONSTRUCT + ["--granularity", "foo"], 2, "--granularity 'foo' is not one of block, sublayer"),
    ("granularity-sublayer-interleaved", None, ["reconstruct", D, "-o", O, *CALIB, "--prune-method", "wanda", "--granularity", "sublayer"],
     2, "--granularity block only"),
    ("batch-size-zero", None, WANDA + ["--batch-size", "0"], 2, "--batch-size"),
    # 6. integrity
    ("swapped-adapters", swap_adapters, MERGE, 1, "adapters.safetensors does not match the sha256"),
    ("masks-of-another-sparsity", masks_of_another_sparsity, MERGE, 1, "records 0.5000"),
    ("source-weights-replaced", replace_source_weights, RECONSTRUCT, 1, "pruned from"),
    ("kept-weights-edited", edit_kept_weight, MERGE, 1, "weights_sha256"),
    # 8. slow or long errors
    ("hub-unreachable", None, ["prune", "no-such-model-xyz", "-o", O, "--method", "magnitude", "--sparsity", "0.5"], 1, "hub is unreachable"),
    ("symlink-loop", symlink_loop, ["prune", "{root}/loop", "-o", O, "--method", "magnitude", "--sparsity", "0.5"], 1, "symlink loop"),
    ("garbage-parquet", write_file("bad.parquet", os.urandom(2048)), WANDA[:-7] + ["--calib", "{root}/bad.parquet"], 1, "parquet"),
    # 9. malformed files: exit 1 and a CheckpointError, never an internal error
    ("mask-pattern-corrupt", mask_metadata("pattern", "7:x"), MERGE, 1, "bad pattern"),
    ("masks-format-version-word", mask_metadata("format_version", "one"), MERGE, 1, "not a number"),
    ("manifest-is-a-list", manifest_is_a_list, MERGE, 1, "malformed"),
    ("history-is-a-number", manifest_field("history", 5), RECONSTRUCT, 1, "'history'"),
    ("source-model-is-a-number", manifest_field("source_model", 5), ["reconstruct", P, "-o", O, *CALIB], 1, "'source_model'"),
    ("adapters-json-without-rank", adapters_json_without_rank, MERGE, 1, "rank"),
    ("seed-beyond-64-bits", None, PRUNE + ["--seed", str(2**64)], 2, "--seed"),
    ("weight-decay-nan", None, RETRAIN + ["--weight-decay", "nan"], 2, "finite"),
    ("alpha-nan", None, RETRAIN + ["--adapter", "masklora", "--alpha", "nan"], 2, "finite"),
    ("tokenizer-beyond-vocabulary", tokenizer_beyond_vocabulary, WANDA, 1, "tokenizer has"),
    # 11. OWL, RIA permutation, DSnoT (issue 15)
    ("owl-with-nm", None, ["prune", D, "-o", O, "--method", "wanda", "--pattern", "2:4", "--allocation", "owl", *CALIB], 2, "cannot be combined with --pattern 2:4"),
    ("owl-lambda-above-s", None, ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.1", "--allocation", "owl", "--owl-lambda", "0.2", *CALIB], 2, "--owl-lambda must be in [0, min(S, 1-S)]"),
    ("owl-lambda-negative", None, ["prune", D, "-o", O, "--method", "wanda", "--sparsity", "0.5", "--allocation", "owl", "--owl-lambda", "-0.1", *CALIB], 2, "--owl-lambda"),
    ("owl-lambda-without-owl", None, WANDA + ["--owl-lambda", "0.1"], 2, "apply to --allocation owl"),
    ("allocation-unknown", None, WANDA + ["--allocation", "erk"], 2, "--allocation 'erk'"),
    ("permute-unstructured", None, ["prune", D, "-o", O, "--method", "ria", "--sparsity", "0.5", "--permute", *CALIB], 2, "needs --pattern N:M"),
    ("permute-sparsegpt", None, ["prune", D, "-o", O, "--method", "sparsegpt", "--pattern", "2:4", "--permute", *CALIB], 2, "not available for sparsegpt"),
    ("refine-unknown", None, WANDA + ["--refine", "sparseswaps"], 2, "--refine 'sparseswaps'"),
    ("refine-iters-zero", None, WANDA + ["--refine", "dsnot", "--refine-iters", "0"], 2, "--refine-iters"),
    ("refine-on-dense", None, ["prune", D, "-o", O, "--method", "keep", "--refine", "dsnot", *CALIB], 2, "has no masks.safetensors"),
    ("keep-without-refine", None, ["prune", P, "-o", O, "--method", "keep"], 2, "--method keep prunes nothing new"),
    ("keep-with-sparsity", None, ["prune", P, "-o", O, "--method", "keep", "--refine", "dsnot", "--sparsity", "0.7", *CALIB], 2, "drop --sparsity"),
    ("dense-without-keep", None, WANDA + ["--dense", D], 2, "--dense is for --method keep"),
    # 10. minor
    ("calibration-fifo", calibration_fifo, WANDA[:-7] + ["--calib", "{root}/fifo.txt"], 2, "regular file"),
]


PRE_EXISTING_OUTPUT = {"overwrite-foreign-directory", "overwrite-holds-calibration"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env: Env, case) -> None:
    name, breaker, argv, code, fragment = case
    if breaker is not None:
        breaker(env)
    if name == "reconstruct-other-architecture":
        save_tiny(env.root / "llama", "llama")
    before = {p: tree_digest(p) for p in (env.dense, env.pruned) if p.exists()}
    out_before = tree_digest(env.out) if env.out.exists() else None
    args = [a.format(dense=env.dense, pruned=env.pruned, out=env.out, root=env.root) for a in argv]
    result = run_cli(*args)
    assert result.exit_code == code, f"{name}: exit {result.exit_code}\n{result.stderr}"
    assert fragment in result.stderr, f"{name}: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    assert "internal error" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("perp: error:"), f"{name}: {result.stderr!r}"
    if name in PRE_EXISTING_OUTPUT:
        assert tree_digest(env.out) == out_before, f"{name}: the existing output was modified"
    elif name not in ("output-exists", "output-symlink"):
        assert not env.out.exists() or name == "output-equals-input"
    assert not list(env.root.glob(".*perp-tmp-*")) and not list(env.root.glob(".*perp-old-*"))
    for path, digest in before.items():
        if path.exists() and name != "output-unwritable":
            assert tree_digest(path) == digest, f"{name}: {path} was modified"


def test_code_shipped_in_a_checkpoint_never_runs_by_default(env: Env) -> None:
    remote_code_config(env)
    result = run_cli("prune", env.dense, "-o", env.out, "--method", "magnitude", "--sparsity", "0.5", "-q")
    # transformers uses its own OPT class; the checkpoint's evil.py is never imported
    assert "remote code ran" not in result.stderr + result.stdout
    assert result.exit_code == 0, result.stderr
    # the output holds no evil.py, so its config must not point at it
    assert "auto_map" not in json.loads((env.out / "config.json").read_text())


# --- disk full, however the library words it (issue 19, item 7) -------------------------


def _assert_one_line_and_nothing_left(result, env: Env, fragment: str, before: dict) -> None:
    assert result.exit_code == 1, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("perp: error:") and fragment in lines[0], result.stderr
    assert not env.out.exists()
    assert not list(env.root.glob(".*perp-tmp-*")) and not list(env.root.glob(".*tmp-*"))
    for path, digest in before.items():
        assert tree_digest(path) == digest


def test_disk_full_in_memory_write_is_one_line(env: Env, monkeypatch) -> None:
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    before = {env.dense: tree_digest(env.dense)}
    result = run_cli("prune", env.dense, "-o", env.out, "--method", "magnitude", "--sparsity", "0.5", "--streaming", "off", "-q")
    _assert_one_line_and_nothing_left(result, env, "out of disk space", before)


def test_disk_full_streamed_write_is_one_line(env: Env, monkeypatch) -> None:
    from perp_cli import shards

    def full(*a, **k):
        raise Exception("No space left on device")  # how one library reported it

    monkeypatch.setattr(shards.ShardWriter, "write", full)
    before = {env.dense: tree_digest(env.dense)}
    result = run_cli("prune", env.dense, "-o", env.out, "--method", "magnitude", "--sparsity", "0.5", "--streaming", "on", "-q")
    _assert_one_line_and_nothing_left(result, env, "out of disk space", before)


def test_disk_full_eval_output_leaves_no_temporary(env: Env, monkeypatch) -> None:
    import errno

    from perp_cli import checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "replace", full)
    before = {env.pruned: tree_digest(env.pruned)}
    result = run_cli("eval", env.pruned, "--dataset", CORPUS, "--seqlen", "32", "--max-windows", "1", "-q",
                     "-o", env.root / "res.json")
    _assert_one_line_and_nothing_left(result, env, "out of disk space", before)
    assert not (env.root / "res.json").exists() and not list(env.root.glob(".res.json*"))


def test_trust_inputs_accepts_a_deliberate_edit(env: Env) -> None:
    edit_kept_weight(env)
    assert run_cli("inspect", env.pruned, "-q").exit_code == 3  # inspect reports it
    result = run_cli("prune", env.pruned, "-o", env.out, "--method", "magnitude", "--sparsity", "0.6", "-q", "--trust-inputs")
    assert result.exit_code == 0, result.stderr


def test_overwrite_replaces_a_checkpoint_perp_wrote_and_foreign_needs_the_flag(env: Env) -> None:
    assert run_cli("prune", env.dense, "-o", env.out, "--method", "magnitude", "--sparsity", "0.5", "-q").exit_code == 0
    assert run_cli("prune", env.dense, "-o", env.out, "--method", "magnitude", "--sparsity", "0.6", "-q", "--overwrite").exit_code == 0
    (env.out / "notes.txt").write_text("mine")
    assert run_cli("prune", env.dense, "-o", env.out, "--method", "magnitude", "--sparsity", "0.5", "-q", "--overwrite").exit_code == 2
    assert (env.out / "notes.txt").exists()
    result = run_cli("prune", env.dense, "-o", env.out, "--method", "magnitude", "--sparsity", "0.5", "-q", "--overwrite-foreign")
    assert result.exit_code == 0 and not (env.out / "notes.txt").exists()
