"""One recipe per command (torchtune style): `run(config) -> Outcome` opens the input
checkpoint(s), samples the data, runs the library step and writes the output.

The layers: `cli` parses options, builds a recipe's config, calls `run` and renders the
outcome; a recipe wires the components below it (checkpoint, data, engine, pruner,
reconstruction, merging, ...) and never prints (its notes go to the `Reporter` it is
given). This module holds what every writing recipe shares: the input/output part of
its config, the outcome it returns, and the checks that come before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perp_cli import checkpoint
from perp_cli.errors import UsageError
from perp_cli.manifest import StepRecord
from perp_cli.shards import parse_size


@dataclass(kw_only=True)
class Step:
    """The input checkpoint and output directory of a step, and how each is treated."""

    model: str
    output: Path
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    seed: int = 0
    overwrite: bool = False
    overwrite_foreign: bool = False  # implies overwrite
    trust_inputs: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def replace(self) -> bool:
        """Whether an existing output may be replaced."""
        return self.overwrite or self.overwrite_foreign

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    def check_output(self, *inputs: Any, output: Path | None = None) -> None:
        """Usage errors for an output (default: the step's) that exists or holds an input."""
        checkpoint.check_output(self.output if output is None else output, inputs=[self.model, *inputs],
                                overwrite=self.replace, overwrite_foreign=self.overwrite_foreign)

    def record(self, command: str, args: dict[str, Any]) -> StepRecord:
        """The step's perp.json record, its results filled in by the recipe."""
        return StepRecord(command, args=args, input=self.model, seed=self.seed)


@dataclass(kw_only=True)
class Outcome:
    """What a writing recipe hands back for its command to show."""

    results: dict[str, Any]  # the step's perp.json results
    data: dict[str, Any] = field(default_factory=dict)  # the calibration record ({} without calibration)
    streaming: bool = False  # whether the weights were read and written one block at a time


def check_rank(model: Any, rank: int, targets: str | None) -> None:
    """An adapter rank above min(out, in) of a matrix it adapts is no low-rank update
    (and would allocate factors larger than the matrix): a usage error."""
    from perp_cli import arch

    smallest = min((min(m.shape) for m in arch.matrices(model, targets)), default=None)
    if smallest is not None and rank > smallest:
        raise UsageError(f"--rank {rank} exceeds min(out, in) = {smallest} of the adapted matrices; choose at most {smallest}")


def check_activation_memory(model: Any, nsamples: int, seqlen: int | None, copies: int, offload_dir: Any, what: str) -> None:
    """The calibration activations of the block-by-block engine (`copies` tensors of
    nsamples x seqlen x hidden) must fit in what the process may use, unless they go to
    disk (--offload-dir): checked before any data is read."""
    import torch

    from perp_cli import data, memory

    hidden = getattr(model.config, "hidden_size", None)
    if offload_dir is not None or not isinstance(hidden, int):
        return
    length = data.default_seqlen(model, seqlen)
    element = torch.empty((), dtype=model.dtype).element_size()
    memory.require(copies * nsamples * length * hidden * element,
                   f"{what}: {copies} x {nsamples} windows x {length} tokens x {hidden} activations",
                   "lower --nsamples or --seqlen, or pass --offload-dir")
