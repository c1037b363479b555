"""`perp.json`: what produced a checkpoint, step by step.

Each step copies the history it read and appends itself, so any directory tells its
whole lineage: arguments, seed, data and its hash, time, memory, library versions.
"""

from __future__ import annotations

import hashlib
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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
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
