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

from conftest import run_cli, save_tiny

CORPUS = Path(__file__).resolve().parents[2] / "perp_cli" / "demo" / "corpus.txt"
CALIB = ["--calib", str(CORPUS), "--calib-concat", "--nsamples", "4", "--seqlen", "32"]


@dataclass
class Env:
    root: Path
    dense: Path
    pruned: Path
    out: Path


def _digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


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
    ("truncated-weights", truncate_weights, PRUNE, 1, "cannot load"),
    ("garbage-weights", garbage_weights, PRUNE, 1, "cannot load"),
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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env: Env, case) -> None:
    name, breaker, argv, code, fragment = case
    if breaker is not None:
        breaker(env)
    if name == "reconstruct-other-architecture":
        save_tiny(env.root / "llama", "llama")
    before = {p: _digest(p) for p in (env.dense, env.pruned) if p.exists()}
    args = [a.format(dense=env.dense, pruned=env.pruned, out=env.out, root=env.root) for a in argv]
    result = run_cli(*args)
    assert result.exit_code == code, f"{name}: exit {result.exit_code}\n{result.stderr}"
    assert fragment in result.stderr, f"{name}: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    assert "internal error" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("perp: error:"), f"{name}: {result.stderr!r}"
    if name not in ("output-exists", "output-symlink"):
        assert not env.out.exists() or name == "output-equals-input"
    assert not list(env.root.glob(".*perp-tmp-*"))
    for path, digest in before.items():
        if path.exists() and name != "output-unwritable":
            assert _digest(path) == digest, f"{name}: {path} was modified"


def test_code_shipped_in_a_checkpoint_never_runs_by_default(env: Env) -> None:
    remote_code_config(env)
    result = run_cli("prune", env.dense, "-o", env.out, "--method", "magnitude", "--sparsity", "0.5", "-q")
    # transformers uses its own OPT class; the checkpoint's evil.py is never imported
    assert "remote code ran" not in result.stderr + result.stdout
    assert result.exit_code == 0, result.stderr
