"""The retraining loop: AdamW over the trainable parameters only (`fit`), and next-token
training of a model with it (`train_lm`); `perp_cli.recipes.retrain` drives them.

PERP's point is cost: if only biases and norms (or low-rank adapters) are trainable,
only they get gradients and AdamW state, so retraining needs little more memory than
inference. The loop makes that true by freezing everything else before it builds the
optimizer, and by never touching a frozen parameter.

Invariants the loop keeps:

* sparsity: a trainable tensor that has a mask (full retraining, `--train all`) gets
  its gradient masked before the step and is re-masked after it, so every pruned weight
  is exactly zero after every step, weight decay and AdamW's momentum included;
* mixed precision: frozen weights may stay bf16/fp16 while trainable parameters (and
  therefore their gradients and optimizer state) are float32; the forward runs under
  autocast in the low precision; trained tensors are cast back when training ends;
* a NaN or inf loss stops training with `NumericalError` (the caller writes nothing);
* data parallelism (`dist`, see `distributed.py`): each rank computes its contiguous
  share of every global micro-batch and DDP averages the gradients, so N processes take
  the same steps as one; without `dist` nothing of this runs.

`fit` is the loop itself, independent of what the loss is, so layer-wise reconstruction
can reuse it with a block-output MSE.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perp_cli import adapters as adapters_mod
from perp_cli import trainable as trainable_mod
from perp_cli.data import PAD
from perp_cli.distributed import Distributed
from perp_cli.errors import NumericalError, UsageError
from perp_cli.manifest import peak_memory
from perp_cli.mask import MaskSet
from perp_cli.progress import SILENT, Reporter, make_progress

SCHEDULES = ("linear", "cosine", "constant")
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class TrainConfig:
    """Optimisation settings (defaults follow PERP: AdamW, lr 5e-4, 10% warmup, linear decay)."""

    steps: int
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-4
    warmup: float = 0.1
    schedule: str = "linear"
    weight_decay: float = 0.0
    grad_checkpointing: bool = False
    eval_every: int = 0
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.grad_accum < 1:
            raise UsageError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.eval_every < 0:
            raise UsageError(f"--eval-every must be >= 0, got {self.eval_every}")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps)


def lr_at(step: int, total: int, base_lr: float, warmup_steps: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup ramps linearly to `base_lr`, reaching it at step `warmup_steps - 1` (so no
    step is wasted at lr 0); then `linear` and `cosine` decay towards 0 at step `total`,
    `constant` stays.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UsageError(f"unknown schedule {schedule!r}")


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    initial_loss: float
    final_loss: float
    losses: list[float]
    wall_time_s: float
    tokens_per_s: float
    peak_memory: dict[str, float]
    evals: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens_seen": self.tokens_seen,
            "initial_loss": round(self.initial_loss, 6),
            "final_loss": round(self.final_loss, 6),
            "train_wall_time_s": round(self.wall_time_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "peak_memory": self.peak_memory,
            "evals": self.evals,
        }


def _status(loss: float, lr: float, tokens_per_s: float) -> str:
    text = f"loss {loss:.4f} · lr {lr:.2e} · {tokens_per_s:,.0f} tok/s"
    if torch.cuda.is_available():
        text += f" · {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return text


def fit(
    params: list[nn.Parameter],
    loss_fn: Callable[[int, int], torch.Tensor],
    cfg: TrainConfig,
    keep_masks: list[tuple[nn.Parameter, torch.Tensor]] = (),
    tokens_per_micro: int = 0,
    on_eval: Callable[[int], dict[str, float]] | None = None,
    quiet: bool = False,
    description: str = "retrain",
    dist: Distributed | None = None,
    replica: nn.Module | None = None,
    report: Reporter = SILENT,
) -> TrainResult:
    """Run `cfg.steps` AdamW steps on `params`, each accumulating `cfg.grad_accum` losses.

    `loss_fn(step, micro)` returns the scalar loss of one micro-batch. `keep_masks`
    pairs a parameter with its keep-mask (same layout): its gradient is zeroed outside
    the mask before each step and its pruned entries are reset to exactly 0 after it.
    `on_eval(step)` runs after every `cfg.eval_every` steps and returns numbers to log
    (shown through `report`).

    With `dist`, `loss_fn` is this rank's share and `replica` the DDP module computing
    it: gradients are all-reduced on the last micro-batch of each step only, the logged
    loss (and the NaN check, so every rank stops together) is the mean over ranks, and
    only rank 0 draws progress. `tokens_per_micro` counts the global micro-batch.
    """
    cfg.validate()
    quiet = quiet or (dist is not None and not dist.is_main)
    if not params:
        raise UsageError("nothing to train: choose --train subsets and/or an --adapter")
    for p in params:
        if p.dtype != torch.float32:
            raise UsageError(f"trainable parameters must be float32 (mixed precision keeps them so), got {p.dtype}")
    pruned = [(p, ~keep.to(device=p.device, dtype=torch.bool)) for p, keep in keep_masks]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    evals: list[dict[str, float]] = []
    tokens = 0
    eval_time = 0.0
    start = time.perf_counter()
    with make_progress(quiet) as progress:
        task = progress.add_task(description, total=cfg.steps, status="")
        for step in range(cfg.steps):
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                sync = dist.no_sync(replica, micro + 1 == cfg.grad_accum) if dist else contextlib.nullcontext()
                with sync:
                    loss = loss_fn(step, micro)
                    value = dist.mean(loss) if dist else loss.detach()
                    if not torch.isfinite(value):
                        raise NumericalError(
                            f"the training loss became {value.item()} at step {step + 1}; nothing was written "
                            f"(lower --lr, now {cfg.lr:g}, or check the input checkpoint)"
                        )
                    (loss / cfg.grad_accum).backward()
                step_loss += value.item() / cfg.grad_accum
                tokens += tokens_per_micro
            with torch.no_grad():
                for p, prune in pruned:
                    if p.grad is not None:
                        p.grad.masked_fill_(prune, 0)
            optimizer.step()
            with torch.no_grad():
                for p, prune in pruned:
                    p.masked_fill_(prune, 0)
            losses.append(step_loss)
            elapsed = time.perf_counter() - start - eval_time
            progress.update(task, advance=1, status=_status(step_loss, lr, tokens / max(elapsed, 1e-9)))
            if on_eval is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                eval_start = time.perf_counter()
                record = {"step": step + 1, **on_eval(step + 1)}
                eval_time += time.perf_counter() - eval_start
                evals.append(record)
                if not quiet:
                    shown = " · ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
                    report.note(f"step {step + 1}: {shown}", soft_wrap=False)
    wall = time.perf_counter() - start - eval_time  # training only: evaluation is not training cost
    return TrainResult(
        steps=cfg.steps,
        tokens_seen=tokens,
        initial_loss=losses[0],
        final_loss=losses[-1],
        losses=losses,
        wall_time_s=wall,
        tokens_per_s=tokens / max(wall, 1e-9),
        peak_memory=peak_memory(),
        evals=evals,
    )


# ----------------------------------------------------------------------------- language modelling


@contextlib.contextmanager
def mixed_precision(
    model: nn.Module, params: list[nn.Parameter]
) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Trainable parameters in float32 for the duration; yields a factory of the autocast
    context to run forward passes under (a no-op context when every weight is float32).

    On exit the trained tensors are cast back to their stored dtype, so the checkpoint
    keeps the dtype it was loaded with.
    """
    original = {id(p): (p, p.dtype) for p in params if p.dtype != torch.float32}
    for p, _ in original.values():
        p.data = p.data.float()
    low = next((p.dtype for p in model.parameters() if p.dtype in LOW_PRECISION), None)  # bf16/fp16 weights
    device_type = next(model.parameters()).device.type
    try:
        yield (lambda: torch.autocast(device_type, dtype=low)) if low else contextlib.nullcontext
    finally:
        for p, dtype in original.values():
            p.data = p.data.to(dtype)


def train_lm(
    model: nn.Module,
    windows: torch.Tensor,
    cfg: TrainConfig,
    params: dict[str, nn.Parameter],
    adapters: dict[str, adapters_mod.Adapter] | None = None,
    masks: MaskSet | None = None,
    eval_fn: Callable[[], float] | None = None,
    quiet: bool = False,
    dist: Distributed | None = None,
    report: Reporter = SILENT,
) -> TrainResult:
    """Next-token training of `params` (and adapters) on `windows` `[n, seqlen]`.

    Micro-batch k of the run is `windows[k*bs:(k+1)*bs]`, in order, so the same windows
    and seed give the same run. `masks` keeps any trainable masked tensor sparse.
    `eval_fn` (held-out perplexity) runs in eval mode every `cfg.eval_every` steps.

    With `dist` (a data-parallel launch), `cfg.batch_size` is the global micro-batch and
    this rank trains on its slice `dist.local_slice(bs)` of each one; every rank holds
    the same `windows` and runs `eval_fn` (same numbers; only rank 0 prints them).
    """
    needed = cfg.steps * cfg.grad_accum * cfg.batch_size
    if windows.shape[0] < needed:
        raise UsageError(f"{needed} training windows are needed, {windows.shape[0]} were given")
    adapters = adapters or {}
    trainable_mod.set_trainable(model, params)
    adapter_params = [p for a in adapters.values() for p in a.parameters()]
    for p in adapter_params:
        p.requires_grad_(True)
    keep = [(p, masks[name]) for name, p in params.items() if masks is not None and name in masks]
    device = next(model.parameters()).device
    seqlen = windows.shape[1]
    padded = bool((windows == PAD).any())
    use_cache = getattr(model.config, "use_cache", None)
    share = dist.local_slice(cfg.batch_size) if dist else slice(None)
    # dropout draws differ per rank (as they do per window in one process); rank 0 = seed
    torch.manual_seed(cfg.seed + (dist.rank if dist else 0))
    with mixed_precision(model, list(params.values())) as amp:
        # DDP records the trainable parameters (requires_grad, float32) when it wraps
        replica = dist.wrap(model, adapter_params) if dist else model

        def loss_fn(step: int, micro: int) -> torch.Tensor:
            k = step * cfg.grad_accum + micro
            ids = windows[k * cfg.batch_size : (k + 1) * cfg.batch_size][share].to(device)
            with amp():
                if padded:  # document windows: no attention to and no loss on data.PAD
                    real = ids != PAD
                    return replica(input_ids=ids.clamp(min=0), attention_mask=real.long(),
                                   labels=ids.masked_fill(~real, -100), use_cache=False).loss.float()
                return replica(input_ids=ids, labels=ids, use_cache=False).loss.float()

        def on_eval(step: int) -> dict[str, float]:
            model.eval()
            try:
                with torch.no_grad(), amp():
                    return {"perplexity": float(eval_fn())}
            finally:
                model.train()

        if cfg.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        try:
            return fit(
                list(params.values()) + adapter_params,
                loss_fn,
                cfg,
                keep_masks=keep,
                tokens_per_micro=cfg.batch_size * seqlen,
                on_eval=on_eval if eval_fn is not None else None,
                quiet=quiet,
                dist=dist,
                replica=replica if dist else None,
                report=report,
            )
        finally:
            model.eval()
            model.requires_grad_(False)
            for p in adapter_params:
                p.requires_grad_(False)
            if cfg.grad_checkpointing:
                model.gradient_checkpointing_disable()
            if use_cache is not None:
                model.config.use_cache = use_cache
