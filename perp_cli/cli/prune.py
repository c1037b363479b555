"""`perp prune MODEL -o OUT`: magnitude, random, Wanda, SparseGPT or RIA; unstructured or
N:M; uniform or OWL sparsity per block; optional DSnoT mask refinement."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from perp_cli.cli.common import (ActivationDirOpt, CalibConcatOpt, CalibSeqlenOpt, CalibTextFieldOpt, DeviceOpt, DtypeOpt, MaxMemoryOpt,
                                 MaxShardSizeOpt, ModelArg, NsamplesOpt, OffloadActivationsOpt, OutputOpt, SeedOpt, Writing, emit_json,
                                 writes_checkpoint)
from perp_cli.progress import Reporter, console
from perp_cli.pruner import PruneConfig
from perp_cli.recipes import prune as recipe


@writes_checkpoint
def prune_cmd(
    model: ModelArg,
    output: OutputOpt,
    method: Annotated[str, typer.Option("--method", help="magnitude (|W|, no data), random (baseline, no data), wanda (|W|·‖X‖₂, calibration), sparsegpt (OBS updates, calibration), ria (relative importance (|W|/Σrow|W| + |W|/Σcol|W|)·‖X‖₂^0.5, calibration) or keep (the input's masks unchanged: with --refine dsnot on an already pruned checkpoint). Required.", show_default=False)],
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Fraction of weights to prune, 0 <= S < 1. Default: 0.5 unstructured; for N:M it is 1 - N/M (an explicit value that disagrees is an error).", show_default=False)] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="unstructured, or N:M (at most N kept in every M consecutive inputs, e.g. 2:4, 4:8).")] = "unstructured",
    scope: Annotated[str | None, typer.Option("--scope", help="Unstructured comparison group: row, matrix or global (all prunable weights). Default: row for wanda, matrix for magnitude/random; sparsegpt picks per 128-column block (matrix = all rows of the block, as published; row = each row).", show_default=False)] = None,
    targets: Annotated[str | None, typer.Option("--targets", help="Regex on parameter names: prune only matching matrices (default: every block matrix; embeddings and lm_head are never pruned).", show_default=False)] = None,
    exclude: Annotated[str | None, typer.Option("--exclude", help="Regex on parameter names: leave matching matrices dense.", show_default=False)] = None,
    skip_indivisible: Annotated[bool, typer.Option("--skip-indivisible", help="With N:M, leave matrices whose input dimension is not a multiple of M dense (reported) instead of failing.")] = False,
    calib: Annotated[str, typer.Option("--calib", help="Calibration text for wanda/sparsegpt: c4 or wikitext2 (hub, needs network), or a local .txt/.raw/.jsonl/.parquet file or datasets directory.")] = "c4",
    text_field: CalibTextFieldOpt = "text",
    nsamples: NsamplesOpt = 128,
    seqlen: CalibSeqlenOpt = None,
    calib_concat: CalibConcatOpt = False,
    damp: Annotated[float, typer.Option("--damp", help="SparseGPT damping, as a fraction of the Hessian's mean diagonal (raised x10 and retried if the Cholesky fails).")] = 0.01,
    blocksize: Annotated[int, typer.Option("--blocksize", help="SparseGPT column block size (mask chosen per block; lazy updates between blocks).")] = 128,
    sparsegpt_selection: Annotated[str, typer.Option("--sparsegpt-selection", help="SparseGPT's mask rule per column block (unstructured): reference = prune every weight whose score is <= the (k+1)-th smallest, k = floor(S·n), as IST-DASLab/sparsegpt does (k+1 per block, more on ties: a hair above S); exact = exactly k per block (S met exactly). N:M is the same under both.")] = "reference",
    allocation: Annotated[str, typer.Option("--allocation", help="Sparsity per decoder block: uniform (S everywhere) or owl (Outlier Weighed Layerwise sparsity: blocks with more outlier Wanda scores are pruned less, each in [S-λ, S+λ], the parameter-weighted mean exactly S; a statistics pass over the dense model first). Unstructured only.")] = "uniform",
    owl_m: Annotated[float, typer.Option("--owl-m", help="OWL: a weight is an outlier when its Wanda score exceeds M x the block's mean score.")] = 5.0,
    owl_lambda: Annotated[float, typer.Option("--owl-lambda", help="OWL: the blocks' sparsities spread over [S-λ, S+λ]; 0 <= λ <= min(S, 1-S).")] = 0.08,
    permute: Annotated[bool, typer.Option("--permute", help="N:M with magnitude/wanda/ria: RIA's channel reallocation. Each matrix's inputs are reordered so that important channels land in different groups of M before the mask is chosen; the weights stay in place (the model computes the same function) and the order is stored with the masks: the mask is N:M in that order, and an N:M kernel must permute the weight's columns and its inputs by it.")] = False,
    refine: Annotated[str | None, typer.Option("--refine", help="dsnot: after the method (block by block), DSnoT's training-free prune-and-grow swaps within each output row reduce the expected reconstruction error; every row's count and N:M groups stay exact. With --method keep, refines the masks of an already pruned MODEL (needs --dense).", show_default=False)] = None,
    refine_iters: Annotated[int, typer.Option("--refine-iters", help="DSnoT: most swap iterations per matrix, each one swap per row (the reference's --max_cycle_time, set for rows of thousands of inputs; on small models a few iterations: 50 can replace every kept weight of a 64-input row).")] = 50,
    refine_threshold: Annotated[float, typer.Option("--refine-threshold", help="DSnoT: a row stops once its expected error |Σ pruned W·E[x]| is at most this (the reference's --update_threshold).")] = 0.1,
    refine_skip: Annotated[str, typer.Option("--refine-skip", help="DSnoT: leave these matrices' masks as the method chose them: mlp (the reference's default: refine attention only), attention, or none.")] = "mlp",
    dense: Annotated[str | None, typer.Option("--dense", help="With --method keep --refine: the dense model MODEL was pruned from (the grown weights take its values). Default: the source model recorded in MODEL's perp.json.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration windows per forward micro-batch.")] = 8,
    offload_activations: OffloadActivationsOpt = False,
    max_memory: MaxMemoryOpt = None,
    offload_dir: ActivationDirOpt = None,
    streaming_mode: Annotated[str, typer.Option("--streaming", help="Read and write the weights one decoder block at a time (peak memory: one block plus the calibration activations; same output, bit for bit): on, off, or auto = on when the weights would take more than half of the available memory. Needs a local safetensors checkpoint; not with --scope global.")] = "auto",
    max_shard_size: MaxShardSizeOpt = "5GB",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    *,
    writing: Writing,
) -> None:
    """Prune a checkpoint and write weights with exact zeros, masks and a manifest.

    Examples: --method ria --sparsity 0.5; --method wanda --sparsity 0.7 --allocation owl;
    --method ria --pattern 2:4 --permute; --method wanda --sparsity 0.6 --refine dsnot;
    PRUNED --method keep --refine dsnot --dense DENSE.

    Weights an earlier step pruned stay pruned. Wanda and SparseGPT calibrate block by
    block: each block is pruned, then the calibration data goes through the pruned
    block to the next one; only the current block is on the device. With --streaming
    (automatic when the model would not fit in memory) only the current block is in
    host memory at all: blocks are read from the input shards and written to the output
    shards one at a time, with the same result.
    """
    config = PruneConfig(
        method=method, sparsity=sparsity, pattern=pattern, scope=scope, targets=targets, exclude=exclude,
        skip_indivisible=skip_indivisible, damp=damp, blocksize=blocksize, sparsegpt_selection=sparsegpt_selection,
        calib=calib, text_field=text_field, nsamples=nsamples, seqlen=seqlen, calib_concat=calib_concat, seed=seed, device=device,
        batch_size=batch_size, offload_activations=offload_activations, max_memory=max_memory,
        offload_dir=None if offload_dir is None else str(offload_dir), quiet=writing.quiet,
        allocation=allocation, owl_m=owl_m, owl_lambda=owl_lambda, permute=permute, refine=refine,
        refine_iters=refine_iters, refine_threshold=refine_threshold, refine_skip=refine_skip,
    )
    outcome = recipe.run(recipe.Config(
        model=model, output=output, prune=config, dense=dense, streaming=streaming_mode, dtype=dtype, max_shard_size=max_shard_size,
        seed=seed, **writing.step(),
    ), Reporter(writing.quiet))
    results = outcome.results
    achieved = results["sparsity_achieved"]
    if writing.json:
        emit_json({
            "output": str(output), "method": results["method"], "pattern": results["pattern"], "scope": results["scope"],
            "sparsity": achieved["pruned_tensors"], "sparsity_all_masked": achieved["all_masked_tensors"],
            "per_tensor": achieved["per_tensor"], "skipped_indivisible": results["skipped_indivisible"],
            "notes": results["notes"], "pruning_time_s": results["pruning_time_s"], "peak_memory": results["peak_memory"],
            "calibration": outcome.data, "streaming": outcome.streaming,
            **{k: results[k] for k in ("allocation", "permuted", "refine") if k in results},
        })
    if not writing.quiet:
        _render(results, str(output))


def _render(results: dict, output: str) -> None:
    """One row per block (the per-tensor numbers are in --json and perp.json)."""
    achieved = results["sparsity_achieved"]
    by_block: dict[str, list[float]] = {}
    for name, s in achieved["per_tensor"].items():
        block = re.search(r"\.(\d+)\.", name)
        by_block.setdefault(block.group(1) if block else "-", []).append(s)
    scope = "" if ":" in results["pattern"] else f" · scope {results['scope']}"
    targets = results.get("allocation", {}).get("block_sparsity", {})
    table = Table(title=f"{results['method']} · {results['pattern']}{scope}", title_justify="left")
    for col in ("block", "tensors", "min sparsity", "max sparsity") + (("target",) if targets else ()):
        table.add_column(col, justify="right")
    for block, values in by_block.items():
        target = (f"{targets[block]:.2%}" if block in targets else "-",) if targets else ()
        table.add_row(block, str(len(values)), f"{min(values):.2%}", f"{max(values):.2%}", *target)
    console.print(table)
    for kind, lines in results["notes"].items():
        for line in lines:
            console.print(f"[yellow]{kind}[/]: {escape(line)}", soft_wrap=True)
    for key in results["skipped_indivisible"]:
        console.print(f"[yellow]left dense (inputs not divisible by M)[/]: {escape(key)}", soft_wrap=True)
    console.print(
        f"sparsity {achieved['pruned_tensors']:.2%} over {results['matrices_pruned']} matrices "
        f"in {results['pruning_time_s']:.1f}s → {escape(output)}",
        soft_wrap=True,
    )
