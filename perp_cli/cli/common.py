"""Options shared by every subcommand, defined once with their help text."""

from __future__ import annotations

import functools
import inspect
import json
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

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
OverwriteForeignOpt = Annotated[bool, typer.Option("--overwrite-foreign", help="Replace an existing output directory even if perp did not write it (no perp.json, or files perp does not write): everything in it is deleted once the new output is complete. Implies --overwrite. Never replaces a directory that holds an input of the step.")]
TrustInputsOpt = Annotated[bool, typer.Option("--trust-inputs", help="Skip the integrity checks of what perp.json records (sha256 of the weights, masks and adapters, the recorded sparsity, the source model's weights), for inputs you changed on purpose. Shapes and consistency are still checked.")]
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

@dataclass(frozen=True)
class Writing:
    """The options every command that writes a checkpoint ends with (see `writes_checkpoint`)."""

    overwrite: bool
    overwrite_foreign: bool
    trust_inputs: bool
    json: bool
    quiet: bool
    allow_pickle: bool
    trust_remote_code: bool

    def step(self) -> dict[str, bool]:
        """The fields of a recipe's `Step` these options set."""
        return {"overwrite": self.overwrite, "overwrite_foreign": self.overwrite_foreign, "trust_inputs": self.trust_inputs,
                "allow_pickle": self.allow_pickle, "trust_remote_code": self.trust_remote_code}


def _writing_options(
    overwrite: OverwriteOpt = False,
    overwrite_foreign: OverwriteForeignOpt = False,
    trust_inputs: TrustInputsOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> Writing:
    return Writing(overwrite, overwrite_foreign, trust_inputs, json_out, quiet, allow_pickle, trust_remote_code)


def writes_checkpoint(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command(..., *, writing: Writing)` as typer sees it: its own options, then those of
    `_writing_options` (last in --help), which it receives as one `Writing`."""
    hints = typing.get_type_hints(command, include_extras=True) | typing.get_type_hints(_writing_options, include_extras=True)
    tail = list(inspect.signature(_writing_options).parameters.values())
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "writing"]
    params = [p.replace(annotation=hints[p.name]) for p in own + tail]

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        writing = _writing_options(**{p.name: kwargs.pop(p.name) for p in tail})
        return command(**kwargs, writing=writing)

    run.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


# the calibration windows of a step (perp_cli.data.CalibrationConfig)
CalibOpt = Annotated[str, typer.Option("--calib", help="Calibration text: c4 or wikitext2 (hub, needs network), or a local .txt/.raw/.jsonl/.parquet file or datasets directory.")]
CalibTextFieldOpt = Annotated[str, typer.Option("--text-field", help="Text field of .jsonl/.parquet/datasets calibration data.")]
NsamplesOpt = Annotated[int, typer.Option("--nsamples", help="Number of calibration windows.")]
CalibSeqlenOpt = Annotated[int | None, typer.Option("--seqlen", help="Tokens per calibration window. Default: min(2048, the model's max positions).", show_default=False)]
CalibConcatOpt = Annotated[bool, typer.Option("--calib-concat", help="Draw windows from all documents joined together (when too few documents are longer than --seqlen).")]


def emit_json(summary: dict[str, Any]) -> None:
    """The --json summary: one JSON document on stdout."""
    sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    sys.stdout.flush()


# --- the one place where option values are validated, whatever the command ------------

SEED_LIMIT = 2**32  # torch, Python and every derived per-block seed accept it
POSITIVE_COUNTS = {"nsamples", "steps", "tokens", "batch_size", "grad_accum", "rank", "blocksize", "seqlen",
                   "eval_windows", "steps_per_block", "max_windows"}
NON_NEGATIVE_COUNTS = {"eval_every", "num_fewshot"}
FLAG_NAMES = {"json_out": "--json", "data_source": "--data", "streaming_mode": "--streaming"}


def flag(name: str) -> str:
    """The command-line spelling of parameter `name`."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def check_values(values: dict[str, Any]) -> None:
    """Usage errors for option values no command can use: a count of zero or less (never
    read as "default"), a seed outside [0, 2^32), a NaN or infinite number."""
    for name, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag(name)} must be a finite number, got {value}")
        if not isinstance(value, int):
            continue
        if name == "seed" and not 0 <= value < SEED_LIMIT:
            raise UsageError(f"--seed must be in [0, 2^32), got {value}")
        if name in POSITIVE_COUNTS and value < 1:
            raise UsageError(f"{flag(name)} must be at least 1, got {value}")
        if name in NON_NEGATIVE_COUNTS and value < 0:
            raise UsageError(f"{flag(name)} must be 0 or more, got {value}")


def validated(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with its option values checked (`check_values`) before it runs; the app
    registers every subcommand through it."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        check_values(kwargs)
        return command(*args, **kwargs)

    return run
