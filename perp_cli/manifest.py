"""`perp.json`: what produced a checkpoint, step by step.

Each step copies the history it read and appends itself, so any directory tells its
whole lineage: arguments, seed, data and its hash, time, memory, library versions.
"""

from __future__ import annotations

import hashlib
import json
import re
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perp_cli import __version__

FORMAT_VERSION = 1
MANIFEST_NAME = "perp.json"
# the files of a checkpoint directory (docs/format.md); here, not in checkpoint.py, so that
# the tensor IO (shards.py) needs no import of the reader/writer built on top of it
MASKS_NAME = "masks.safetensors"
ADAPTERS_NAME = "adapters.safetensors"
ADAPTERS_CONFIG_NAME = "adapters.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
PICKLE_SHARD_NAME = re.compile(r"pytorch_model-\d{5}-of-\d{5}\.bin")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_files(directory: Path) -> list[Path]:
    """The files holding a checkpoint's weights, sorted: the single file or the shards
    (safetensors, else pickles)."""
    names = [p for p in directory.iterdir() if p.is_file() and (
        p.name == WEIGHTS_NAME or SHARD_NAME.fullmatch(p.name) or p.name == PICKLE_NAMES[0] or PICKLE_SHARD_NAME.fullmatch(p.name))]
    safetensors = [p for p in names if p.suffix == ".safetensors"]
    return sorted(safetensors or names)


def weights_sha256(directory: str | Path) -> str | None:
    """One hash over a checkpoint's weight files (each file's name and sha256, in name
    order), or None when it has none. perp.json records it for the weights a step wrote
    (`weights_sha256`) and for the dense model a history started from
    (`source_weights_sha256`); every read checks it (docs/format.md)."""
    files = weight_files(Path(directory))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    """Hash of a tensor's bytes (used for the token ids a step consumed)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "perp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def peak_memory() -> dict[str, float]:
    """Peak host RSS of this process and peak CUDA allocation, in MiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # macOS reports bytes
        rss_kib //= 1024
    out = {"host_rss_mib": round(rss_kib / 1024, 1)}
    if torch.cuda.is_available():
        out["cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


@dataclass
class StepRecord:
    """One step being run; `finish()` turns it into the history entry."""

    command: str
    args: dict[str, Any]
    input: str | None
    seed: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def finish(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "args": _jsonable(self.args),
            "input": self.input,
            "seed": self.seed,
            "data": _jsonable(self.data),
            "results": _jsonable(self.results),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "wall_time_s": round(time.time() - self.started, 3),
            "peak_memory": peak_memory(),
            "versions": library_versions(),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def empty_manifest(source: str | None) -> dict[str, Any]:
    """The manifest of a checkpoint perp did not write (a plain HF directory or hub id)."""
    return {"format_version": FORMAT_VERSION, "perp_version": __version__, "source_model": source, "history": []}


class ManifestError(ValueError):
    """`perp.json` does not have the documented shape (raised by `validate`)."""


_SHA = re.compile(r"[0-9a-f]{64}")
# field -> (accepted types, what to say); every other field is free-form
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "perp_version": ((str,), "a string"),
    "source_model": ((str, type(None)), "a path or hub id (string) or null"),
    "history": ((list,), "a list of steps"),
    "evaluations": ((list,), "a list"),
    "pattern": ((str,), "a string such as unstructured or 2:4"),
    "sparsity": ((dict,), "an object"),
    "adapters": ((dict,), "an object"),
    "files": ((list,), "a list of file names"),
}


def validate(manifest: Any) -> dict[str, Any]:
    """`manifest` if it has the documented shape, else `ManifestError` naming the first
    field that does not (read-time validation: a malformed manifest fails when it is
    read, not after a whole run)."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"is a JSON {type(manifest).__name__}, not an object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"'format_version' must be a positive integer, got {json.dumps(version)}")
    for key, (types, what) in _FIELDS.items():
        if key in manifest and (not isinstance(manifest[key], types) or isinstance(manifest[key], bool)):
            raise ManifestError(f"'{key}' must be {what}, got {json.dumps(manifest[key], default=str)[:60]}")
    for key in ("masks_sha256", "weights_sha256", "source_weights_sha256"):
        if key in manifest and manifest[key] is not None and not (isinstance(manifest[key], str) and _SHA.fullmatch(manifest[key])):
            raise ManifestError(f"'{key}' must be a sha256 (64 hex digits), got {json.dumps(manifest[key], default=str)[:60]}")
    if any(not isinstance(h, dict) for h in manifest.get("history", [])):
        raise ManifestError("'history' must be a list of steps (objects)")
    if any(not isinstance(f, str) for f in manifest.get("files", [])):
        raise ManifestError("'files' must be a list of file names")
    total = manifest.get("sparsity", {}).get("total", 0.0)
    if isinstance(total, bool) or not isinstance(total, (int, float)) or not 0.0 <= total <= 1.0:
        raise ManifestError(f"'sparsity.total' must be a number in [0, 1], got {json.dumps(total, default=str)[:60]}")
    sha = manifest.get("adapters", {}).get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA.fullmatch(sha)):
        raise ManifestError("'adapters.sha256' must be a sha256 (64 hex digits)")
    return manifest
