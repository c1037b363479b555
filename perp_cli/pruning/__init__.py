"""Pruning methods: a method is "collect statistics while the block runs" plus
"compress the block at its end".

* `magnitude`, `random`: scores from the weights alone, no calibration data;
* `wanda`: scores |W|·‖X‖₂ from per-group input norms (`statistics.NormStat`);
* `sparsegpt`: mask and OBS weight update from per-group Hessians
  (`statistics.HessianStat`).

Masks are chosen from scores by `selection`; the block-sequential pass is
`perp_cli.engine`; the whole command is `perp_cli.pruner.prune`.
"""

from __future__ import annotations

from dataclasses import dataclass

from perp_cli.pruning.statistics import HessianStat, NormStat


@dataclass(frozen=True)
class Method:
    """What a method needs (`statistic`: None, NormStat or HessianStat) and which
    comparison groups (`scopes`) it supports for unstructured masks."""

    name: str
    statistic: type | None
    default_scope: str
    scopes: tuple[str, ...]
    summary: str


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, "matrix", ("row", "matrix", "global"), "|W|, no data"),
    "random": Method("random", None, "matrix", ("row", "matrix", "global"), "uniform random scores"),
    "wanda": Method("wanda", NormStat, "row", ("row", "matrix", "global"), "|W|·‖X‖₂ from calibration"),
    "sparsegpt": Method("sparsegpt", HessianStat, "matrix", ("row", "matrix"), "OBS updates from the Hessian"),
}
