"""Fold retrained adapters into the weights without losing sparsity, and prove it.

Per tensor (only one weight tensor and its adapter are touched at a time):

* masklora   W <- W + s·(M ⊙ BA)
* scalelora  W <- W ⊙ BA
* lora-prune W <- W + M ⊙ (s·BA)
* lora       W <- W + s·BA, which fills pruned positions: refused on a masked matrix
             unless `allow_densify`, and then the masks are dropped (they no longer hold).

Before anything is written, two checks: every tensor keeps exactly its mask (no new
nonzero), and the merged model's logits on a fixed probe batch match the unmerged
model's (adapters attached) to float tolerance. A merge that changes the function or
the sparsity is a bug, and a bug must not reach disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from perp_cli import adapters as adapters_mod
from perp_cli import arch
from perp_cli.checkpoint import mask_problems
from perp_cli.errors import CheckpointError, NumericalError, UsageError
from perp_cli.mask import MaskSet

# max |merged - unmerged| / max |unmerged logits| allowed, by weight dtype
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 5e-3}
PROBE_SEED = 1234


@dataclass
class MergeReport:
    kind: str
    tensors: int
    max_abs_diff: float
    max_abs_logit: float
    relative_diff: float
    tolerance: float
    masks_kept: bool
    densified_density: float | None

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
        }


def probe_batch(model: nn.Module, batch: int = 2, seqlen: int = 64, seed: int = PROBE_SEED) -> torch.Tensor:
    """Fixed random token ids (no data needed: the check compares two models' logits)."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or seqlen
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, min(seqlen, positions)), generator=gen)
    return ids.to(next(model.parameters()).device)


def densifying_keys(adapters: dict[str, adapters_mod.Adapter]) -> list[str]:
    """Adapters whose merge would put nonzeros at pruned positions (plain LoRA on a mask)."""
    return [k for k, a in adapters.items() if a.kind == "lora" and a.mask is not None and not bool(a.mask.all())]


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
        raise UsageError(
            f"plain LoRA merges densely: it would fill the pruned weights of {len(dense_keys)} matrices "
            "(e.g. " + dense_keys[0] + "); pass --allow-densify to merge anyway (the masks are dropped), "
            "or retrain with --adapter masklora/scalelora/lora-prune"
        )
    model.eval()
    ids = probe_batch(model, seed=seed)
    before = _logits(model, ids)
    for matrix, adapter in entries.values():
        adapter.merge(matrix, allow_densify=bool(dense_keys))
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
    density = None
    if dense_keys:
        by_key = {m.key: m for m in arch.matrices(model)}
        ws = [by_key[k].weight() for k in entries]
        density = sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    return MergeReport(kind, len(entries), diff, scale, rel, tol, masks_kept, density)


def merge_checkpoint(ckpt: Any, allow_densify: bool = False, seed: int = PROBE_SEED) -> MergeReport:
    """Re-attach `ckpt`'s saved adapters and merge them into `ckpt.model` (see module doc)."""
    if ckpt.adapters_config is None:
        raise UsageError(f"{ckpt.source} has no adapters.safetensors/adapters.json: nothing to merge")
    adapters_mod.attach_from_checkpoint(ckpt)
    try:
        return merge_attached(ckpt.model, ckpt.masks, allow_densify, seed=seed)
    finally:
        adapters_mod.detach(ckpt.model)
