"""`prune(ckpt, config)`: the library behind `perp prune`.

One recipe for every method:

1. validate the request (method, pattern, sparsity, scope) before any work;
2. choose the matrices from the architecture map (`--targets`/`--exclude`), check N:M
   divisibility, and read the input's masks: already-pruned weights stay pruned, so
   the new mask is always a subset of the old one;
3. data-free methods (magnitude, random) score every matrix directly; calibration
   methods (Wanda, SparseGPT) run the block-sequential engine: per block, one pass with
   statistics hooks (one statistics object per input group), then each group is pruned
   and the calibration inputs go through the *pruned* block to the next one;
4. the masks are assembled in each parameter's own layout, applied (exact zeros), and
   the achieved sparsity is measured from the masks.

`--scope global` needs every score before any mask: for Wanda the scores are then
collected on the dense model's activations (blocks are not pruned during the pass).

Streaming (`stream=`, from perp_cli.streaming): the model is a skeleton on the meta
device; the engine loads each block before its step and, once the block is pruned and
propagated, hands it with its final keep-masks (`_Pruner.block_keep`) to the stream,
which writes and frees it. Data-free methods then also go block by block through the
engine. Same numbers as in memory; `--scope global` cannot stream (it ranks the whole
model at once).

Interleaved (`BlockPruner`, for `perp reconstruct --prune-method`): another step's engine
pass asks for each block to be pruned in turn, with the same statistics and selection
code, so block i is pruned from whatever inputs that pass feeds it (PERP: the outputs of
the already reconstructed blocks).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Any, ContextManager, NamedTuple, Protocol

import torch
from torch import nn

from perp_cli import activations, arch, checkpoint, data, engine, mask
from perp_cli.arch import Matrix
from perp_cli.checkpoint import Checkpoint
from perp_cli.errors import ArchitectureError, UsageError
from perp_cli.manifest import peak_memory, sha256_tensor
from perp_cli.mask import MaskSet, Pattern
from perp_cli.progress import make_progress
from perp_cli.pruning import METHODS, Method
from perp_cli.pruning.magnitude import magnitude_scores
from perp_cli.pruning.random_ import random_scores
from perp_cli.pruning.selection import global_prune_masks, nm_prune_mask, prune_mask
from perp_cli.pruning.sparsegpt import SELECTIONS, inverse_hessian, prune_matrix
from perp_cli.pruning.statistics import Group, collecting, target_groups
from perp_cli.pruning.wanda import wanda_scores


@dataclass
class PruneConfig:
    """Everything `perp prune` can be asked; defaults follow the references."""

    method: str
    sparsity: float | None = None  # None: 0.5 unstructured, 1 - N/M for N:M
    pattern: str = "unstructured"
    scope: str | None = None  # None: the method's default
    targets: str | None = None
    exclude: str | None = None
    skip_indivisible: bool = False
    damp: float = 0.01
    blocksize: int = 128
    sparsegpt_selection: str = "reference"  # the block mask rule: reference (<= k-th, as published code) or exact
    calib: str = "c4"
    text_field: str = "text"
    nsamples: int = 128
    seqlen: int | None = None
    calib_concat: bool = False
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 8
    offload_activations: bool = False
    max_memory: str | None = None  # activations on the device, e.g. "2GiB" (perp_cli.activations)
    offload_dir: str | None = None  # the rest of the activations in files here
    quiet: bool = True


class PruneOutcome(NamedTuple):
    masks: MaskSet | None  # None when streaming: the stream wrote them block by block
    results: dict[str, Any]
    data: dict[str, Any]  # calibration source and token hash ({} for data-free methods)


class WeightStream(Protocol):
    """Where a meta-device model's weights come from and go to (perp_cli.streaming)."""

    def outside(self) -> ContextManager[None]: ...

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module, keep: dict[str, torch.Tensor]) -> None: ...


MaskStats = dict[str, tuple[float, int, int]]  # name -> (sparsity, kept, numel)


def keep_stats(keep: torch.Tensor) -> tuple[float, int, int]:
    """Sparsity as `MaskSet.sparsity` computes it, and the exact counts."""
    return 1.0 - keep.float().mean().item(), int(keep.sum()), keep.numel()


@dataclass(frozen=True)
class _Plan:
    method: Method
    pattern: Pattern
    sparsity: float
    scope: str  # row | matrix | global | N:M


def plan(config: PruneConfig) -> _Plan:
    """Validate the options against each other; raise UsageError before any work."""
    method = METHODS.get(config.method)
    if method is None:
        raise UsageError(f"--method {config.method!r} is not one of {', '.join(METHODS)}")
    pattern = Pattern.parse(config.pattern)
    if pattern.structured:
        if config.sparsity is not None and abs(config.sparsity - pattern.sparsity) > 1e-9:
            raise UsageError(
                f"--pattern {pattern} means sparsity {pattern.sparsity:g}, but --sparsity {config.sparsity:g} was given; drop one"
            )
        if config.scope is not None:
            raise UsageError("--scope applies to unstructured pruning; with N:M every group of M inputs is its own group")
        if method.name == "sparsegpt" and config.blocksize % pattern.m:
            raise UsageError(f"--blocksize {config.blocksize} must be a multiple of M={pattern.m} for {pattern}")
        sparsity, scope = pattern.sparsity, str(pattern)
    else:
        sparsity = 0.5 if config.sparsity is None else config.sparsity
        if not 0.0 <= sparsity < 1.0:
            raise UsageError(f"--sparsity must be in [0, 1), got {sparsity}")
        scope = config.scope or method.default_scope
        if scope not in method.scopes:
            raise UsageError(f"--scope {scope!r} is not available for {method.name} (choose from {', '.join(method.scopes)})")
    if config.damp <= 0:
        raise UsageError(f"--damp must be positive, got {config.damp}")
    if config.blocksize < 1:
        raise UsageError(f"--blocksize must be at least 1, got {config.blocksize}")
    if config.nsamples < 1:
        raise UsageError(f"--nsamples must be at least 1, got {config.nsamples}")
    if config.sparsegpt_selection not in SELECTIONS:
        raise UsageError(f"--sparsegpt-selection {config.sparsegpt_selection!r} is not one of {', '.join(SELECTIONS)}")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
    activations.placement_for(torch.device("cpu"), config.offload_activations, config.max_memory, config.offload_dir)
    for flag, regex in (("--targets", config.targets), ("--exclude", config.exclude)):
        if regex:
            try:
                re.compile(regex)
            except re.error as exc:
                raise UsageError(f"{flag} {regex!r} is not a valid regular expression: {exc}") from exc
    return _Plan(method, pattern, sparsity, scope)


def _choose_matrices(model: nn.Module, config: PruneConfig, pattern: Pattern) -> tuple[list[Matrix], list[str]]:
    """Targeted matrices, and those skipped because M does not divide their inputs."""
    found = arch.matrices(model, config.targets, config.exclude)
    if not found:
        raise UsageError("--targets/--exclude leave no matrix to prune")
    skipped: list[str] = []
    if pattern.structured:
        bad = [m for m in found if m.shape[1] % pattern.m]
        if bad and not config.skip_indivisible:
            names = ", ".join(sorted({m.key for m in bad})[:3]) + (" ..." if len(bad) > 3 else "")
            raise UsageError(
                f"{pattern} needs input dimensions divisible by {pattern.m}; {names} has {bad[0].shape[1]} inputs "
                "(pass --skip-indivisible to leave such matrices dense, or --exclude them)"
            )
        skipped = [m.key for m in bad]
        found = [m for m in found if m.shape[1] % pattern.m == 0]
        if not found:
            raise UsageError(f"no targeted matrix has an input dimension divisible by {pattern.m}")
    return found, skipped


def _old_pruned(masks: MaskSet | None, m: Matrix) -> torch.Tensor | None:
    """Weights of `m` an earlier step pruned, `[out, in]` (True = pruned), or None."""
    if masks is None or m.name not in masks:
        return None
    keep = masks[m.name]
    if m.expert is not None:
        keep = keep[m.expert]
    keep = keep.t() if m.transposed else keep
    return ~keep.bool()


def _check_carried_masks(model: nn.Module, old: MaskSet | None, names: set[str], pattern: Pattern) -> None:
    """Masks carried over untouched must obey the new pattern, or the output is invalid."""
    if old is None or not pattern.structured:
        return
    transposed = arch.transposed_names(model)
    for name, keep in old.masks.items():
        if name not in names and mask.nm_violations(keep, pattern, transposed=name in transposed):
            raise UsageError(
                f"{name} keeps its {old.pattern} mask from the input, which breaks {pattern}; include it in --targets"
            )


class _Pruner:
    """State of one pruning run: pruned masks by matrix key, notes for the manifest."""

    def __init__(self, ckpt: Checkpoint, config: PruneConfig, p: _Plan, matrices: list[Matrix]) -> None:
        self.model = ckpt.model
        self.old = ckpt.masks
        self.config = config
        self.p = p
        self.matrices = matrices
        self.keys = {m.key for m in matrices}
        self.pruned = mask.PackedMasks()  # by matrix key, True = pruned; bit-packed until assembled
        self.global_scores: dict[str, torch.Tensor] = {}
        self.notes: dict[str, list[str]] = {}
        self.block_seconds: list[dict[str, float]] = []  # per calibrated block: statistics pass, pruning
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stats: MaskStats = {}  # filled by block_keep (streaming)

    def note(self, kind: str, text: str) -> None:
        self.notes.setdefault(kind, []).append(text)

    # --- mask selection and writing

    def select(self, scores: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        if self.p.pattern.structured:
            return nm_prune_mask(scores, self.p.pattern.n, self.p.pattern.m, old)
        return prune_mask(scores, self.p.sparsity, self.p.scope, old)

    def commit(self, m: Matrix, pruned: torch.Tensor) -> None:
        """Zero the pruned weights in place and remember the mask."""
        with torch.no_grad():
            m.weight().masked_fill_(pruned.to(m.weight().device), 0)
        self.pruned[m.key] = pruned.cpu()

    def score_or_select(self, m: Matrix, scores: torch.Tensor) -> None:
        old = _old_pruned(self.old, m)
        if self.p.scope == "global":
            self.global_scores[m.key] = scores.cpu()
        else:
            self.commit(m, self.select(scores, old))

    def finish_global(self) -> None:
        if not self.global_scores:
            return
        by_key = {m.key: m for m in self.matrices}
        old = {k: _old_pruned(self.old, by_key[k]) for k in self.global_scores}
        for key, pruned in global_prune_masks(self.global_scores, self.p.sparsity, old).items():
            self.commit(by_key[key], pruned)

    # --- data-free methods

    def run_data_free(self, progress: Any) -> None:
        task = progress.add_task("matrices", total=len(self.matrices), status="")
        for m in self.matrices:
            progress.update(task, status=m.key)
            self.prune_data_free(m)
            progress.advance(task)
        self.finish_global()

    def prune_data_free(self, m: Matrix) -> None:
        if self.p.method.name == "magnitude":
            scores = magnitude_scores(m.weight())
        else:
            scores = random_scores(m.shape, self.generator)
        self.score_or_select(m, scores)

    def step_data_free(self, s: engine.BlockStep) -> None:
        """The data-free methods one block at a time (streaming; same matrix order, so
        the random generator gives the same scores as `run_data_free`)."""
        for m in self.matrices:
            if m.block == s.index:
                s.status(f"block {s.index}: {m.key}")
                self.prune_data_free(m)
        return None

    # --- calibration methods

    def prune_group(self, group: Group, status: Any) -> None:
        status(f"block {group.matrices[0].block}: {group.label}")
        if group.stat.tokens == 0:  # an expert the router never chose on this data
            self.note("no_calibration_tokens", f"{group.label}: magnitude fallback")
            for m in group.matrices:
                self.score_or_select(m, magnitude_scores(m.weight()))
            return
        if self.p.method.name == "wanda":
            norms = group.stat.norms()
            for m in group.matrices:
                self.score_or_select(m, wanda_scores(m.weight(), norms))
            return
        inverse = inverse_hessian(group.stat.hessian(), self.config.damp, where=group.label)
        if inverse.retries:
            self.note("damping", f"{group.label}: Hessian not positive definite, damp raised to {inverse.damp:g} ({inverse.retries} retries)")
        n, mm = (self.p.pattern.n, self.p.pattern.m) if self.p.pattern.structured else (0, 0)
        scope = self.p.scope if not self.p.pattern.structured else "matrix"
        for m in group.matrices:
            w = m.weight()
            result = prune_matrix(
                w, inverse, self.p.sparsity, n, mm, self.config.blocksize, scope, _old_pruned(self.old, m),
                selection=self.config.sparsegpt_selection,
            )
            with torch.no_grad():
                w.copy_(result.weight.to(w.dtype))
            self.commit(m, result.pruned)

    def step(self, s: engine.BlockStep) -> None:
        groups = target_groups(self.model, s.index, self.keys)
        if not groups:
            return None
        s.status(f"block {s.index}: statistics")
        start = time.perf_counter()
        with collecting(self.model, groups, self.p.method.statistic, s.device) as stats:
            s.inputs.run(s.block, keep_outputs=False)
        _sync(s.device)
        middle = time.perf_counter()
        for group in stats:
            self.prune_group(group, s.status)
        _sync(s.device)
        self.block_seconds.append({"statistics": round(middle - start, 4), "prune": round(time.perf_counter() - middle, 4)})
        return None

    # --- assembling the result

    def mask_set(self) -> MaskSet:
        """Keep-masks in each parameter's layout; untouched input masks carried over."""
        old = self.old.masks if self.old is not None else mask.PackedMasks()
        return MaskSet(self._assemble(old, self.matrices), self.p.pattern)

    def block_keep(self, index: int) -> mask.PackedMasks:
        """The final keep-masks of block `index`'s parameters, as `mask_set` would give
        them; the block's pruned masks are dropped here, so a streamed run holds the
        masks of one block at a time. Records each mask's sparsity in `self.stats`."""
        prefix = f"{arch.spec_for(self.model).blocks}.{index}."
        old = self.old.masks.select([n for n in self.old.masks if n.startswith(prefix)]) if self.old is not None else mask.PackedMasks()
        matrices = [m for m in self.matrices if m.block == index]
        keep = self._assemble(old, matrices)
        for m in matrices:
            del self.pruned[m.key]
        self.stats.update({n: keep_stats(k) for n, k in keep.items()})
        return keep

    def _assemble(self, old: mask.PackedMasks, matrices: list[Matrix]) -> mask.PackedMasks:
        """Input masks `old` (carried over) updated with the new ones of `matrices`, packed;
        one parameter's mask is unpacked at a time (all experts of a fused parameter together)."""
        keep = mask.PackedMasks()
        keep.update(old)
        by_name: dict[str, list[Matrix]] = {}
        for m in matrices:
            by_name.setdefault(m.name, []).append(m)
        for name, ms in by_name.items():
            if ms[0].expert is None:
                keep[name] = ms[0].to_param_layout(~self.pruned[ms[0].key]).contiguous()
                continue
            full = keep[name] if name in keep else torch.ones(ms[0].parameter.shape, dtype=torch.bool)
            for m in ms:
                full[m.expert] = m.to_param_layout(~self.pruned[m.key])
            keep[name] = full
        return keep


def _sync(device: torch.device) -> None:
    """Wait for queued device work so per-block timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration_tokens(ckpt: Checkpoint, config: PruneConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sample the calibration windows as the references do; returns tokens and their description."""
    seqlen = data.default_seqlen(ckpt.model, config.seqlen)
    source = data.load_source(config.calib, split="train", text_field=config.text_field)
    tokens = data.sample_windows(ckpt.require_tokenizer(), source, config.nsamples, seqlen, config.seed, config.calib_concat)
    return tokens, {**data.describe_tokens(source, tokens), "seqlen": seqlen, "concat": config.calib_concat}


def _setup(ckpt: Checkpoint, config: PruneConfig, stream: WeightStream | None) -> tuple[_Plan, "_Pruner", list[str]]:
    """Validate against the checkpoint, choose the matrices, build the run's state."""
    p = plan(config)
    if ckpt.adapters is not None:
        raise UsageError(f"{ckpt.source} has unmerged adapters; run `perp merge` first, then prune the merged checkpoint")
    if stream is not None and p.scope == "global":
        raise UsageError("--scope global ranks every weight of the model at once, so it cannot stream; use --scope row/matrix, or --streaming off")
    torch.manual_seed(config.seed)
    try:
        matrices, skipped = _choose_matrices(ckpt.model, config, p.pattern)
    except ArchitectureError as exc:
        raise UsageError(str(exc)) from exc
    _check_carried_masks(ckpt.model, ckpt.masks, {m.name for m in matrices}, p.pattern)
    return p, _Pruner(ckpt, config, p, matrices), skipped


def _results(pruner: "_Pruner", stats: MaskStats, skipped: list[str], start: float, device: torch.device,
             activation_record: dict[str, Any]) -> dict[str, Any]:
    """The `results` of a prune step (perp.json, --json), from the masks' statistics."""
    p, config = pruner.p, pruner.config
    pruned_names = sorted({m.name for m in pruner.matrices})
    kept = sum(stats[n][1] for n in pruned_names)
    total = sum(stats[n][2] for n in pruned_names)
    kept_all, total_all = sum(v[1] for v in stats.values()), sum(v[2] for v in stats.values())
    return {
        "method": p.method.name,
        "pattern": str(p.pattern),
        "scope": p.scope,
        "sparsity_requested": p.sparsity,
        "sparsity_achieved": {
            "pruned_tensors": round(1 - kept / total, 6) if total else 0.0,
            "all_masked_tensors": round(1.0 - kept_all / total_all if total_all else 0.0, 6),
            "per_tensor": {n: round(v[0], 6) for n, v in stats.items()},
        },
        "matrices_pruned": len(pruner.matrices),
        "skipped_indivisible": skipped,
        "notes": pruner.notes,
        "block_seconds": pruner.block_seconds,
        "pruning_time_s": round(time.time() - start, 3),
        "device": str(device),
        "activations": activation_record,
        "config": asdict(config),
        "peak_memory": peak_memory(),
    }


class BlockPruner:
    """Pruning driven by another step's engine pass, one block at a time (interleaved
    prune + reconstruct, PERP's order: block i is pruned from the inputs that went
    through the already reconstructed blocks 0..i-1).

    `prune_block(s)` prunes block `s.index` with `s.inputs` (calibration methods) or
    without (magnitude, random) and returns its final keep-masks in each parameter's
    layout; `results()` is the prune step's record once every block is done.
    """

    def __init__(self, ckpt: Checkpoint, config: PruneConfig) -> None:
        self.start = time.time()
        self.p, self.state, self.skipped = _setup(ckpt, config, None)
        if self.p.scope == "global":
            raise UsageError("--scope global ranks every weight of the model before pruning any block, so it cannot interleave with reconstruction; use row or matrix")
        self.device = checkpoint.resolve_device(config.device)

    def prune_block(self, s: engine.BlockStep) -> dict[str, torch.Tensor]:
        if self.p.method.statistic is None:
            self.state.step_data_free(s)
        else:
            self.state.step(s)
        return self.state.block_keep(s.index)

    def results(self, activation_record: dict[str, Any] | None = None) -> dict[str, Any]:
        return _results(self.state, self.state.stats, self.skipped, self.start, self.device, activation_record or {})


def prune(
    ckpt: Checkpoint, config: PruneConfig, tokens: torch.Tensor | None = None, stream: WeightStream | None = None
) -> PruneOutcome:
    """Prune `ckpt.model` in place and return its masks, results and calibration record.

    `tokens` (`[n, seqlen]`) replaces sampling from `config.calib` (tests, benchmarks).
    With `stream` (perp_cli.streaming) the model is a meta-device skeleton: each block is
    loaded before its turn and handed to `stream.release` with its keep-masks once done;
    the returned `masks` is then None.
    """
    start = time.time()
    p, pruner, skipped = _setup(ckpt, config, stream)
    device = checkpoint.resolve_device(config.device)
    placement = activations.placement_for(device, config.offload_activations, config.max_memory, config.offload_dir)
    model = ckpt.model
    data_record: dict[str, Any] = {}
    activation_record: dict[str, Any] = {}
    residency = None
    if stream is not None:
        residency = engine.Residency(
            load=stream.load, release=lambda i, block: stream.release(i, block, pruner.block_keep(i)), outside=stream.outside
        )

    with make_progress(config.quiet) as progress:
        if p.method.statistic is None and stream is None:
            pruner.run_data_free(progress)
        elif p.method.statistic is None:
            engine.run_blocks(model, None, pruner.step_data_free, progress=progress, description=f"{p.method.name} blocks", residency=residency)
        else:
            # find the input groups (one probe forward) while the whole model sits on its home device
            arch.groups_probed(model)
            if tokens is None:
                tokens, data_record = calibration_tokens(ckpt, config)
            else:
                data_record = {"source": "tokens given by the caller", "token_ids_sha256": sha256_tensor(tokens), "shape": list(tokens.shape)}
            if placement.ineffective:
                pruner.note("activations", "--max-memory/--offload-activations change nothing on the CPU (the host is the device); --offload-dir DIR puts activations on disk")
            final = engine.calibrate(
                model, tokens, pruner.step, device=device, batch_size=config.batch_size,
                offload=placement, progress=progress, description=f"{p.method.name} blocks",
                residency=residency, in_place=stream is not None,
            )
            activation_record = {"placement": placement.describe(), "peak_device_bytes": final.hidden.peak_device_bytes}
            del final
            pruner.finish_global()

    if stream is None:
        masks: MaskSet | None = pruner.mask_set()
        mask.apply(model, masks)
        stats = {n: keep_stats(k) for n, k in masks.masks.items()}
    else:
        masks, stats = None, pruner.stats
    return PruneOutcome(masks, _results(pruner, stats, skipped, start, device, activation_record), data_record)
