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
4. as each block is done, its masks are assembled in each parameter's own layout,
   applied (exact zeros), verified and handed to the output (`_Pruner.hand_over`: the
   run holds one block's masks, not the model's), and the achieved sparsity is measured
   from the masks.

`--scope global` needs every score before any mask: for Wanda the scores are then
collected on the dense model's activations (blocks are not pruned during the pass).

`--allocation owl` (perp_cli/pruning/owl.py) also needs something of every block before
the first is pruned: each block's outlier ratio. It runs the same engine twice: a
statistics-only pass over the dense model (nothing pruned, the calibration data goes
through the dense blocks, as the reference computes its ratios), then the pruning pass
with one sparsity per block.

`--refine dsnot` (perp_cli/pruning/dsnot.py) refines each block's masks right after the
method chose them, inside the same engine step, from the same statistics hook (moments
of each input added to the method's statistic); `--method keep` refines the input's
masks instead of choosing new ones (the pruned weights' values come from the dense model).
`--permute` (RIA's channel reallocation, N:M) chooses each matrix's N:M mask in a
permuted input order and records the permutation with the masks (`MaskSet.permutations`).

Every method goes block by block through the engine, the data-free ones with no
activations (`engine.run_blocks(model, None, ...)`). A streamed checkpoint
(`checkpoint.open(..., streamed=True)`) is a skeleton on the meta device: `blocks` (the
output's `streaming.StreamedBlocks`) is then the engine's residency, which loads each block
before its step and, once the block is pruned and propagated, writes it with its final
keep-masks (`_Pruner.block_keep`) and frees it. Same numbers as in memory; `--scope
global` cannot stream (it ranks the whole model at once).

Interleaved (`BlockPruner`, for `perp reconstruct --prune-method`): another step's engine
pass asks for each block to be pruned in turn, with the same statistics and selection
code, so block i is pruned from whatever inputs that pass feeds it (PERP: the outputs of
the already reconstructed blocks).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from perp_cli import activations, arch, checkpoint, data, engine, mask
from perp_cli.arch import Matrix
from perp_cli.checkpoint import Checkpoint
from perp_cli.errors import ArchitectureError, CheckpointError, UsageError
from perp_cli.manifest import peak_memory
from perp_cli.mask import MaskSet, MaskStats, Pattern, mask_problems
from perp_cli.progress import make_progress
from perp_cli.pruning import METHODS, Method, dsnot, owl
from perp_cli.pruning.magnitude import magnitude_scores
from perp_cli.pruning.random_ import random_scores
from perp_cli.pruning.ria import channel_permutation
from perp_cli.pruning.selection import global_prune_masks, nm_prune_mask, prune_mask
from perp_cli.pruning.sparsegpt import SELECTIONS, PhaseClock, inverse_hessian, prune_matrix
from perp_cli.pruning.statistics import Group, NormStat, collecting, target_groups


@dataclass
class PruneConfig(data.CalibrationConfig):
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
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 8
    offload_activations: bool = False
    max_memory: str | None = None  # activations on the device, e.g. "2GiB" (perp_cli.activations)
    offload_dir: str | None = None  # the rest of the activations in files here
    quiet: bool = True
    allocation: str = "uniform"  # uniform | owl (one sparsity per block from outlier ratios)
    owl_m: float = owl.DEFAULT_M
    owl_lambda: float = owl.DEFAULT_LAMBDA
    permute: bool = False  # N:M: RIA's channel reallocation before choosing each mask
    refine: str | None = None  # None | dsnot
    refine_iters: int = dsnot.DEFAULT_ITERS
    refine_threshold: float = dsnot.DEFAULT_THRESHOLD
    refine_skip: str = "mlp"  # the reference's --skip_layer: mlp, attention or none


ALLOCATIONS = ("uniform", "owl")
REFINEMENTS = ("dsnot",)


class PruneOutcome(NamedTuple):
    masks: MaskSet | None  # None when spooled (`spool`) or streamed: they went to the output block by block
    results: dict[str, Any]
    data: dict[str, Any]  # calibration source and token hash ({} for data-free methods)


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
        if method.blockwise and config.blocksize % pattern.m:
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
    _plan_extensions(config, method, pattern, sparsity, scope)
    for flag, regex in (("--targets", config.targets), ("--exclude", config.exclude)):
        if regex:
            try:
                re.compile(regex)
            except re.error as exc:
                raise UsageError(f"{flag} {regex!r} is not a valid regular expression: {exc}") from exc
    return _Plan(method, pattern, sparsity, scope)


def streaming_refusal(config: PruneConfig) -> str | None:
    """Why these options cannot stream (`streaming.decide`), or None."""
    if plan(config).scope == "global":
        return "--scope global ranks the whole model at once"
    if config.allocation != "uniform" or config.refine is not None or config.permute:
        return "--allocation owl, --refine and --permute run in memory"
    return None


def _plan_extensions(config: PruneConfig, method: Method, pattern: Pattern, sparsity: float, scope: str) -> None:
    """Usage errors of --allocation, --permute, --refine and --method keep."""
    if config.allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation {config.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    if config.allocation == "owl":
        if pattern.structured:
            raise UsageError(f"--allocation owl sets one unstructured sparsity per block; it cannot be combined with --pattern {pattern}")
        if not method.supports_owl:
            raise UsageError(f"--allocation owl needs a pruning method (magnitude, wanda, sparsegpt, ria), not {method.name}")
        if scope == "global":
            raise UsageError("--allocation owl gives every block its own sparsity; --scope global ranks the whole model at once (use row or matrix)")
        bound = min(sparsity, 1.0 - sparsity)
        if not 0.0 <= config.owl_lambda <= bound:
            raise UsageError(f"--owl-lambda must be in [0, min(S, 1-S)] = [0, {bound:g}] for --sparsity {sparsity:g}, got {config.owl_lambda:g}")
        if config.owl_m <= 0:
            raise UsageError(f"--owl-m must be positive, got {config.owl_m:g}")
    elif config.owl_lambda != owl.DEFAULT_LAMBDA or config.owl_m != owl.DEFAULT_M:
        raise UsageError("--owl-m/--owl-lambda apply to --allocation owl")
    if config.permute:
        if not pattern.structured:
            raise UsageError("--permute reorders inputs into N:M groups; it needs --pattern N:M")
        if not method.supports_permute:
            raise UsageError(f"--permute chooses a score-based N:M mask (magnitude, wanda, ria); not available for {method.name}")
    if config.refine is not None and config.refine not in REFINEMENTS:
        raise UsageError(f"--refine {config.refine!r} is not one of {', '.join(REFINEMENTS)}")
    if method.keeps_existing and (config.sparsity is not None or pattern.structured or config.allocation != "uniform"):
        raise UsageError("--method keep keeps the input's masks (their pattern and sparsity); drop --sparsity/--pattern/--allocation")
    if config.refine is None and method.keeps_existing:
        raise UsageError("--method keep prunes nothing new; it is for --refine dsnot on an already pruned checkpoint")
    if config.refine is not None:
        if not method.supports_refine:
            raise UsageError("--refine dsnot refines a pruning criterion's mask; random has none")
        if config.refine_skip not in dsnot.SKIPS:
            raise UsageError(f"--refine-skip {config.refine_skip!r} is not one of {', '.join(dsnot.SKIPS)}")
        if config.refine_iters < 1:
            raise UsageError(f"--refine-iters must be at least 1, got {config.refine_iters}")
        if config.refine_threshold < 0:
            raise UsageError(f"--refine-threshold must be 0 or more, got {config.refine_threshold:g}")
        if scope == "global":
            raise UsageError("--refine dsnot refines block by block; --scope global ranks the whole model at once (use row or matrix)")


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
    return ~m.out_in(masks[m.name]).bool()


def _check_carried_masks(model: nn.Module, old: MaskSet | None, names: set[str], pattern: Pattern) -> None:
    """Masks carried over untouched must obey the new pattern, or the output is invalid."""
    if old is None or not pattern.structured:
        return
    transposed = arch.transposed_names(model)
    for name, keep in old.masks.items():
        if name not in names and mask.nm_violations(keep, pattern, transposed=name in transposed, permutation=old.permutations.get(name)):
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
        self.block_seconds: list[dict[str, float]] = []  # per calibrated block: statistics pass, pruning, their phases
        self.clock = PhaseClock()  # SparseGPT's phases (inverse, mask, columns, lazy), summed over the run
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stats: MaskStats = {}  # every final mask's, filled by block_keep
        self.block_sparsity: dict[int, float] = {}  # --allocation owl: each block's target
        self.outlier_ratios: dict[int, float] = {}
        self.permutations: dict[str, torch.Tensor] = {}  # --permute: matrix key -> input order
        self.dense: dict[str, torch.Tensor] | None = None  # --method keep: dense [out, in] weights by key
        self.refine_swaps: dict[str, int] = {}

    def note(self, kind: str, text: str) -> None:
        self.notes.setdefault(kind, []).append(text)

    # --- mask selection and writing

    def sparsity(self, block: int) -> float:
        """The block's target sparsity (uniform, or its OWL allocation)."""
        return self.block_sparsity.get(block, self.p.sparsity)

    def select(self, scores: torch.Tensor, old: torch.Tensor | None, m: Matrix) -> torch.Tensor:
        if self.p.pattern.structured and self.config.permute:
            return self._select_permuted(scores, old, m)
        if self.p.pattern.structured:
            return nm_prune_mask(scores, self.p.pattern.n, self.p.pattern.m, old)
        return prune_mask(scores, self.sparsity(m.block), self.p.scope, old)

    def _select_permuted(self, scores: torch.Tensor, old: torch.Tensor | None, m: Matrix) -> torch.Tensor:
        """N:M in RIA's reallocated input order, returned in the original order."""
        if m.expert is not None:
            raise UsageError("--permute records one input permutation per weight tensor; fused MoE experts are not supported")
        order = channel_permutation(scores, self.p.pattern.m)
        chosen = nm_prune_mask(scores[:, order], self.p.pattern.n, self.p.pattern.m, None if old is None else old[:, order])
        pruned = torch.empty_like(chosen)
        pruned[:, order] = chosen
        self.permutations[m.key] = order.cpu()
        return pruned

    def commit(self, m: Matrix, pruned: torch.Tensor) -> None:
        """Zero the pruned weights in place and remember the mask."""
        with torch.no_grad():
            mask.zero_pruned_(m.weight(), pruned)
        self.pruned[m.key] = pruned.cpu()

    def score_or_select(self, m: Matrix, scores: torch.Tensor) -> None:
        old = _old_pruned(self.old, m)
        if self.p.scope == "global":
            self.global_scores[m.key] = scores.cpu()
        else:
            self.commit(m, self.select(scores, old, m))

    def finish_global(self) -> None:
        if not self.global_scores:
            return
        by_key = {m.key: m for m in self.matrices}
        old = {k: _old_pruned(self.old, by_key[k]) for k in self.global_scores}
        for key, pruned in global_prune_masks(self.global_scores, self.p.sparsity, old).items():
            self.commit(by_key[key], pruned)

    # --- data-free methods

    def prune_data_free(self, m: Matrix) -> None:
        if self.p.method.keeps_existing:
            old = _old_pruned(self.old, m)
            self.commit(m, old if old is not None else torch.zeros(m.shape, dtype=torch.bool))
            return
        if self.p.method.score is not None:
            scores = self.p.method.score(m.weight(), None)
        else:
            scores = random_scores(m.shape, self.generator)
        self.score_or_select(m, scores)

    def step_data_free(self, s: engine.BlockStep) -> None:
        """The data-free methods on block `s.index` (in the matrices' order: the random
        generator draws the same scores in memory and streamed)."""
        for m in self.matrices:
            if m.block == s.index:
                s.status(f"block {s.index}: {m.key}")
                self.prune_data_free(m)
        return None

    # --- calibration methods

    def prune_group(self, group: Group, status: Any) -> None:
        status(f"block {group.matrices[0].block}: {group.label}")
        if self.p.method.statistic is None:  # magnitude or keep, calibrated only for --refine
            for m in group.matrices:
                self.prune_data_free(m)
            return
        if group.stat.tokens == 0:  # an expert the router never chose on this data
            self.note("no_calibration_tokens", f"{group.label}: magnitude fallback")
            for m in group.matrices:
                self.score_or_select(m, magnitude_scores(m.weight()))
            return
        if self.p.method.score is not None:
            for m in group.matrices:
                self.score_or_select(m, self.p.method.score(m.weight(), group.stat))
            return
        with self.clock("inverse"):
            inverse = inverse_hessian(group.stat.take_hessian(), self.config.damp, where=group.label, consume=True)
        if inverse.retries:
            self.note("damping", f"{group.label}: Hessian not positive definite, damp raised to {inverse.damp:g} ({inverse.retries} retries)")
        n, mm = (self.p.pattern.n, self.p.pattern.m) if self.p.pattern.structured else (0, 0)
        scope = self.p.scope if not self.p.pattern.structured else "matrix"
        for m in group.matrices:
            w = m.weight()
            result = prune_matrix(
                w, inverse, self.sparsity(m.block), n, mm, self.config.blocksize, scope, _old_pruned(self.old, m),
                selection=self.config.sparsegpt_selection, clock=self.clock,
            )
            with torch.no_grad():
                w.copy_(result.weight.to(w.dtype))
            self.commit(m, result.pruned)

    def statistic(self, features: int, device: torch.device) -> Any:
        """The method's statistic of one input group; with --refine, plus DSnoT's moments."""
        primary = self.p.method.statistic(features, device) if self.p.method.statistic is not None else None
        if self.config.refine is None:
            return primary
        return dsnot.WithMoments(primary, dsnot.MomentStat(features, device))

    def step(self, s: engine.BlockStep) -> None:
        groups = target_groups(self.model, s.index, self.keys)
        if not groups:
            return None
        before = self.weights_before(groups) if self.config.refine is not None else {}
        s.status(f"block {s.index}: statistics")
        start = time.perf_counter()
        with collecting(self.model, groups, self.statistic, s.device) as stats:
            s.inputs.run(s.block, keep_outputs=False)
        _sync(s.device)
        middle = time.perf_counter()
        clock_before = dict(self.clock.seconds)
        for group in stats:
            self.prune_group(group, s.status)
            if before:
                self.refine_group(group, before, s.status)
        _sync(s.device)
        record = {"statistics": middle - start, "prune": time.perf_counter() - middle,
                  "accumulate": sum(g.stat.seconds for g in stats)}  # inside the statistics pass
        record.update({phase: t - clock_before.get(phase, 0.0) for phase, t in self.clock.seconds.items()})
        self.block_seconds.append({k: round(v, 4) for k, v in record.items()})
        return None

    # --- DSnoT

    def weights_before(self, groups: list[list[Matrix]]) -> dict[str, torch.Tensor]:
        """Each matrix's weights before this step prunes it (copies). With --method keep
        the input is already pruned: its pruned weights get their dense values back (in
        the block too, so that the statistics see the block as before its pruning)."""
        out = {}
        for group in groups:
            for m in group:
                w = m.weight()
                if self.dense is not None:
                    old = _old_pruned(self.old, m)
                    if old is not None:
                        with torch.no_grad():
                            w.copy_(torch.where(old.to(w.device), self.dense[m.key].to(w.device, w.dtype), w))
                out[m.key] = w.detach().clone()
        return out

    def skipped_by_refine(self, m: Matrix) -> bool:
        """The reference's --skip_layer: `mlp` refines only the attention matrices."""
        attention = arch.is_attention(m)
        return (self.config.refine_skip == "mlp" and not attention) or (self.config.refine_skip == "attention" and attention)

    def refine_group(self, group: Group, before: dict[str, torch.Tensor], status: Any) -> None:
        if group.stat.tokens == 0:
            return  # no calibration tokens: nothing to estimate the error from
        moments = group.stat.moments
        n, mm = (self.p.pattern.n, self.p.pattern.m) if self.p.pattern.structured else (0, 0)
        keep_mode = self.p.method.keeps_existing
        for m in group.matrices:
            if self.skipped_by_refine(m):
                continue  # the method's result stands (SparseGPT's updated weights included)
            w = m.weight()
            dense = before[m.key]
            with torch.no_grad():
                w.copy_(dense)  # DSnoT updates no weight: the refined mask applies to these values
            status(f"block {m.block}: dsnot {m.key}")
            frozen = None if keep_mode else _old_pruned(self.old, m)
            pruned = self.pruned[m.key].to(w.device)
            order = self.permutations.get(m.key)
            if order is None and keep_mode and self.old is not None and m.expert is None:
                order = self.old.permutations.get(m.name)  # refine in the input mask's own grouping
            stat = moments
            if order is not None:  # refine in the permuted grouping, map back
                order = order.to(w.device)
                dense, pruned = dense[:, order], pruned[:, order]
                frozen = None if frozen is None else frozen[:, order]
                stat = _permuted_moments(moments, order)
            result = dsnot.refine(dense, pruned, stat, self.config.refine_iters, self.config.refine_threshold, n, mm, frozen)
            new = result.pruned
            if order is not None:
                new = torch.empty_like(new).index_copy_(1, order, new)
            self.refine_swaps[m.key] = result.swaps
            self.commit(m, new)

    # --- assembling the result

    def hand_over(self, index: int, sink: Any) -> None:
        """In memory: block `index`'s final keep-masks (`block_keep`) to `sink` (a
        `PackedMasks`, or the output's `streaming.MaskSpool`), once the block is done."""
        keep = self.block_keep(index)
        done = {m.name for m in self.matrices if m.block == index and m.expert is None}  # zeroed by `commit`
        self._hand(keep, [n for n in keep if n not in done], sink)

    def hand_over_rest(self, sink: Any) -> None:
        """Input masks outside every block (none from perp, which prunes only block
        matrices; possible in a hand-made mask file), carried over as they are."""
        if self.old is None:
            return
        inside = {n for i in range(len(arch.blocks(self.model))) for n in arch.block_names(self.model, self.old.masks, i)}
        rest = self.old.masks.select([n for n in self.old.masks if n not in inside])
        self.stats.update({n: mask.packed_stats(rest.packed(n), rest.shape(n)) for n in rest})
        self._hand(rest, list(rest), sink)

    def _hand(self, keep: mask.PackedMasks, carried: list[str], sink: Any) -> None:
        """Apply the `carried` masks of `keep` (the others were applied as they were
        chosen), verify the model against all of `keep`, as a streamed block is verified
        when it is released, then give them to `sink`."""
        mask.apply(self.model, MaskSet(keep.select(carried)))
        problems = mask_problems(self.model, MaskSet(keep, self.p.pattern, self.permutation_set()))
        if problems:
            raise CheckpointError(f"refusing to write: {problems[0]}")
        for name in keep:
            sink.set_packed(name, keep.packed(name), keep.shape(name))

    def permutation_set(self) -> dict[str, torch.Tensor]:
        """--permute: each mask's input order (by parameter name), with the input's own."""
        out = dict(self.old.permutations) if self.old is not None else {}
        if not self.p.method.keeps_existing:  # a new mask is N:M in the original order unless permuted anew
            for m in self.matrices:
                out.pop(m.name, None)
        by_key = {m.key: m for m in self.matrices}
        out.update({by_key[k].name: order for k, order in self.permutations.items()})
        return out

    def block_keep(self, index: int) -> mask.PackedMasks:
        """The final keep-masks of block `index`'s parameters, as `mask_set` would give
        them; the block's pruned masks are dropped here, so a streamed run holds the
        masks of one block at a time. Records each mask's sparsity in `self.stats`."""
        old = self.old.masks.select(arch.block_names(self.model, self.old.masks, index)) if self.old is not None else mask.PackedMasks()
        matrices = [m for m in self.matrices if m.block == index]
        keep = self._assemble(old, matrices)
        for m in matrices:
            del self.pruned[m.key]
        self.stats.update({n: mask.packed_stats(keep.packed(n), keep.shape(n)) for n in keep})
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
            if ms[0].expert is None and not ms[0].transposed:  # same layout: invert the packed bits
                key = ms[0].key
                keep.set_packed(name, mask.invert_packed(self.pruned.packed(key), self.pruned.numel(key)), self.pruned.shape(key))
                continue
            if ms[0].expert is None:
                keep[name] = ms[0].to_param_layout(~self.pruned[ms[0].key]).contiguous()
                continue
            full = keep[name] if name in keep else torch.ones(ms[0].parameter.shape, dtype=torch.bool)
            for m in ms:
                full[m.expert] = m.to_param_layout(~self.pruned[m.key])
            keep[name] = full
        return keep


def _permuted_moments(stat: dsnot.MomentStat, order: torch.Tensor) -> dsnot.MomentStat:
    out = dsnot.MomentStat(0, stat.sq.device)
    out.sq, out.total, out.between = stat.sq[order], stat.total[order], stat.between[order]
    out.tokens, out.sequences = stat.tokens, stat.sequences
    return out


def _sync(device: torch.device) -> None:
    """Wait for queued device work so per-block timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(ckpt: Checkpoint, config: PruneConfig, streamed: bool) -> tuple[_Plan, "_Pruner", list[str]]:
    """Validate against the checkpoint, choose the matrices, build the run's state."""
    p = plan(config)
    if p.method.keeps_existing:
        if ckpt.masks is None:
            raise UsageError(f"--refine on {ckpt.source}: it has no masks.safetensors (prune it first, or pass a --method)")
        p = _Plan(p.method, ckpt.masks.pattern, p.sparsity, str(ckpt.masks.pattern) if ckpt.masks.pattern.structured else p.scope)
    if ckpt.adapters is not None:
        raise UsageError(f"{ckpt.source} has unmerged adapters; run `perp merge` first, then prune the merged checkpoint")
    if streamed and p.scope == "global":
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
    extensions: dict[str, Any] = {}
    if pruner.block_sparsity:
        extensions["allocation"] = {
            "method": "owl", "m": config.owl_m, "lambda": config.owl_lambda,
            "block_sparsity": {str(b): round(s, 6) for b, s in sorted(pruner.block_sparsity.items())},
            "outlier_ratio": {str(b): round(r, 6) for b, r in sorted(pruner.outlier_ratios.items())},
        }
    if pruner.permutations:
        extensions["permuted"] = sorted({m.name for m in pruner.matrices if m.key in pruner.permutations})
    if config.refine is not None:
        extensions["refine"] = {"method": config.refine, "iters": config.refine_iters, "threshold": config.refine_threshold,
                                "skip": config.refine_skip, "swaps": dict(sorted(pruner.refine_swaps.items()))}
    return {
        "method": p.method.name,
        "pattern": str(p.pattern),
        "scope": p.scope,
        "sparsity_requested": p.sparsity,
        **extensions,
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
        self.p, self.state, self.skipped = _setup(ckpt, config, False)
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


def owl_pass(pruner: "_Pruner", tokens: torch.Tensor, device: torch.device, placement: Any, progress: Any) -> None:
    """OWL's statistics-only pass over the dense model: each block's outlier ratio from
    Wanda scores, then the blocks' sparsities (`_Pruner.block_sparsity`). The engine
    propagates through the unpruned blocks, as the reference's first pass does."""
    config, model = pruner.config, pruner.model
    counts: dict[int, int] = {}

    def step(s: engine.BlockStep) -> None:
        groups = target_groups(model, s.index, pruner.keys)
        if not groups:
            return None
        s.status(f"block {s.index}: outlier ratio")
        with collecting(model, groups, NormStat, s.device) as stats:
            s.inputs.run(s.block, keep_outputs=False)
        # Wanda scores with sqrt(mean x²) as the reference's scaler_row (a scale shared by
        # the block's matrices for dense blocks; per expert for MoE, by its own tokens)
        scores = [
            m.weight().abs().float() * (g.stat.sq / g.stat.tokens).sqrt().float().to(m.weight().device).reshape(1, -1)
            for g in stats if g.stat.tokens for m in g.matrices
        ]
        if scores:
            pruner.outlier_ratios[s.index] = owl.outlier_ratio(scores, config.owl_m)
            counts[s.index] = sum(int(x.numel()) for x in scores)
        return None

    engine.calibrate(model, tokens, step, device=device, batch_size=config.batch_size, offload=placement,
                     progress=progress, description="owl statistics", propagate_last=False)
    blocks = sorted(pruner.outlier_ratios)
    allocated = owl.allocate([pruner.outlier_ratios[b] for b in blocks], [counts[b] for b in blocks], pruner.p.sparsity, config.owl_lambda)
    pruner.block_sparsity = dict(zip(blocks, allocated))


def dense_weights(model: nn.Module, matrices: list[Matrix]) -> dict[str, torch.Tensor]:
    """The `[out, in]` weights of `matrices` (by key) in `model`, a dense checkpoint of the
    same architecture (`--method keep --refine`: the values of the pruned weights)."""
    by_key = {m.key: m for m in arch.matrices(model)}
    out = {}
    for m in matrices:
        other = by_key.get(m.key)
        if other is None or tuple(other.shape) != tuple(m.shape):
            raise UsageError(f"the dense model has no matrix {m.key} of shape {tuple(m.shape)}")
        out[m.key] = other.weight().detach().clone()
    return out


def prune(
    ckpt: Checkpoint, config: PruneConfig, tokens: data.Windows | None = None, dense: nn.Module | None = None,
    blocks: Any = None, spool: Any = None,
) -> PruneOutcome:
    """Prune `ckpt.model` in place and return its masks, results and calibration record.

    `tokens`: the calibration windows (`data.Windows`), needed by calibration methods,
    `--refine` and `--allocation owl`.
    `blocks`: the engine's residency when `ckpt` is streamed (`checkpoint.writing`'s
    `output.blocks`): each block is loaded before its turn and written with its final
    keep-masks once done; the returned `masks` is then None (they are on disk, packed).
    `spool`: the output's `streaming.MaskSpool` (`checkpoint.writing`'s `output.spool`).
    In memory, each block's keep-masks go there as soon as the block is pruned, and the
    returned `masks` is None: the run holds one block's masks, not the model's (1/32 of
    a float32 model). Without it, they are returned. Streamed, the blocks spool them.
    `dense`: the dense model `--method keep --refine` takes the pruned weights' values
    from (required then).
    """
    start = time.time()
    p, pruner, skipped = _setup(ckpt, config, blocks is not None)
    if p.method.keeps_existing:
        if dense is None:
            raise UsageError("--method keep --refine needs the dense model the checkpoint was pruned from (--dense)")
        pruner.dense = dense_weights(dense, pruner.matrices)
    calibrated = p.method.statistic is not None or config.refine is not None or config.allocation == "owl"
    if blocks is not None and calibrated and p.method.statistic is None:
        raise UsageError("--allocation owl and --refine run in memory; use --streaming off")
    device = checkpoint.resolve_device(config.device)
    placement = activations.placement_for(device, config.offload_activations, config.max_memory, config.offload_dir)
    model = ckpt.model
    data_record: dict[str, Any] = {}
    activation_record: dict[str, Any] = {}
    if blocks is not None:  # the streamed blocks are written with the masks this run chooses
        blocks.masks_of, blocks.spool.pattern = pruner.block_keep, p.pattern
    kept = spool if spool is not None and blocks is None else mask.PackedMasks()  # where in-memory masks go
    # in memory, each block's masks are handed over once it is done (`--scope global`:
    # once every block is scored, at the end); streamed, the blocks release them
    per_block = blocks is None and p.scope != "global"
    residency = engine.Residency(load=lambda i, b: None, release=lambda i, b: pruner.hand_over(i, kept)) if per_block else blocks

    with make_progress(config.quiet) as progress:
        if calibrated:
            # find the input groups (one probe forward) while the whole model sits on its home device
            arch.groups_probed(model)
            if tokens is None:
                raise ValueError(f"{p.method.name}: calibration windows are needed (sample them with data.calibration)")
            tokens, data_record = data.calibration_of(tokens)
            if placement.ineffective:
                pruner.note("activations", "--max-memory/--offload-activations change nothing on the CPU (the host is the device); --offload-dir DIR puts activations on disk")
        if config.allocation == "owl":
            owl_pass(pruner, tokens, device, placement, progress)
        if not calibrated or (p.method.statistic is None and config.refine is None):
            engine.run_blocks(model, None, pruner.step_data_free, progress=progress, description=f"{p.method.name} blocks", residency=residency)
        else:
            final = engine.calibrate(
                model, tokens, pruner.step, device=device, batch_size=config.batch_size,
                offload=placement, progress=progress, description=f"{p.method.name} blocks",
                residency=residency, in_place=True,  # the step never keeps s.inputs: one copy of the activations
                propagate_last=False,  # nothing reads the last block's outputs
            )
            activation_record = {"placement": placement.describe(), "peak_device_bytes": final.hidden.peak_device_bytes}
            del final
        pruner.finish_global()

    masks: MaskSet | None = None
    if blocks is None:
        if not per_block:
            for index in range(len(arch.blocks(model))):
                pruner.hand_over(index, kept)
        pruner.hand_over_rest(kept)
        if spool is not None:
            spool.pattern, spool.permutations = p.pattern, pruner.permutation_set()
        else:
            masks = MaskSet(kept, p.pattern, pruner.permutation_set())
    return PruneOutcome(masks, _results(pruner, pruner.stats, skipped, start, device, activation_record), data_record)
