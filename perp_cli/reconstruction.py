"""Layer-wise reconstruction: train each pruned block to reproduce the dense block's output.

PERP (Zimmer et al., 2023, arXiv 2312.15230) shows that the small parameter subsets that
recover a pruned model in full retraining (biases, norms, MaskLoRA) also recover it
block by block: retraining-free pruning (Wanda, SparseGPT) followed by a short
reconstruction of each block against the dense model's block output is much better,
with the memory of one block at a time.

For block i, with the calibration windows flowing through the block-sequential engine
(`engine.calibrate`, the same loop pruning uses):

* X_i, the inputs: the calibration activations after the already reconstructed blocks
  0..i-1 (the engine's stream);
* T_i, the target: the dense block i applied to X_i (`target="dense"`, PERP's choice),
  or the dense model's own block output on its own activation stream
  (`target="dense-stream"`: the dense model runs block by block in lockstep, so later
  blocks also learn to undo the drift of earlier ones);
* the loss: mean squared error between the pruned block's output on X_i and T_i;
* what trains: `--train` subsets restricted to block i (`trainable.select_trainable`)
  and adapters on block i's matrices, AdamW with 10% warmup and linear decay
  (`training.fit`, whose masked gradients and re-masking keep `--train all` sparse);
* afterwards the adapters are merged into block i under its mask and detached; if the
  block's error on the calibration inputs got worse, its pre-training state is put back;
* X_{i+1} = reconstructed block i applied to X_i.

`granularity="sublayer"` (Wagner, Roux, Zimmer, Pokutta 2025, "A Free Lunch in LLM
Compression", reference `block_size=-1`) fits the attention half of block i first and
then its MLP half, each exactly as above with the half in place of the block
(`perp_cli.sublayers` finds and checks the halves): the attention half's inputs are X_i,
its target the dense attention half on X_i; the MLP half's inputs H_i are the
reconstructed attention half's outputs, its target the dense MLP half on H_i (with
`dense-stream`: the dense stream's own half outputs). Each half trains the `--train`
parameters and adapters it owns, for `steps_per_block` steps, and is put back on its own
if training made it worse. This is the reference's `propagate_sparse_activations_
reconstruct=True` with dense targets (PERP's choice, and perp's `dense`); the reference's
default feeds each half the dense model's activations instead, which perp does not offer.

Only block i of the pruned model and block i of the dense model are on the device at a
time; both models otherwise stay on the host (activations too with `offload`). Masks
never change: every masked weight stays exactly 0 (checked after every block). Streamed
(`checkpoint.open(..., streamed=True)` for both models), both are meta-device skeletons
whose blocks come and go through their `streaming.StreamedBlocks` (the pruned one writes
each reconstructed block to the output); only those two blocks are in host memory at
all, and the numbers are the same.

The block runs in eval mode (no dropout: reconstruction is a regression onto fixed
targets); only the modules carrying adapters see training mode, so `lora-prune` trains
its dense update and is masked when merged, as in `retrain`.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perp_cli import adapters as adapters_mod
from perp_cli import arch, checkpoint, data, engine, streaming, sublayers
from perp_cli import trainable as trainable_mod
from perp_cli.activations import ActivationStore, Placement, placement_for
from perp_cli.errors import NumericalError, UsageError
from perp_cli.manifest import peak_memory
from perp_cli.mask import MaskSet, Pattern, nonzeros_outside
from perp_cli.progress import make_progress
from perp_cli.pruner import BlockPruner, PruneConfig
from perp_cli.training import TrainConfig, fit, mixed_precision

TARGETS = ("dense", "dense-stream")
ORDERS = ("shuffle", "fixed")
MODES = ("eval", "train")
# `--recipe`: perp's defaults, or the settings of PERP's reference code (ZIB-IOL/PERP
# `reconstruct_weights`: 20 iterations of one window, lr 5e-4, the windows in their
# order, the block in train mode, nothing restored). docs/fidelity.md has the numbers.
RECIPES: dict[str, dict[str, Any]] = {
    "perp": {"steps_per_block": 100, "batch_size": 8, "lr": 1e-3, "order": "shuffle", "mode": "eval", "restore": True},
    "paper": {"steps_per_block": 20, "batch_size": 1, "lr": 5e-4, "order": "fixed", "mode": "train", "restore": False},
}


@dataclass
class ReconstructConfig(data.CalibrationConfig):
    """What `perp reconstruct` trains and how (defaults: PERP's biases+norms+MaskLoRA)."""

    train: str = "biases,norms"
    adapter: str = "masklora"  # "none" or an adapters.KINDS entry (plain lora is refused)
    adapter_targets: str | None = None
    rank: int = 16
    alpha: float = 32.0
    add_biases: bool = False
    target: str = "dense"
    steps_per_block: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    order: str = "shuffle"  # which micro-batch each step takes: reshuffled every epoch, or in order
    mode: str = "eval"  # the block while training: eval (no dropout; adapter owners train) or train
    restore: bool = True  # put a block back when training made its error worse
    warmup: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    offload: bool = False
    max_memory: str | None = None  # activations and targets on the device (perp_cli.activations)
    offload_dir: str | None = None  # the rest of them in files here
    quiet: bool = True
    granularity: str = "block"  # "block", or "sublayer": the attention and MLP halves fitted one after the other
    # a `perp shrink` output (a smaller dense model, no masks): plain LoRA merges freely, and
    # block i's target is the dense blocks it stands for (`shrinking.source_blocks`; None: block i)
    maskless: bool = False
    teacher_blocks: list[list[int]] | None = None

    @property
    def adapter_kind(self) -> str | None:
        """The canonical adapter type, or None for `none`."""
        name = (self.adapter or "none").strip().lower()
        return None if name == "none" else adapters_mod.canonical_kind(name)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps_per_block, batch_size=self.batch_size, lr=self.lr, warmup=self.warmup,
            schedule="linear", weight_decay=self.weight_decay, seed=self.seed,
        )

    def validate(self) -> None:
        """Usage errors before anything is loaded."""
        parts = trainable_mod.parse_spec(self.train)
        outside = [p for p in parts if p in trainable_mod.OUTSIDE_BLOCKS]
        if outside:
            raise UsageError(f"--train {outside[0]} lives outside the decoder blocks; reconstruction trains biases, norms, all or none")
        kind = self.adapter_kind
        if kind is not None and adapters_mod.VARIANTS[kind].densifies and not self.maskless:
            raise UsageError(
                "--adapter lora would fill the pruned weights when merged into the block; "
                "use masklora, scalelora or lora-prune (they keep the mask), or none"
            )
        if parts == ["none"] and kind is None:
            raise UsageError("--train none with --adapter none trains nothing; choose a subset or an adapter")
        if self.target not in TARGETS:
            raise UsageError(f"--target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.granularity not in sublayers.GRANULARITIES:
            raise UsageError(f"--granularity {self.granularity!r} is not one of {', '.join(sublayers.GRANULARITIES)}")
        if self.adapter_targets:
            try:
                re.compile(self.adapter_targets)
            except re.error as exc:
                raise UsageError(f"--adapter-targets {self.adapter_targets!r} is not a valid regular expression: {exc}") from exc
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.steps_per_block < 1:
            raise UsageError(f"--steps-per-block must be at least 1, got {self.steps_per_block}")
        if self.order not in ORDERS:
            raise UsageError(f"--order {self.order!r} is not one of {', '.join(ORDERS)}")
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        self.train_config().validate()
        self.placement(torch.device("cpu"))

    def placement(self, device: torch.device) -> Placement:
        """Where the activations, targets and outputs of the run live."""
        return placement_for(device, self.offload, self.max_memory, self.offload_dir)


@dataclass
class BlockReport:
    """One block's reconstruction: errors on the calibration inputs, before and after.

    `mse_trained` is the error right after training (adapters merged); `mse_after` the
    error of what is kept: the same, unless training made the block worse and its
    pre-training state was restored (`restored`, then `mse_after == mse_before`).
    """

    block: int
    mse_before: float
    mse_trained: float
    mse_after: float
    restored: bool
    trainable_parameters: int
    tokens: int
    loss_first: float | None
    loss_last: float | None
    time_s: float
    part: str = "block"  # what was fitted: the whole block, or its "attention" or "mlp" half (--granularity sublayer)

    @property
    def reduction(self) -> float:
        """Fraction of the block's error removed (0 when restored or already exact)."""
        return 1.0 - self.mse_after / self.mse_before if self.mse_before > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["reduction"] = round(self.reduction, 6)
        out["time_s"] = round(self.time_s, 3)
        return out


@dataclass
class ReconstructOutcome:
    """What `reconstruct` did, for the manifest, the table and `--json`."""

    config: ReconstructConfig
    blocks: list[BlockReport]
    trained: list[str]
    adapter: str
    added_biases: list[str]
    total_parameters: int
    wall_time_s: float
    device: str
    peak_memory: dict[str, float] = field(default_factory=dict)
    activations: dict[str, Any] = field(default_factory=dict)
    masks: MaskSet | None = None  # the masks the run ended with (new ones when it pruned)
    pruning: dict[str, Any] | None = None  # the prune record of an interleaved run

    @property
    def restored(self) -> list[int]:
        return [b.block for b in self.blocks if b.restored]

    def results(self) -> dict[str, Any]:
        largest = max((b.trainable_parameters for b in self.blocks), default=0)
        return {
            "target": self.config.target,
            "granularity": self.config.granularity,
            "trained": self.trained,
            "adapter": self.adapter,
            "rank": self.config.rank if self.adapter != "none" else None,
            "alpha": self.config.alpha if self.adapter != "none" and adapters_mod.VARIANTS[self.adapter].scaled else None,
            "adapter_targets": self.config.adapter_targets,
            "added_biases": len(self.added_biases),
            "steps_per_block": self.config.steps_per_block,
            "batch_size": self.config.batch_size,
            "lr": self.config.lr,
            "order": self.config.order,
            "mode": self.config.mode,
            "restore": self.config.restore,
            "interleaved_pruning": self.pruning,
            "warmup": self.config.warmup,
            "weight_decay": self.config.weight_decay,
            "tokens_per_block": max((b.tokens for b in self.blocks), default=0),
            "trainable_parameters": sum(b.trainable_parameters for b in self.blocks),
            "trainable_parameters_largest_block": largest,
            "total_parameters": self.total_parameters,
            "blocks": [b.to_json() for b in self.blocks],
            "restored_blocks": self.restored,
            "reconstruction_time_s": round(self.wall_time_s, 3),
            "device": self.device,
            "peak_memory": self.peak_memory,
            "activations": self.activations,
        }


# ----------------------------------------------------------------------------- the dense reference


def dense_source(ckpt: checkpoint.Checkpoint, dense: str | Path | None) -> str:
    """The dense reference: `dense` if given, else the manifest's `source_model`.

    A checkpoint with no recorded source (or whose recorded source is itself, as for a
    plain Hugging Face directory) cannot default: the user must say `--dense`.
    """
    if dense is not None:
        return str(dense)
    source = ckpt.manifest.get("source_model")
    if not source:
        raise UsageError(f"{ckpt.source} records no source model in its perp.json; pass --dense DIR (the dense model it was pruned from)")
    path = Path(source).expanduser()
    if ckpt.local_dir is not None and path.exists() and path.resolve() == ckpt.local_dir:
        raise UsageError(f"{ckpt.source} is its own recorded source model; pass --dense DIR (the dense model it was pruned from)")
    if (source.startswith((".", "/", "~")) or source.count("/") > 1) and not path.exists():
        raise UsageError(f"the recorded source model {source} of {ckpt.source} no longer exists; pass --dense DIR")
    return source


def check_compatible(pruned: nn.Module, dense: nn.Module) -> None:
    """The dense reference must be the same architecture with the same tensor shapes."""
    p_spec, d_spec = arch.spec_for(pruned), arch.spec_for(dense)
    if p_spec.model_type != d_spec.model_type:
        raise UsageError(f"--dense is a {d_spec.model_type} model but the pruned checkpoint is {p_spec.model_type}")
    p_shapes = {n: tuple(t.shape) for n, t in pruned.state_dict().items()}
    d_shapes = {n: tuple(t.shape) for n, t in dense.state_dict().items()}
    missing = sorted(set(p_shapes) ^ set(d_shapes))
    if missing:
        raise UsageError(f"--dense does not match the pruned model: tensor {missing[0]} exists in only one of them")
    for name, shape in p_shapes.items():
        if d_shapes[name] != shape:
            raise UsageError(f"--dense does not match the pruned model: {name} is {d_shapes[name]} there, {shape} here")


# ----------------------------------------------------------------------------- per-block math


@torch.no_grad()
def block_error(
    inputs: engine.BlockInputs, block: nn.Module, targets: Sequence[torch.Tensor], keep_outputs: bool = False
) -> tuple[float, ActivationStore]:
    """Mean squared error of `block` on every calibration micro-batch against `targets`
    (accumulated in float64 over all elements), and the outputs (placed like the inputs)
    if asked."""
    total, count, outputs = 0.0, 0, inputs.new_store()
    for x, t in zip(inputs.batches(), targets):
        y = inputs.call(block, x)
        total += float((y.double() - t.to(y.device).double()).pow(2).sum())
        count += y.numel()
        if keep_outputs:
            outputs.append(y)
    return total / max(count, 1), outputs


def batch_order(num_batches: int, steps: int, generator: torch.Generator, order: str = "shuffle") -> list[int]:
    """Which calibration micro-batch each step trains on: a fresh shuffle every epoch
    (`shuffle`), or 0, 1, 2, ... cycling (`fixed`, PERP's reference dataloader)."""
    out: list[int] = []
    while len(out) < steps:
        out.extend(torch.randperm(num_batches, generator=generator).tolist() if order == "shuffle" else range(num_batches))
    return out[:steps]


def _block_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed per (run seed, block)."""
    return (seed * 1_000_003 + index) % (2**63)


@contextlib.contextmanager
def _training_mode(block: nn.Module, mode: str, entries: dict[str, tuple[arch.Matrix, adapters_mod.Adapter]]) -> Iterator[None]:
    """The block's mode while it trains: `eval` trains only the modules carrying adapters
    (lora-prune is dense while training; no dropout noise elsewhere), `train` the whole
    block, dropout included, as PERP's reference `layer.train()`."""
    modules = [block] if mode == "train" else [m.owner for m, _ in entries.values()]
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for module in modules:
            module.eval()


def _mask_violations(model: nn.Module, masks: MaskSet, index: int) -> str | None:
    params = dict(model.named_parameters())
    for name in arch.block_names(model, masks.masks, index):  # only this block's masks are unpacked
        if name in params:
            outside = nonzeros_outside(params[name].detach(), masks.masks[name].to(params[name].device))
            if outside:
                return f"{name} has {outside} nonzeros where the mask says pruned"
    return None


# ----------------------------------------------------------------------------- the block step


class _Reconstructor:
    """State of one run: the two models, the config, the dense stream, the reports."""

    def __init__(
        self,
        model: nn.Module,
        dense: nn.Module,
        masks: MaskSet,
        cfg: ReconstructConfig,
        dense_inputs: engine.BlockInputs | None,
        dense_blocks: engine.Residency | None = None,
        teacher_calls: tuple[engine.BlockCall, ...] = (),
    ) -> None:
        self.model = model
        self.dense = dense
        self.dense_blocks = dense_blocks  # a streamed dense model: block i in memory for block i's step only
        self.masks = masks if masks is not None else MaskSet({}, Pattern())  # a shrunk model has none
        self.cfg = cfg
        self.kind = cfg.adapter_kind
        self.dense_inputs = dense_inputs
        wanted = adapters_mod.match_targets(model, cfg.adapter_targets) if self.kind else []
        self.adapter_keys: dict[int, list[str]] = {}
        for m in wanted:
            self.adapter_keys.setdefault(m.block, []).append(m.key)
        self.reports: list[BlockReport] = []
        self.split: sublayers.Split | None = None  # block i's halves (--granularity sublayer), found at its step
        self.teacher_calls = teacher_calls  # the dense model's per-block arguments (a depth-shrunk model)

    def part_of(self, block: nn.Module, part: str) -> nn.Module:
        """The module fitted as `part` of `block` (pruned or dense): the block itself, or one of its halves."""
        return block if part == "block" else dict(self.split.halves(block))[part]

    def targets(self, s: engine.BlockStep, inputs: engine.BlockInputs, part: str) -> ActivationStore:
        """T: the dense block i's `part` on `inputs`, or on the dense stream (which then
        advances). A depth-shrunk block stands for several dense blocks
        (`cfg.teacher_blocks`, whole blocks only): they run in order, each with the dense
        model's own arguments (`teacher_calls`)."""
        indices = self.cfg.teacher_blocks[s.index] if self.cfg.teacher_blocks else [s.index]
        stream = inputs if self.dense_inputs is None else self.dense_inputs
        for i in indices:  # dense block i with its own arguments, as the engine calls a block
            dense_block = arch.blocks(self.dense)[i]
            with engine.on_device(dense_block, s.device):
                stream = stream.at(i, self.teacher_calls).propagate(self.part_of(dense_block, part))
        if self.dense_inputs is not None:
            self.dense_inputs = stream
        return stream.hidden

    def owns(self, s: engine.BlockStep, part: str, name: str) -> bool:
        """Whether parameter `name` (a model name) belongs to `part` of block `s.index`."""
        if part == "block":
            return True
        prefix = arch.block_prefix(self.model, s.index)
        return name.startswith(prefix) and name[len(prefix):] in self.split.owned[part]

    def attach(self, s: engine.BlockStep, part: str) -> dict[str, adapters_mod.Adapter]:
        matrices = {m.key: m for m in arch.block_matrices(self.model, s.index)}
        keys = [k for k in self.adapter_keys.get(s.index, []) if self.owns(s, part, matrices[k].name)]
        if not keys:
            return {}
        only_block = "^(?:" + "|".join(re.escape(k) for k in keys) + ")$"
        return adapters_mod.attach(self.model, self.kind, self.cfg.rank, self.cfg.alpha, only_block, self.masks)

    def train(
        self, s: engine.BlockStep, part: str, module: nn.Module, inputs: engine.BlockInputs, targets: ActivationStore, seed: int,
        adapters: dict[str, adapters_mod.Adapter],
    ) -> tuple[int, int, float | None, float | None, dict[str, torch.Tensor]]:
        """Train `module` (block `s.index` or one of its halves) and its attached `adapters`
        towards `targets`; returns the trainable parameter count, tokens seen, the first and
        last training losses, and the trained parameters as they were before (when
        `restore` may put them back)."""
        cfg, model = self.cfg, self.model
        params = {n: p for n, p in trainable_mod.select_trainable(model, cfg.train, block=s.index).items() if self.owns(s, part, n)}
        snapshot = {n: p.detach().to("cpu", copy=True) for n, p in params.items()} if cfg.restore else {}
        trainable_mod.set_trainable(model, params)
        label = f"block {s.index}" + ("" if part == "block" else f" {part}")
        adapter_params = [p for a in adapters.values() for p in a.parameters()]
        if not params and not adapter_params:
            return 0, 0, None, None, snapshot
        keep = [(p, self.masks[name]) for name, p in params.items() if name in self.masks]
        generator = torch.Generator().manual_seed(seed)
        order = batch_order(len(inputs), cfg.steps_per_block, generator, cfg.order)
        steps = cfg.steps_per_block

        with mixed_precision(s.block, list(params.values())) as amp:

            def loss_fn(step: int, micro: int) -> torch.Tensor:
                if step % 10 == 0 or step + 1 == steps:
                    s.status(f"{label}: step {step + 1}/{steps}")
                k = order[step]
                x = inputs.batch(k)
                with amp():
                    y = inputs.call(module, x)
                return (y.float() - targets[k].to(y.device).float()).pow(2).mean()

            with _training_mode(s.block, cfg.mode, adapters_mod.attached_matrices(model)):
                try:
                    result = fit(
                        list(params.values()) + adapter_params, loss_fn, cfg.train_config(), keep_masks=keep,
                        quiet=True, description=label,
                    )
                except NumericalError as exc:
                    raise NumericalError(f"{label}: {exc}") from exc
        count = sum(p.numel() for p in params.values()) + sum(p.numel() for p in adapter_params)
        tokens = sum(inputs.tokens_in(k) for k in order)
        return count, tokens, result.initial_loss, result.final_loss, snapshot

    def prepare(self, s: engine.BlockStep, inputs: engine.BlockInputs, part: str) -> ActivationStore:
        """What happens before a part of block i trains: here, only its targets."""
        s.status(f"block {s.index}: dense targets" + ("" if part == "block" else f" ({part})"))
        return self.targets(s, inputs, part)

    def step(self, s: engine.BlockStep) -> engine.BlockInputs | None:
        if self.dense_blocks is None:
            return self.fit_parts(s)
        block = arch.blocks(self.dense)[s.index]
        self.dense_blocks.load(s.index, block)  # once per step: both halves take their targets from it
        try:
            return self.fit_parts(s)
        finally:
            self.dense_blocks.release(s.index, block)

    def fit_parts(self, s: engine.BlockStep) -> engine.BlockInputs | None:
        """Fit block `s.index` whole or half by half; the next inputs, or None."""
        if self.cfg.granularity == "block":
            parts: list[tuple[str, nn.Module]] = [("block", s.block)]
        else:
            s.status(f"block {s.index}: finding its attention and MLP halves")
            self.split = sublayers.split(self.model, s.index, s.block, s.inputs.call, s.inputs.batch(0))
            parts = self.split.halves(s.block)
        inputs = s.inputs
        for n, (part, module) in enumerate(parts):
            last = n + 1 == len(parts)
            seed = _block_seed(self.cfg.seed + n, s.index)
            outputs = self.fit(s, part, module, inputs, seed, keep_outputs=not last)
            if last:  # None: the engine propagates through the block as it was put back
                return None if outputs is None else inputs.replaced(outputs)
            inputs = inputs.replaced(outputs)
        return None

    def fit(
        self, s: engine.BlockStep, part: str, module: nn.Module, inputs: engine.BlockInputs, seed: int, keep_outputs: bool
    ) -> ActivationStore | None:
        """Fit one part of block i (the block, or a half) on `inputs`; its outputs (None
        when it was put back and `keep_outputs` is off: the engine recomputes them)."""
        start = time.perf_counter()
        label = f"block {s.index}" + ("" if part == "block" else f" {part}")
        targets = self.prepare(s, inputs, part)
        s.status(f"{label}: error before")
        before, _ = block_error(inputs, module, targets)
        try:
            torch.manual_seed(seed)  # the adapters' initialisation
            count, tokens, loss_first, loss_last, snapshot = self.train(s, part, module, inputs, targets, seed, self.attach(s, part))
            s.status(f"{label}: error after")
            # measured with the adapters still attached: in eval mode the layer computes with
            # the weights their merge writes, bit for bit, so a block put back never needs a
            # copy of its matrices (the snapshot holds the trained parameters only)
            trained, outputs = block_error(inputs, module, targets, keep_outputs=True)
            restored = self.cfg.restore and not trained <= before  # also catches NaN
            if not math.isfinite(trained):
                raise NumericalError(f"{label}: the reconstruction error is {trained} after training")
            if not restored:
                with torch.no_grad():
                    for matrix, adapter in adapters_mod.attached_matrices(self.model).values():
                        adapter.merge(matrix)
        finally:  # merged or dropped: the adapters live from attaching to here
            adapters_mod.detach(self.model)
            self.model.requires_grad_(False)
        if restored:
            with torch.no_grad():
                for name, value in snapshot.items():
                    self.model.get_parameter(name).copy_(value)
            outputs = inputs.run(module) if keep_outputs else None
        problem = _mask_violations(self.model, self.masks, s.index)
        if problem:  # cannot happen with masked merges and masked gradients; never let it reach disk
            raise NumericalError(f"reconstructing {label} broke the mask: {problem}")
        self.reports.append(BlockReport(
            block=s.index, mse_before=before, mse_trained=trained, mse_after=before if restored else trained,
            restored=restored, trainable_parameters=count, tokens=tokens, loss_first=loss_first, loss_last=loss_last,
            time_s=time.perf_counter() - start, part=part,
        ))
        return outputs


class _Interleaved(_Reconstructor):
    """Prune block i right before reconstructing it, in the same engine pass (PERP's
    reference order): its inputs X_i went through the reconstructed blocks 0..i-1, its
    target is block i itself before pruning (the dense block i on X_i), and its mask
    comes from statistics of X_i (`pruner.BlockPruner`)."""

    def __init__(self, model: nn.Module, masks: MaskSet, cfg: ReconstructConfig, block_pruner: BlockPruner) -> None:
        super().__init__(model, None, masks, cfg, None)
        self.block_pruner = block_pruner

    def prepare(self, s: engine.BlockStep, inputs: engine.BlockInputs, part: str) -> ActivationStore:
        s.status(f"block {s.index}: dense targets")
        targets = inputs.run(s.block)  # block i is still dense here
        self.masks.masks.update(self.block_pruner.prune_block(s))
        return targets


# ----------------------------------------------------------------------------- the recipe


def check_pruned(pruned_ckpt: checkpoint.Checkpoint, maskless: bool = False) -> None:
    """Usage errors about the input itself: merged adapters and masks are required (no
    masks only for a shrunk model, `maskless`)."""
    if pruned_ckpt.adapters_config is not None:
        raise UsageError(f"{pruned_ckpt.source} has unmerged adapters; run `perp merge` on it first")
    if not maskless and (pruned_ckpt.masks is None or len(pruned_ckpt.masks) == 0):
        raise UsageError(f"{pruned_ckpt.source} has no masks.safetensors: nothing was pruned, so there is nothing to reconstruct")



def prepare(pruned_ckpt: checkpoint.Checkpoint, dense_model: nn.Module | None, cfg: ReconstructConfig) -> None:
    """Check the two models against each other and add `--add-biases`' zero biases to
    the pruned one (recorded in `pruned_ckpt.created`): before the output is planned,
    since the biases are part of it. `reconstruct` does it when the caller did not."""
    model = pruned_ckpt.model
    if dense_model is not None and cfg.maskless:
        from perp_cli.shrinking import check_teacher

        check_teacher(model, dense_model, cfg.teacher_blocks)
        if cfg.granularity != "block" and any(len(t) > 1 for t in cfg.teacher_blocks or []):
            raise UsageError("a depth-shrunk block stands for several dense blocks, so it has no dense halves: "
                             "--granularity block only")
    elif dense_model is not None:
        check_compatible(model, dense_model)
    pruned_ckpt.created += trainable_mod.add_biases(model) if cfg.add_biases else []


def reconstruct(
    pruned_ckpt: checkpoint.Checkpoint,
    dense: checkpoint.Checkpoint | nn.Module | None,
    tokens: torch.Tensor,
    cfg: ReconstructConfig,
    prune: PruneConfig | None = None,
    blocks: engine.Residency | None = None,
) -> ReconstructOutcome:
    """Reconstruct `pruned_ckpt.model` block by block in place against `dense` (a model,
    or a checkpoint in either residency).

    `tokens` are the calibration windows `[n, seqlen]`. The dense model is only read;
    it stays on the host except for the block being reconstructed. The masks are not
    changed; the adapters are merged into the weights (nothing to save separately).
    `blocks`: the engine's residency when `pruned_ckpt` is streamed (`checkpoint.writing`'s
    `output.blocks`); a streamed `dense` is read a block at a time; the numbers are the same.

    `prune` (interleaved, PERP's reference order): `pruned_ckpt` is the DENSE model and
    `dense` is not needed; each block is pruned with `prune` right before it is
    reconstructed, in the same engine pass; the new masks are `outcome.masks`.
    """
    start = time.perf_counter()
    model = pruned_ckpt.model
    dense_model = dense.model if isinstance(dense, checkpoint.Checkpoint) else dense
    dense_blocks = streaming.StreamedBlocks(dense) if isinstance(dense, checkpoint.Checkpoint) and dense.streamed else None
    block_pruner = None
    if prune is not None:
        if blocks is not None:
            raise UsageError("pruning while reconstructing (--prune-method) does not stream yet; use --streaming off")
        if cfg.target != "dense":
            raise UsageError("--prune-method reconstructs each block against itself before pruning: --target dense only")
        if cfg.granularity != "block":
            raise UsageError("--prune-method prunes whole blocks while reconstructing them: --granularity block only")
        block_pruner = BlockPruner(pruned_ckpt, prune)
    else:
        check_pruned(pruned_ckpt, cfg.maskless)
    if tokens.dim() != 2 or tokens.shape[0] < 1:
        raise UsageError(f"calibration tokens must be [n, seqlen] with n >= 1, got {list(tokens.shape)}")
    if not pruned_ckpt.created:
        prepare(pruned_ckpt, dense_model, cfg)
    added = list(pruned_ckpt.created)
    trainable_mod.select_trainable(model, cfg.train, block=0)  # e.g. `biases` on LLaMA: the error names --add-biases
    device = checkpoint.resolve_device(cfg.device)
    if dense_model is not None:
        dense_model.eval()
        dense_model.requires_grad_(False)
    model.requires_grad_(False)

    # one store for the run: the dense stream, the inputs, targets and outputs share its device budget
    run_store = ActivationStore(cfg.placement(device))
    dense_inputs, teacher_calls = None, ()
    if cfg.target == "dense-stream" or cfg.teacher_blocks:
        with dense_blocks.outside() if dense_blocks is not None else contextlib.nullcontext():
            if cfg.target == "dense-stream":
                dense_inputs = engine.capture_inputs(dense_model, tokens, device=device, batch_size=cfg.batch_size, offload=run_store)
            else:  # a shrunk block's dense blocks may take other masks (sliding/full)
                teacher_calls = engine.capture_calls(dense_model, tokens, device=device, batch_size=cfg.batch_size)
    if block_pruner is not None:
        old = pruned_ckpt.masks.masks.select(list(pruned_ckpt.masks.masks)) if pruned_ckpt.masks is not None else {}  # a copy, still packed
        worker: _Reconstructor = _Interleaved(model, MaskSet(old, block_pruner.p.pattern), cfg, block_pruner)
    else:
        worker = _Reconstructor(model, dense_model, pruned_ckpt.masks, cfg, dense_inputs, dense_blocks, teacher_calls)
    with make_progress(cfg.quiet) as progress:
        engine.calibrate(
            model, tokens, worker.step, device=device, batch_size=cfg.batch_size, offload=run_store,
            progress=progress, description="reconstruct blocks", residency=blocks, in_place=blocks is not None,
            propagate_last=False,  # the blocks are fitted and written; nothing reads the last one's outputs
        )
    activation_record = {"placement": run_store.placement.describe(), "peak_device_bytes": run_store.peak_device_bytes}
    parts = trainable_mod.parse_spec(cfg.train)
    return ReconstructOutcome(
        config=cfg,
        blocks=worker.reports,
        trained=parts,
        adapter=cfg.adapter_kind or "none",
        added_biases=added,
        total_parameters=trainable_mod.count_parameters(model),
        wall_time_s=time.perf_counter() - start,
        device=str(device),
        peak_memory=peak_memory(),
        activations=activation_record,
        masks=None if cfg.maskless else worker.masks,
        pruning=block_pruner.results(activation_record) if block_pruner is not None else None,
    )
