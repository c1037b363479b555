"""Property test: random hostile checkpoint directories, every command, the same promises.

Hypothesis builds a perp checkpoint and then damages it in random ways (safetensors
headers, shapes, offsets, manifests, masks, adapters, config, symlinks, missing files).
Each command then runs in-process through `main`, and whatever it makes of the damage:

* exit code 0 (the damage was harmless) or a documented failure code (1, 2, 3);
* a failure prints exactly one `perp: error:` line, never a traceback or "internal error";
* no temporary is left beside the output, and no output appears on failure;
* the input directory is byte-for-byte unchanged.

The examples are few and the model tiny, so it runs in well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perp_cli.manifest import sha256_file

from conftest import run_cli, save_tiny, tree_digest

CORPUS = Path(__file__).resolve().parents[2] / "perp_cli" / "demo" / "corpus.txt"
COMMANDS = {
    "inspect": lambda i, o: ["inspect", i, "-q"],
    "prune": lambda i, o: ["prune", i, "-o", o, "--method", "magnitude", "--sparsity", "0.5", "-q"],
    "merge": lambda i, o: ["merge", i, "-o", o, "-q"],
    "eval": lambda i, o: ["eval", i, "--dataset", str(CORPUS), "--seqlen", "32", "--max-windows", "1", "-q"],
    "retrain": lambda i, o: ["retrain", i, "-o", o, "--data", str(CORPUS), "--steps", "1", "--batch-size", "1",
                             "--seqlen", "16", "-q"],
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    dense = save_tiny(root / "dense", "opt")
    pruned = root / "pruned"
    assert run_cli("prune", dense, "-o", pruned, "--method", "magnitude", "--sparsity", "0.5", "-q").exit_code == 0
    adapted = root / "adapted"
    result = run_cli("retrain", pruned, "-o", adapted, "--train", "none", "--adapter", "masklora", "--rank", "2",
                     "--data", CORPUS, "--steps", "1", "--batch-size", "1", "--seqlen", "16", "-q")
    assert result.exit_code == 0, result.stderr
    return adapted


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


HUGE = st.sampled_from([0, 1, 7, 10**6, 2**31, 2**40, -1])
JUNK = st.one_of(st.none(), st.integers(-3, 2**64), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.floats(allow_nan=True))
SAFETENSORS = ["model.safetensors", "masks.safetensors", "adapters.safetensors"]
JSONS = ["perp.json", "config.json", "adapters.json"]


@st.composite
def damage(draw) -> list[tuple]:
    """A short list of damages, applied in order."""
    ops = st.one_of(
        st.tuples(st.just("shape"), st.sampled_from(SAFETENSORS), st.integers(0, 40), st.integers(0, 1), HUGE),
        st.tuples(st.just("offsets"), st.sampled_from(SAFETENSORS), st.integers(0, 40), HUGE),
        st.tuples(st.just("dtype"), st.sampled_from(SAFETENSORS), st.integers(0, 40), st.sampled_from(["F64", "U8", "XX", "BOOL"])),
        st.tuples(st.just("drop-tensor"), st.sampled_from(SAFETENSORS), st.integers(0, 40)),
        st.tuples(st.just("metadata"), st.sampled_from(["pattern", "format_version", "shapes"]), JUNK),
        st.tuples(st.just("json-field"), st.sampled_from(JSONS),
                  st.sampled_from(["history", "source_model", "format_version", "masks_sha256", "sparsity", "rank",
                                   "matrices", "vocab_size", "num_hidden_layers", "hidden_size", "type", "files",
                                   "weights_sha256", "adapters"]), JUNK),
        st.tuples(st.just("json-replace"), st.sampled_from(JSONS), st.sampled_from(["[]", "5", "null", "{", '{"a": 1}'])),
        st.tuples(st.just("truncate"), st.sampled_from(SAFETENSORS + JSONS), st.floats(0, 1)),
        st.tuples(st.just("remove"), st.sampled_from(SAFETENSORS + JSONS + ["tokenizer.json"])),
        st.tuples(st.just("symlink"), st.sampled_from(SAFETENSORS + JSONS), st.sampled_from(["loop", "dangling", "dir"])),
        st.tuples(st.just("rehash"),),
    )
    return draw(st.lists(ops, min_size=1, max_size=3))


def _apply(root: Path, ckpt: Path, op: tuple) -> None:
    kind = op[0]
    if kind in ("shape", "offsets", "dtype", "drop-tensor"):
        file = ckpt / op[1]
        if not file.is_file() or file.is_symlink():
            return
        header, data = _header(file)
        keys = sorted(k for k in header if k != "__metadata__")
        if not keys:
            return
        key = keys[op[2] % len(keys)]
        if kind == "shape":
            shape = header[key]["shape"]
            if shape:
                shape[op[3] % len(shape)] = op[4]
        elif kind == "offsets":
            header[key]["data_offsets"][1] = op[3]
        elif kind == "dtype":
            header[key]["dtype"] = op[3]
        else:
            del header[key]
        _write_header(file, header, data)
    elif kind == "metadata":
        file = ckpt / "masks.safetensors"
        if file.is_file() and not file.is_symlink():
            header, data = _header(file)
            header.setdefault("__metadata__", {})[op[1]] = op[2] if isinstance(op[2], str) else json.dumps(op[2])
            _write_header(file, header, data)
    elif kind == "json-field":
        file = ckpt / op[1]
        if file.is_file() and not file.is_symlink():
            try:
                value = json.loads(file.read_text())
            except ValueError:
                return
            if isinstance(value, dict):
                value[op[2]] = op[3]
                file.write_text(json.dumps(value))
    elif kind == "json-replace":
        if (ckpt / op[1]).is_file():
            (ckpt / op[1]).write_text(op[2])
    elif kind == "truncate":
        file = ckpt / op[1]
        if file.is_file() and not file.is_symlink():
            raw = file.read_bytes()
            file.write_bytes(raw[: int(len(raw) * op[2])])
    elif kind == "remove":
        (ckpt / op[1]).unlink(missing_ok=True)
    elif kind == "symlink":
        file = ckpt / op[1]
        file.unlink(missing_ok=True)
        if op[2] == "loop":
            file.symlink_to(file)
        elif op[2] == "dangling":
            file.symlink_to(root / "nowhere")
        else:
            file.symlink_to(root)
    elif kind == "rehash":  # damage that also updates the recorded hashes (a careful forger)
        manifest_file = ckpt / "perp.json"
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(manifest, dict) and (ckpt / "masks.safetensors").is_file():
            manifest["masks_sha256"] = sha256_file(ckpt / "masks.safetensors")
            manifest_file.write_text(json.dumps(manifest))



@settings(max_examples=int(os.environ.get("PERP_HOSTILE_EXAMPLES", "20")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=damage(), command=st.sampled_from(sorted(COMMANDS)))
def test_hostile_checkpoint_keeps_the_promises(pristine: Path, tmp_path_factory, ops, command) -> None:
    root = tmp_path_factory.mktemp("case")
    ckpt = root / "ckpt"
    shutil.copytree(pristine, ckpt)
    for op in ops:
        _apply(root, ckpt, op)
    before = tree_digest(ckpt)
    out = root / "out"
    result = run_cli(*COMMANDS[command](str(ckpt), str(out)))
    where = f"{command} after {ops}: exit {result.exit_code}\n{result.stderr}"
    assert result.exit_code in (0, 1, 2, 3), where
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, where
    if result.exit_code != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("perp: error:"), where
        assert not out.exists(), where
    assert not list(root.glob(".*perp-tmp-*")) and not list(root.glob(".*perp-old-*")), where
    assert tree_digest(ckpt) == before, where
