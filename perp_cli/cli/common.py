"""Options shared by every subcommand, defined once with their help text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from perp_cli.errors import UsageError

ModelArg = Annotated[
    str,
    typer.Argument(help="Input checkpoint: a perp or Hugging Face model directory, or a hub id (needs network).", show_default=False, metavar="MODEL"),
]
OutputOpt = Annotated[
    Path,
    typer.Option("--output", "-o", help="Output checkpoint directory (written atomically; must not exist unless --overwrite).", show_default=False),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory (only after the new one is complete).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weight dtype: auto (the checkpoint's), float32, bfloat16, float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; the same seed and inputs give bit-identical outputs on CPU.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout (human output stays on stderr).")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickled pytorch_model.bin weights (they can run arbitrary code).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code shipped inside the checkpoint to run.")]
MaxShardSizeOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest output weight file (5GB = 5*10^9 bytes, 2GiB = 2*2^30); bigger models are written as model-0000i-of-0000n.safetensors + model.safetensors.index.json.")]

# where the calibration activations of the block-by-block engine live (perp_cli.activations)
OffloadActivationsOpt = Annotated[bool, typer.Option("--offload-activations", help="Keep the calibration activations (and reconstruction's targets) on the host, one micro-batch at a time on the device (same as --max-memory 0).")]
MaxMemoryOpt = Annotated[str | None, typer.Option("--max-memory", help="Most device memory the calibration activations may take, every copy together (reconstruction also keeps dense targets and block outputs), e.g. 8GiB; the rest wait on the host, or on disk with --offload-dir. Same result, bit for bit. Default: no limit. On a CPU the host is the device: use --offload-dir.", show_default=False)]
ActivationDirOpt = Annotated[Path | None, typer.Option("--offload-dir", help="Keep the calibration activations beyond --max-memory (all of them without it) in files in this directory, read back one micro-batch at a time: host memory then holds one block and one micro-batch. Files are removed when done.", show_default=False)]


def emit_json(summary: dict[str, Any]) -> None:
    """The --json summary: one JSON document on stdout."""
    sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    sys.stdout.flush()


def require_range(name: str, value: float, low: float, high: float, high_inclusive: bool = False) -> None:
    """A usage error unless low <= value < high (or <= high)."""
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise UsageError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
