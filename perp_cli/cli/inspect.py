"""`perp inspect DIR`: sparsity per block and matrix, mask consistency, history."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from perp_cli import checkpoint
from perp_cli.cli.common import AllowPickleOpt, JsonOpt, ModelArg, QuietOpt, TrustInputsOpt, TrustRemoteCodeOpt, emit_json
from perp_cli.errors import InconsistentCheckpoint
from perp_cli.inspection import Report, expectation_failures, inspect_checkpoint
from perp_cli.progress import console


def inspect(
    model: ModelArg,
    expect_sparsity: Annotated[
        float | None, typer.Option("--expect-sparsity", help="Fail (exit 3) unless total sparsity is this, within --tolerance.")
    ] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Tolerance for --expect-sparsity.")] = 0.005,
    expect_pattern: Annotated[
        str | None, typer.Option("--expect-pattern", help="Fail (exit 3) unless the masks have this pattern (unstructured or N:M) and every group obeys it.")
    ] = None,
    per_matrix: Annotated[bool, typer.Option("--per-matrix/--per-block", help="Show every matrix, or one row per block.")] = True,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    trust_inputs: TrustInputsOpt = False,
) -> None:
    """Report sparsity and check that every masked weight is exactly zero.

    Exit 0 when weights and masks agree (and expectations hold); exit 3 when a masked
    weight is nonzero, an N:M group holds too many weights, or an --expect-* fails.
    """
    ckpt = checkpoint.load(model, dtype="auto", device="cpu", allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, verify=False, trust_inputs=trust_inputs)
    report = inspect_checkpoint(ckpt)
    report.problems.extend(ckpt.extra.get("problems", []))
    failures = expectation_failures(report, expect_sparsity, tolerance, expect_pattern)
    if json_out:
        emit_json({**report.to_json(), "expectation_failures": failures})
    if not quiet:
        _render(report, per_matrix)
    if not report.consistent:
        # a named tensor first: it says more than a hash that differs
        first = next((
            f"{m.name}: {m.masked_nonzeros} nonzero masked weights, {m.nm_violations} bad N:M groups"
            for m in report.matrices if not m.consistent
        ), None) or report.problems[0]
        raise InconsistentCheckpoint(f"{model} is inconsistent: {first}")
    if failures:
        raise InconsistentCheckpoint("; ".join(failures))


def _render(report: Report, per_matrix: bool) -> None:
    title = f"{report.model_class} ({report.model_type}) · pattern {report.pattern} · total sparsity {report.total_sparsity:.2%}"
    console.print(title, highlight=False)
    table = Table()
    if per_matrix:
        for col in ("block", "matrix", "shape", "sparsity", "mask", "masked = 0", "N:M ok"):
            table.add_column(col, justify="right" if col in ("block", "sparsity", "mask") else "left")
        for m in report.matrices:
            table.add_row(
                str(m.block),
                m.name.split(f".{m.block}.", 1)[-1],
                "x".join(map(str, m.shape)),
                f"{m.zero_fraction:.2%}",
                "-" if m.mask_sparsity is None else f"{m.mask_sparsity:.2%}",
                "yes" if m.masked_nonzeros == 0 else f"NO ({m.masked_nonzeros})",
                "-" if report.pattern in ("dense", "unstructured") else ("yes" if m.nm_violations == 0 else f"NO ({m.nm_violations})"),
            )
    else:
        table.add_column("block", justify="right")
        table.add_column("sparsity", justify="right")
        for block, s in report.per_block().items():
            table.add_row(str(block), f"{s:.2%}")
    console.print(table)
    verdict = "[green]consistent[/]" if report.consistent else "[red]INCONSISTENT[/]"
    console.print(f"weights vs masks: {verdict}")
    if report.history:
        console.print("history: " + " → ".join(str(h.get("command")) for h in report.history))
