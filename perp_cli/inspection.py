"""What `perp inspect` reports: sparsity per block and matrix, and whether the weights
really obey their masks.

Sparsity is measured from the weights (exact zeros), and, where a mask exists, the mask's
own sparsity is reported beside it. A checkpoint is consistent when every masked weight
is exactly zero and every N:M group holds at most N kept weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perp_cli import arch
from perp_cli.checkpoint import Checkpoint
from perp_cli.mask import MaskSet, Pattern, nm_violations, nonzeros_outside


@dataclass
class MatrixReport:
    name: str
    block: int
    shape: tuple[int, ...]
    zero_fraction: float
    mask_sparsity: float | None
    masked_nonzeros: int
    nm_violations: int

    @property
    def consistent(self) -> bool:
        return self.masked_nonzeros == 0 and self.nm_violations == 0


@dataclass
class Report:
    model_type: str
    model_class: str
    pattern: str
    has_masks: bool
    matrices: list[MatrixReport]
    history: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    permuted: list[str] = field(default_factory=list)  # masks whose N:M groups run in a permuted input order

    @property
    def consistent(self) -> bool:
        return not self.problems and all(m.consistent for m in self.matrices)

    @property
    def total_sparsity(self) -> float:
        total = sum(math.prod(m.shape) for m in self.matrices)
        zeros = sum(m.zero_fraction * math.prod(m.shape) for m in self.matrices)
        return zeros / total if total else 0.0

    def per_block(self) -> dict[int, float]:
        out: dict[int, tuple[float, int]] = {}
        for m in self.matrices:
            zeros, total = out.get(m.block, (0.0, 0))
            out[m.block] = (zeros + m.zero_fraction * math.prod(m.shape), total + math.prod(m.shape))
        return {b: z / t for b, (z, t) in sorted(out.items())}

    def block_targets(self) -> dict[int, float]:
        """Each block's target sparsity when the last prune step allocated them
        (`--allocation owl`, recorded in perp.json), else {}."""
        for step in reversed(self.history):
            if step.get("command") == "prune":
                found = (step.get("results") or {}).get("allocation", {}).get("block_sparsity", {})
                return {int(b): float(s) for b, s in found.items()}
        return {}

    def to_json(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "class": self.model_class,
            "pattern": self.pattern,
            "has_masks": self.has_masks,
            "consistent": self.consistent,
            "total_sparsity": self.total_sparsity,
            "per_block_sparsity": {str(k): v for k, v in self.per_block().items()},
            "per_block_target_sparsity": {str(k): v for k, v in self.block_targets().items()},
            "permuted_masks": sorted(self.permuted),
            "matrices": [
                {
                    "name": m.name,
                    "block": m.block,
                    "shape": list(m.shape),
                    "sparsity": m.zero_fraction,
                    "mask_sparsity": m.mask_sparsity,
                    "masked_nonzeros": m.masked_nonzeros,
                    "nm_violations": m.nm_violations,
                }
                for m in self.matrices
            ],
            "problems": self.problems,
            "history": [
                {k: h.get(k) for k in ("command", "args", "wall_time_s", "started")} for h in self.history
            ],
        }


def _tensor_names(model: nn.Module) -> dict[str, tuple[int, nn.Parameter]]:
    """Each prunable parameter once (fused experts are one 3-D tensor), with its block."""
    out: dict[str, tuple[int, nn.Parameter]] = {}
    for m in arch.matrices(model):
        out.setdefault(m.name, (m.block, m.parameter))
    return out


def inspect_checkpoint(ckpt: Checkpoint) -> Report:
    model = ckpt.model
    spec = arch.spec_for(model)
    masks = ckpt.masks or MaskSet()
    transposed = arch.transposed_names(model)
    params = dict(model.named_parameters())
    problems = [f"mask {n} names no prunable parameter" for n in masks.names() if n not in params]
    reports = []
    for name, (block, p) in _tensor_names(model).items():
        w = p.detach()
        keep = masks.masks.get(name)
        if keep is not None and tuple(keep.shape) != tuple(w.shape):
            problems.append(f"mask {name} has shape {tuple(keep.shape)}, the weight {tuple(w.shape)}")
            keep = None
        reports.append(
            MatrixReport(
                name=name,
                block=block,
                shape=tuple(w.shape),
                zero_fraction=float((w == 0).float().mean()),
                mask_sparsity=None if keep is None else 1.0 - float(keep.float().mean()),
                masked_nonzeros=0 if keep is None else nonzeros_outside(w, keep),
                nm_violations=_nm_check(w, keep, masks.pattern, name in transposed, masks.permutations.get(name)),
            )
        )
    return Report(
        model_type=spec.model_type,
        model_class=type(model).__name__,
        pattern=str(masks.pattern) if ckpt.masks is not None else "dense",
        has_masks=ckpt.masks is not None,
        matrices=reports,
        history=list(ckpt.manifest.get("history", [])),
        problems=problems,
        permuted=sorted(masks.permutations),
    )


def _nm_check(weight: torch.Tensor, keep: torch.Tensor | None, pattern: Pattern, transposed: bool,
              permutation: torch.Tensor | None = None) -> int:
    """N:M violations, judged on the mask and on the weights' own nonzeros (in the
    mask's permuted input order when it has one)."""
    if not pattern.structured:
        return 0
    nonzero = weight != 0
    bad = nm_violations(nonzero, pattern, transposed, permutation)
    if keep is not None:
        bad = max(bad, nm_violations(keep, pattern, transposed, permutation)) if bad >= 0 else bad
    return abs(bad)


def expectation_failures(report: Report, sparsity: float | None, tolerance: float, pattern: str | None) -> list[str]:
    """Why `--expect-sparsity` / `--expect-pattern` fail, if they do."""
    failures = []
    if sparsity is not None and abs(report.total_sparsity - sparsity) > tolerance:
        failures.append(f"sparsity {report.total_sparsity:.4f} is not {sparsity} ± {tolerance}")
    if pattern is not None:
        wanted = Pattern.parse(pattern)
        if str(wanted) != report.pattern:
            failures.append(f"pattern is {report.pattern}, expected {wanted}")
        elif wanted.structured and any(m.nm_violations for m in report.matrices):
            failures.append(f"some groups break {wanted}")
    return failures
