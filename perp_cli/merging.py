"""Fold retrained adapters into the weights without losing sparsity, and prove it.

Per tensor (only one weight tensor and its adapter are touched at a time):

* masklora   W <- W + s·(M ⊙ BA)
* scalelora  W <- W ⊙ BA
* lora-prune W <- W + M ⊙ (s·BA)
* lora       W <- W + s·BA, which fills pruned positions: refused on a masked matrix
             unless `allow_densify`, and then the masks are dropped (they no longer hold).

Before anything is written, three checks: every tensor keeps exactly its mask (no new
nonzero); each merged matrix computes what the unmerged pair computed (`merge_matrix`:
W'x against a float64 Wx + Δx on a few fixed random vectors); and the merged model's
logits on a fixed probe batch match the unmerged model's (adapters attached) to float
tolerance. A merge that changes the function or the sparsity is a bug, and a bug must
not reach disk.

`merge_streamed` (`merge` with a streamed checkpoint's blocks) does the same merge one decoder block at a time (`perp merge
--streaming`): block i's weights, masks and adapters are read from the input for its
turn only, merged by the same arithmetic (the output is bit for bit the in-memory one),
checked and written at once. The logits probe needs the whole model, so a streamed merge
cannot run it; the per-matrix probe (its block-local form: every merged matrix computes
what W + Δ computes) and the mask and finiteness checks run on every matrix, and the
manifest says which checks ran and which did not (`checks`, `checks_skipped`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perp_cli import adapters as adapters_mod
from perp_cli import arch
from perp_cli.checkpoint import mask_problems
from perp_cli.errors import CheckpointError, NumericalError, UsageError
from perp_cli.mask import MaskSet

# max |merged - unmerged| / max |unmerged| allowed (logits, or one matrix's outputs), by weight dtype
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 5e-3}
PROBE_SEED = 1234
PROBE_VECTORS = 4  # random inputs per matrix in the per-matrix check
_PROBE_CHUNK = 1 << 19  # float64 elements per row chunk of that check (4 MiB): its only temporary

# What each check verifies (reported in --json and the manifest as `checks`).
CHECKS = {
    "finite": "every merged weight is finite",
    "masks": "no weight is nonzero where the mask says pruned",
    "matrix_probe": "each merged matrix W' gives W'x = Wx + Δx (float64 reference) on fixed random vectors",
    "logits_probe": "the merged model's logits on a fixed probe batch equal the unmerged model's",
}


@dataclass
class MergeReport:
    """What a merge did and which checks it passed. `max_abs_diff`, `max_abs_logit` and
    `relative_diff` describe the logits probe, None when it did not run (streaming)."""

    kind: str
    tensors: int
    max_abs_diff: float | None
    max_abs_logit: float | None
    relative_diff: float | None
    tolerance: float
    masks_kept: bool
    densified_density: float | None
    matrix_relative_diff: float = 0.0
    checks: tuple[str, ...] = ()
    checks_skipped: dict[str, str] = field(default_factory=dict)  # check -> why it could not run

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.kind,
            "merged_tensors": self.tensors,
            "probe_max_abs_diff": self.max_abs_diff,
            "probe_max_abs_logit": self.max_abs_logit,
            "probe_relative_diff": self.relative_diff,
            "tolerance": self.tolerance,
            "masks_kept": self.masks_kept,
            "densified_density": self.densified_density,
            "matrix_probe_max_relative_diff": self.matrix_relative_diff,
            "checks": list(self.checks),
        }

    def results(self) -> dict[str, Any]:
        """The step's `results` in the manifest."""
        return {**self.to_json(), "checks_skipped": self.checks_skipped} if self.checks_skipped else self.to_json()


def probe_batch(model: nn.Module, batch: int = 2, seqlen: int = 64, seed: int = PROBE_SEED) -> torch.Tensor:
    """Fixed random token ids (no data needed: the check compares two models' logits)."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or seqlen
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, min(seqlen, positions)), generator=gen)
    return ids.to(next(model.parameters()).device)


def densifying_keys(adapters: dict[str, adapters_mod.Adapter]) -> list[str]:
    """Adapters whose merge would put nonzeros at pruned positions (plain LoRA on a mask)."""
    return [k for k, a in adapters.items() if a.variant.densifies and a.mask is not None and not bool(a.mask.all())]


def _refuse_densify(dense_keys: list[str]) -> UsageError:
    return UsageError(
        f"plain LoRA merges densely: it would fill the pruned weights of {len(dense_keys)} matrices "
        "(e.g. " + dense_keys[0] + "); pass --allow-densify to merge anyway (the masks are dropped), "
        "or retrain with --adapter masklora/scalelora/lora-prune"
    )


def _row_chunks(w: torch.Tensor) -> range:
    return range(0, w.shape[0], max(1, _PROBE_CHUNK // max(1, w.shape[1])))


def _reference_outputs(w: torch.Tensor, adapter: adapters_mod.Adapter, x: torch.Tensor) -> torch.Tensor:
    """(W + Δ) x in float64, Δ as the adapter defines it in eval mode, written out
    independently of the variant's `forward` (`reference`) and built a row chunk at a time (one
    float64 temporary of `_PROBE_CHUNK` elements: a streamed merge's peak is one block)."""
    a, b = adapter.lora_A.double(), adapter.lora_B.double()
    # the mask unpacked once (merge holds masks packed)
    keep = adapter.mask if adapter.variant.masked(adapter, training=False) else None
    rows = _row_chunks(w).step
    parts = []
    for r in _row_chunks(w):
        rows_keep = None if keep is None else keep[r : r + rows]
        effective = adapter.variant.reference(b[r : r + rows] @ a, w[r : r + rows], adapter.scale, rows_keep)
        parts.append(effective @ x)
    return torch.cat(parts)


def _outputs(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rows = _row_chunks(w).step
    return torch.cat([w[r : r + rows].double() @ x for r in _row_chunks(w)])


@torch.no_grad()
def merge_matrix(matrix: arch.Matrix, adapter: adapters_mod.Adapter, allow_densify: bool = False, seed: int = PROBE_SEED) -> float:
    """Merge one adapter into its matrix (`Adapter.merge`: finite, no nonzero outside the
    mask unless `allow_densify`) and check the merged matrix computes what the unmerged
    pair computed: W'x against a float64 (W + Δ)x on `PROBE_VECTORS` fixed random
    vectors. Returns max |W'x - (W+Δ)x| / max |(W+Δ)x|.

    The per-matrix analogue of the logits probe, and the only functional check that fits
    in one block: it catches a merge written to the wrong slice or layout, a wrong scale
    or mask, or precision lost beyond the weight dtype's rounding (`TOLERANCE`).
    """
    w = matrix.weight()
    # drawn on the CPU (the same vectors on every device), then moved to the weight's device
    x = torch.randn(w.shape[1], PROBE_VECTORS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(w.device)
    expected = _reference_outputs(w, adapter, x)
    adapter.merge(matrix, allow_densify=allow_densify)
    got = _outputs(matrix.weight(), x)
    diff, scale = float((got - expected).abs().max()), float(expected.abs().max())
    rel = diff / max(scale, 1e-12)
    tol = TOLERANCE.get(w.dtype, 1e-4)
    if not rel <= tol:  # also catches NaN
        raise NumericalError(
            f"merged {matrix.key} does not compute what W + Δ computes (relative difference {rel:.3g} > {tol:g}); nothing was written"
        )
    return rel


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def merge_attached(model: nn.Module, masks: MaskSet | None, allow_densify: bool = False, seed: int = PROBE_SEED) -> MergeReport:
    """Merge every adapter attached to `model` in place, verify, and detach them.

    On a failed check the exception propagates; the caller must not save `model` then.
    """
    entries = adapters_mod.attached_matrices(model)
    if not entries:
        raise UsageError("the model has no adapters to merge")
    kinds = {a.kind for _, a in entries.values()}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    dense_keys = densifying_keys({k: a for k, (_, a) in entries.items()})
    if dense_keys and not allow_densify:
        raise _refuse_densify(dense_keys)
    model.eval()
    ids = probe_batch(model, seed=seed)
    before = _logits(model, ids)
    totals = merge_blocks(model, lambda index: [e for e in entries.values() if e[0].block == index], bool(dense_keys), seed)
    adapters_mod.detach(model)
    after = _logits(model, ids)
    diff = float((after - before).abs().max())
    scale = float(before.abs().max())
    dtype = entries[next(iter(entries))][0].parameter.dtype
    tol = TOLERANCE.get(dtype, 1e-4)
    rel = diff / max(scale, 1e-12)
    if not torch.isfinite(after).all() or rel > tol:
        raise NumericalError(
            f"merged logits differ from the unmerged model's by {diff:.3g} (relative {rel:.3g} > {tol:g}); nothing was written"
        )
    masks_kept = masks is not None and not dense_keys
    if masks_kept:
        problems = mask_problems(model, masks)
        if problems:
            raise CheckpointError(f"merge broke the masks: {problems[0]}; nothing was written")
    density = totals["nonzero"] / totals["numel"] if dense_keys else None
    checks = ("finite",) + (("masks",) if masks_kept else ()) + ("matrix_probe", "logits_probe")
    return MergeReport(kind, len(entries), diff, scale, rel, tol, masks_kept, density, totals["rel"], checks)


def merge_blocks(model: nn.Module, adapters_of: Any, densify: bool, seed: int = PROBE_SEED,
                 residency: Any = None, progress: Any = None) -> dict[str, Any]:
    """The one merge loop, block by block through the engine (data-free): block i's
    (matrix, adapter) pairs (`adapters_of(i)`) merged by `merge_matrix`. Returns how many
    were merged, the largest per-matrix probe difference and, with `densify`, the merged
    matrices' nonzero and total counts."""
    from perp_cli import engine

    totals = {"merged": 0, "rel": 0.0, "nonzero": 0, "numel": 0}

    def step(s: Any) -> None:
        pairs = adapters_of(s.index)
        s.status(f"block {s.index}: merging {len(pairs)} adapters")
        for m, adapter in pairs:
            totals["rel"] = max(totals["rel"], merge_matrix(m, adapter, allow_densify=densify, seed=seed))
            totals["merged"] += 1
            if densify:
                w = m.weight()
                totals["nonzero"] += int((w != 0).sum())
                totals["numel"] += w.numel()

    engine.run_blocks(model, None, step, progress=progress, description="merging blocks", residency=residency)
    return totals


def merge_checkpoint(ckpt: Any, allow_densify: bool = False, seed: int = PROBE_SEED) -> MergeReport:
    """Re-attach `ckpt`'s saved adapters and merge them into `ckpt.model` (see module doc)."""
    if ckpt.adapters_config is None:
        raise UsageError(f"{ckpt.source} has no adapters.safetensors/adapters.json: nothing to merge")
    # each mask is used a few times, one matrix at a time: read from the checkpoint's packed masks, no copy of any
    adapters_mod.attach_from_checkpoint(ckpt, share_masks=True)
    try:
        return merge_attached(ckpt.model, ckpt.masks, allow_densify, seed=seed)
    finally:
        adapters_mod.detach(ckpt.model)


# ----------------------------------------------------------------------------- streamed


def _streamed_densifying_keys(kind: str, chosen: dict[str, arch.Matrix], mask_reader: Any) -> list[str]:
    """`densifying_keys` without the adapters in memory: one mask read at a time."""
    if not adapters_mod.VARIANTS[kind].densifies or mask_reader is None:
        return []
    out = []
    by_name: dict[str, list[str]] = {}
    for key, m in chosen.items():
        if m.name in mask_reader.stored:
            by_name.setdefault(m.name, []).append(key)
    for name, keys in by_name.items():
        masks = MaskSet(mask_reader.read([name]))
        out += [k for k in keys if not bool(adapters_mod.matrix_mask(chosen[k], masks).all())]
    return out


def merge(ckpt: Any, allow_densify: bool = False, seed: int = PROBE_SEED, blocks: Any = None,
          progress: Any = None) -> MergeReport:
    """Merge `ckpt`'s saved adapters, in memory (`merge_checkpoint`) or, with `blocks` (the
    output's `streaming.StreamedBlocks` of a streamed `ckpt`), one block at a time
    (`merge_streamed`). The masks to write are `ckpt.masks` if `report.masks_kept`."""
    if blocks is None:
        return merge_checkpoint(ckpt, allow_densify=allow_densify, seed=seed)
    return merge_streamed(ckpt, blocks, allow_densify=allow_densify, seed=seed, progress=progress)


def merge_streamed(ckpt: Any, blocks: Any, allow_densify: bool = False, seed: int = PROBE_SEED,
                   progress: Any = None) -> MergeReport:
    """Merge the adapters of the streamed checkpoint `ckpt` one block at a time, each block
    written by `blocks` (the output's residency) as soon as it is merged.

    `ckpt` comes from `checkpoint.open(source, streamed=True, lazy_masks=True,
    lazy_adapters=True)`. Block i's weights, masks and adapters are read just before its
    turn, each adapter is built and merged exactly as `merge_checkpoint` does it
    (`Adapter.merge` via `merge_matrix`: the same tensors, bit for bit), the block is
    verified (finite, masks) and written, then freed. The logits probe cannot run (it
    needs the whole model); `report.checks_skipped` says so. Errors are the in-memory
    merge's, raised before anything is written.
    """
    reader = ckpt.adapter_reader
    if ckpt.adapters_config is None or reader is None:
        raise UsageError(f"{ckpt.source} has no adapters.safetensors/adapters.json: nothing to merge")
    model = ckpt.model
    kind, rank, alpha, chosen = adapters_mod.saved_matrices(model, ckpt.adapters_config, reader.shape, ckpt.masks is not None)
    if not chosen:
        raise UsageError("the model has no adapters to merge")
    dense_keys = _streamed_densifying_keys(kind, chosen, ckpt.mask_reader)
    if dense_keys and not allow_densify:
        raise _refuse_densify(dense_keys)
    masks_kept = ckpt.masks is not None and not dense_keys
    if not masks_kept:
        blocks.masks_of = lambda index: {}  # the masks no longer hold: blocks are written without any
    tol = TOLERANCE.get(model.dtype, 1e-4)

    def saved_adapters(index: int) -> list[tuple[arch.Matrix, adapters_mod.Adapter]]:
        """Block `index`'s adapters, read and built as `merge_checkpoint` attaches them."""
        mine = [m for m in arch.block_matrices(model, index) if m.key in chosen]
        tensors = reader.read([f"{m.key}.lora_{ab}" for m in mine for ab in "AB"])
        return [(m, adapters_mod.saved_adapter(kind, m, rank, alpha, ckpt.masks, tensors)) for m in mine]

    totals = merge_blocks(model, saved_adapters, bool(dense_keys), seed, residency=blocks, progress=progress)
    if totals["merged"] != len(chosen):
        raise CheckpointError(f"internal: merged {totals['merged']} of {len(chosen)} adapters")
    density = totals["nonzero"] / totals["numel"] if dense_keys else None
    checks = ("finite",) + (("masks",) if masks_kept else ()) + ("matrix_probe",)
    return MergeReport(kind, totals["merged"], None, None, None, tol, masks_kept, density, totals["rel"], checks,
                       {"logits_probe": "streaming holds one block at a time; the whole-model forward cannot run"})
