"""`perp inspect DIR`: sparsity per block and matrix, mask consistency, history;
`perp inspect --arch DIR`: the architecture map perp discovered (what it will prune)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from perp_cli import arch, checkpoint
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
    show_arch: Annotated[bool, typer.Option("--arch", help="Print the architecture map perp discovered instead: blocks, prunable matrices with shapes and storage layout, input groups, norms, and what is never pruned and why. Check it before a long run.")] = False,
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
    ckpt = checkpoint.open(model, dtype="auto", device="cpu", allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, verify=False, trust_inputs=trust_inputs)
    if show_arch:
        found = arch.map_report(ckpt.model)
        if json_out:
            emit_json(found)
        if not quiet:
            _render_arch(found)
        return
    report = inspect_checkpoint(ckpt)
    report.problems.extend(ckpt.problems)
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
        targets = report.block_targets()
        table.add_column("block", justify="right")
        table.add_column("sparsity", justify="right")
        if targets:
            table.add_column("target (owl)", justify="right")
        for block, s in report.per_block().items():
            table.add_row(str(block), f"{s:.2%}", *((f"{targets[block]:.2%}" if block in targets else "-",) if targets else ()))
    console.print(table)
    if per_matrix and report.block_targets():
        console.print("target sparsity per block (--allocation owl): " + ", ".join(f"{b}: {s:.2%}" for b, s in report.block_targets().items()))
    if report.permuted:
        console.print(f"{len(report.permuted)} masks are N:M in a permuted input order (perp prune --permute; stored with the masks)")
    verdict = "[green]consistent[/]" if report.consistent else "[red]INCONSISTENT[/]"
    console.print(f"weights vs masks: {verdict}")
    if report.history:
        console.print("history: " + " → ".join(str(h.get("command")) for h in report.history))


def _render_arch(found: dict) -> None:
    blocks = found["blocks"]
    console.print(
        f"{found['class']} ({found['model_type']}) · {blocks['count']} blocks at {blocks['path']} ({', '.join(blocks['classes'])}) · "
        f"{found['prunable_matrices']} prunable matrices, {found['prunable_parameters']:,} weights",
        highlight=False,
    )
    table = Table(title="prunable matrices (per block)")
    for col in ("matrix", "stored shape", "[out, in]", "layout", "blocks"):
        table.add_column(escape(col))
    for local, info in found["matrices"].items():
        in_blocks = [str(layout["blocks"][0]) + ("" if len(layout["blocks"]) == 1 else f"-{layout['blocks'][-1]}")
                     for layout in found["block_layouts"] if local in layout["matrices"]]
        experts = f" x{info['experts']} experts" if info["experts"] else ""
        table.add_row(local, "x".join(map(str, info["shape"])), "x".join(map(str, info["out_in"])), escape(info["layout"] + experts), ",".join(in_blocks))
    console.print(table)
    console.print(f"input groups ({found['groups_from']}):", highlight=False)
    for block, groups in found["input_groups"].items():
        shown = [g for g in groups if "[" not in g[0] or g[0].endswith("[0]")]
        console.print(escape(f"  block {block}: " + " | ".join(", ".join(g) for g in shown)), highlight=False)
    console.print("norms (--train norms): " + ", ".join(found["norms"]) + f"; final: {found['final_norm']}", highlight=False)
    console.print("never pruned:", highlight=False)
    for name, why in found["excluded"].items():
        console.print(escape(f"  {name}: {why}"), highlight=False)
    if found["overrides"]:
        console.print(escape(f"overrides (documented exceptions in perp_cli/arch.py): {found['overrides']}"), highlight=False)
