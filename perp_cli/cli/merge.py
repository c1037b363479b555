"""`perp merge IN -o OUT`: fold retrained adapters into the weights, keeping the masks."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from perp_cli.cli.common import DeviceOpt, DtypeOpt, MaxShardSizeOpt, ModelArg, OutputOpt, SeedOpt, Writing, emit_json, writes_checkpoint
from perp_cli.progress import Reporter, console
from perp_cli.recipes import merge as recipe


@writes_checkpoint
def merge_cmd(
    model: ModelArg,
    output: OutputOpt,
    allow_densify: Annotated[bool, typer.Option("--allow-densify", help="Merge plain LoRA adapters into pruned matrices densely: the pruned weights fill in, no masks are written, and the resulting density is reported.")] = False,
    streaming_mode: Annotated[str, typer.Option("--streaming", help="Read, merge and write one decoder block at a time (peak memory: one block and its adapters; same output, bit for bit): on, off, or auto = on when the weights would take more than half of the available memory. Needs a local safetensors checkpoint and --device cpu. The whole-model logits probe cannot run then; every merged matrix is still checked against W + Δ.")] = "auto",
    max_shard_size: MaxShardSizeOpt = "5GB",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    *,
    writing: Writing,
) -> None:
    """Merge adapters written by `perp retrain` (masklora: W + s·(M⊙BA); scalelora: W ⊙ BA;
    lora-prune: W + M⊙(s·BA); lora: W + s·BA, only with --allow-densify).

    Before writing, checks that no pruned weight became nonzero, that every merged matrix
    W' gives W'x = Wx + Δx on fixed random vectors, and (without streaming) that the
    merged model's logits on a probe batch match the unmerged model's (float32: 1e-4 of
    the largest value). The output has the same masks and no adapter files.
    """
    outcome = recipe.run(recipe.Config(
        model=model, output=output, allow_densify=allow_densify, streaming=streaming_mode, device=device, dtype=dtype,
        max_shard_size=max_shard_size, seed=seed, **writing.step(),
    ), Reporter(writing.quiet))
    report = outcome.report
    if writing.json:
        skipped = outcome.results.get("checks_skipped", {})
        emit_json({"output": str(output), **report.to_json(), "checks_skipped": skipped, "streaming": outcome.streaming})
    if not writing.quiet:
        if report.densified_density is not None:
            console.print(
                f"[yellow]warning[/]: plain LoRA merged densely: the adapted matrices are now {report.densified_density:.2%} "
                "dense and the output has no masks",
                soft_wrap=True,
            )
        if report.relative_diff is not None:
            probe = (f"probe logits max |Δ| {report.max_abs_diff:.3g} "
                     f"(relative {report.relative_diff:.2g} ≤ {report.tolerance:g})")
        else:
            probe = (f"per-matrix probe relative Δ {report.matrix_relative_diff:.2g} ≤ {report.tolerance:g} "
                     "(streamed: no whole-model logits probe)")
        console.print(
            f"merged {report.tensors} {report.kind} adapters · {probe} · masks "
            f"{'kept' if report.masks_kept else 'none'} → {escape(str(output))}",
            soft_wrap=True,
        )
