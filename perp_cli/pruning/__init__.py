"""Pruning methods: a method is "collect statistics while the block runs" plus
"compress the block at its end".

* `magnitude`, `random`: scores from the weights alone, no calibration data;
* `wanda`: scores |W|·‖X‖₂ from per-group input norms (`statistics.NormStat`);
* `sparsegpt`: mask and OBS weight update from per-group Hessians
  (`statistics.HessianStat`);
* `ria`: relative importance times ‖X‖₂^0.5 (`ria`), from the same norms as Wanda;
* `keep`: no new pruning, the input's masks as they are (for `--refine dsnot` on an
  already pruned checkpoint).

A score-based method has a `score(weight, stat)`; the pruner dispatches through it.
Layer-wise sparsity (`owl`) and mask refinement (`dsnot`) work with any of them.

Masks are chosen from scores by `selection`; the block-sequential pass is
`perp_cli.engine`; the whole command is `perp_cli.pruner.prune`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from perp_cli.pruning.magnitude import magnitude_scores
from perp_cli.pruning.ria import ria_scores
from perp_cli.pruning.statistics import HessianStat, NormStat
from perp_cli.pruning.wanda import wanda_scores

Score = Callable[[torch.Tensor, Any], torch.Tensor]  # (weight [out, in], the group's statistic) -> scores


@dataclass(frozen=True)
class Method:
    """What a method needs (`statistic`: None, NormStat or HessianStat), which
    comparison groups (`scopes`) it supports for unstructured masks, and which of the
    planner's options it combines with (the pruner reads these, never the name)."""

    name: str
    statistic: type | None
    default_scope: str
    scopes: tuple[str, ...]
    summary: str
    score: Score | None = None  # None: the method has its own path (random, sparsegpt, keep)
    supports_owl: bool = True  # --allocation owl: per-block sparsities for its criterion (random and keep have none)
    supports_refine: bool = True  # --refine dsnot: its mask can be refined (random has no criterion)
    supports_permute: bool = False  # --permute: its N:M mask is chosen from scores, so inputs may be reordered
    blockwise: bool = False  # works in column blocks (--blocksize must be a multiple of M for N:M)
    keeps_existing: bool = False  # prunes nothing new: the input's masks as they are (keep)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, "matrix", ("row", "matrix", "global"), "|W|, no data",
                        lambda w, stat: magnitude_scores(w), supports_permute=True),
    "random": Method("random", None, "matrix", ("row", "matrix", "global"), "uniform random scores",
                     supports_owl=False, supports_refine=False, supports_permute=True),
    "wanda": Method("wanda", NormStat, "row", ("row", "matrix", "global"), "|W|·‖X‖₂ from calibration",
                    lambda w, stat: wanda_scores(w, stat.norms()), supports_permute=True),
    "sparsegpt": Method("sparsegpt", HessianStat, "matrix", ("row", "matrix"), "OBS updates from the Hessian", blockwise=True),
    "ria": Method("ria", NormStat, "matrix", ("row", "matrix", "global"), "(|W|/Σrow + |W|/Σcol)·‖X‖₂^0.5",
                  lambda w, stat: ria_scores(w, stat.norms()), supports_permute=True),
    "keep": Method("keep", None, "matrix", ("matrix",), "the input's masks unchanged (with --refine)",
                   supports_owl=False, keeps_existing=True),
}
