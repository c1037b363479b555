"""Data-parallel retraining over processes, through Hugging Face Accelerate.

`accelerate launch -m perp_cli retrain ...` and `torchrun --nproc-per-node N -m perp_cli
retrain ...` start N copies of perp. Each loads the same checkpoint and draws the same
training windows (same seed), then:

* the global batch is split, not multiplied: `--batch-size B` is the *global*
  micro-batch, and rank r computes the loss of its contiguous slice
  `[r*B/N, (r+1)*B/N)` of every global micro-batch. DistributedDataParallel averages the
  gradients, which is the gradient of the mean loss over all B windows: one process and
  N processes take the same optimizer steps (up to float rounding);
* only trainable tensors are synchronised: DDP all-reduces parameters with
  `requires_grad` (biases, norms, adapter factors), so PERP's small subsets cost little
  communication; frozen weights are never reduced;
* every rank applies the same AdamW step (and the same re-masking for `--train all`)
  to the same averaged gradients, so the replicas stay identical without broadcasts;
* only rank 0 draws progress, prints tables and writes the output (atomically, as in a
  single process); the other ranks wait for its verdict and exit with the same code.

Accelerate is the engine: `Accelerator` sets up the process group (NCCL on GPUs, gloo on
CPUs), picks each rank's device, and wraps the model in DDP. A run that is not launched
distributed (WORLD_SIZE unset or 1) never touches any of this: `setup` returns None and
training is bit-identical to a plain `perp retrain`.

Failure on one rank: torchrun (and `accelerate launch`, built on it) terminates the other
ranks, which unwind through perp's SIGTERM handler; no rank but 0 ever writes, and rank
0 writes through a temporary directory, so nothing partial is left. A NaN loss is
detected on the loss averaged over ranks, so every rank stops at the same step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from perp_cli.errors import PerpError, UsageError

T = TypeVar("T")

# Rank 0 may write a 70B checkpoint while the others wait in a collective: the default
# 30-minute timeout of the process group would kill them first.
TIMEOUT = timedelta(hours=3)


def launched() -> bool:
    """True when this process is one of several started by torchrun / accelerate launch."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class RankFailure(PerpError):
    """Rank 0 failed (e.g. while writing); the other ranks exit with its code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Trainee(nn.Module):
    """The model plus the trainable adapter factors, as one module for DDP.

    perp's adapters live beside the model (hooks on the owning layers), so DDP would not
    see their parameters; registering the *parameters* here (not the adapter modules,
    whose keep-masks are buffers DDP would broadcast at every forward) puts them under
    DDP's gradient averaging.
    """

    def __init__(self, model: nn.Module, extra: list[nn.Parameter]) -> None:
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList(extra)

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)


@dataclass
class Distributed:
    """One rank of a data-parallel run (see the module docstring)."""

    accelerator: Any

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def backend(self) -> str:
        return str(torch.distributed.get_backend())

    def describe(self, global_batch: int) -> dict[str, Any]:
        """What the manifest records about the launch."""
        return {"world_size": self.world_size, "backend": self.backend,
                "batch_per_process": global_batch // self.world_size}

    def local_slice(self, global_batch: int) -> slice:
        """This rank's contiguous share of a global micro-batch of `global_batch` rows."""
        if global_batch % self.world_size:
            raise UsageError(
                f"--batch-size {global_batch} is the global micro-batch and must be divisible by the "
                f"{self.world_size} processes (each takes an equal contiguous share)"
            )
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def wrap(self, model: nn.Module, extra: list[nn.Parameter]) -> nn.Module:
        """`model` (+ adapter parameters) in DDP; call after choosing what trains."""
        wrapped = self.accelerator.prepare_model(_Trainee(model, extra), device_placement=False)
        self.accelerator._models.clear()  # do not keep the replica alive after training
        return wrapped

    def no_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's all-reduce on accumulation micro-batches; reduce on the last one."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(wrapped)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks (each rank's loss is over an equal share)."""
        return self.accelerator.reduce(value.detach().float(), reduction="mean")

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; every rank returns after it, or raises if it failed.

        The others wait in a broadcast for rank 0's verdict (this is the barrier), so a
        failure while writing makes every rank exit with rank 0's exit code instead of
        0. An interrupt (Ctrl-C, SIGTERM) propagates at once: the launcher is stopping
        every rank anyway.
        """
        from accelerate.utils import broadcast_object_list

        result, verdict = None, [None]
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:
                verdict = [(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                            getattr(exc, "exit_code", 1))]
                broadcast_object_list(verdict, from_process=0)
                raise
        broadcast_object_list(verdict, from_process=0)
        if verdict[0] is not None:
            message, code = verdict[0]
            raise RankFailure(f"rank 0 failed: {message}", code)
        return result

    def close(self) -> None:
        """Leave the process group cleanly (no warning at exit)."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup(device: str = "auto") -> Distributed | None:
    """The data-parallel context when launched with several processes, else None.

    Each rank computes on its own device: `cuda:LOCAL_RANK` on GPUs (NCCL), the CPU
    otherwise or with `--device cpu` (gloo). An explicit single device (`cuda:1`) makes
    no sense for several processes and is refused.
    """
    if not launched():
        return None
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(
            f"--device {device}: in a distributed launch each process uses its own device; "
            "use --device auto (cuda:LOCAL_RANK, else cpu), cuda or cpu"
        )
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    except ImportError as exc:
        raise UsageError("data-parallel retraining needs Accelerate: pip install 'perp[dist]'") from exc
    accelerator = Accelerator(
        cpu=device == "cpu" or not torch.cuda.is_available(),
        # precision is perp's --dtype policy (float32 trainables, autocast over low-precision
        # frozen weights), and the model runs eagerly: `accelerate launch --mixed_precision`
        # or `--dynamo_backend` must not change what one process would compute
        mixed_precision="no",
        dynamo_backend="no",
        kwargs_handlers=[
            # Every trainable tensor gets a gradient at every step; telling DDP so
            # avoids a graph traversal per step and makes a stray unused one an error.
            DistributedDataParallelKwargs(find_unused_parameters=False),
            InitProcessGroupKwargs(timeout=TIMEOUT),
        ],
    )
    return Distributed(accelerator)
