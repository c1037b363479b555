"""`perp reconstruct PRUNED -o OUT`: train each pruned block to reproduce the dense block."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from perp_cli.cli.common import (ActivationDirOpt, CalibConcatOpt, CalibOpt, CalibSeqlenOpt, CalibTextFieldOpt, DeviceOpt, DtypeOpt,
                                 MaxMemoryOpt, MaxShardSizeOpt, ModelArg, OffloadActivationsOpt, OutputOpt, SeedOpt, Writing, emit_json,
                                 writes_checkpoint)
from perp_cli.errors import UsageError
from perp_cli.progress import Reporter, console
from perp_cli.pruner import PruneConfig
from perp_cli.recipes.reconstruct import Config, run
from perp_cli.reconstruction import RECIPES, ReconstructConfig


@writes_checkpoint
def reconstruct_cmd(
    model: ModelArg,
    output: OutputOpt,
    dense: Annotated[str | None, typer.Option("--dense", help="The dense reference model (directory or hub id). Default: the source model recorded in MODEL's perp.json (the root of its history); an error if none is recorded.", show_default=False)] = None,
    target: Annotated[str, typer.Option("--target", help="dense: the dense block i applied to the reconstructed stream's inputs X_i (PERP's choice). dense-stream: the dense model's own block-i output on its own activations (the dense model runs block by block in lockstep; later blocks also learn to undo earlier drift).")] = "dense",
    granularity: Annotated[str, typer.Option("--granularity", help="What is fitted at a time: block (each decoder block against the dense block) or sublayer (each block's attention half, then its MLP half, each with its norm and residual add, against the dense model's same half; Free Lunch in LLM Compression, 2025). Each half trains --steps-per-block steps with the --train parameters and adapters it owns. Sequential blocks only: parallel attention+MLP blocks (GPT-J, Phi, Falcon) are refused.")] = "block",
    train: Annotated[str, typer.Option("--train", help="What trains in each block, as in `perp retrain`: a comma list of biases (projection biases), norms (LayerNorm weight+bias / RMSNorm weight), all (every block weight; pruned weights stay exactly 0 through masked gradients) or none (adapter only).")] = "biases,norms",
    add_biases: Annotated[bool, typer.Option("--add-biases", help="Add zero-initialised biases to the projections of models without them (LLaMA) and set the config flags so the output loads in plain transformers.")] = False,
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter trained with each block and merged into it under its mask before the next block: masklora (W + s·(M⊙BA)), scalelora or multlora (W ⊙ BA), lora-prune (dense while training, masked at merge), or none. Plain lora is refused: its merge would fill pruned weights.")] = "masklora",
    adapter_targets: Annotated[str | None, typer.Option("--adapter-targets", help="Regex (re.search) on matrix names; experts are NAME[e]. Default: every prunable matrix.", show_default=False)] = None,
    rank: Annotated[int, typer.Option("--rank", help="Adapter rank r.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="Adapter scaling numerator: the update is (alpha/rank)·BA (unused by scalelora).")] = 32.0,
    calib: CalibOpt = "c4",
    text_field: CalibTextFieldOpt = "text",
    nsamples: Annotated[int, typer.Option("--nsamples", help="Number of calibration windows (the activations every block trains on).")] = 128,
    seqlen: CalibSeqlenOpt = None,
    calib_concat: CalibConcatOpt = False,
    recipe: Annotated[str, typer.Option("--recipe", help="Defaults for --steps-per-block, --batch-size, --lr, --order, --mode, --restore (an explicit option wins): perp = 100 steps x 8 windows, lr 1e-3, shuffle, eval, restore; paper = PERP's reference code: 20 steps x 1 window, lr 5e-4, fixed order, train mode, no restore (and --scope matrix for --prune-method wanda). docs/fidelity.md compares them.")] = "perp",
    steps_per_block: Annotated[int | None, typer.Option("--steps-per-block", help="AdamW steps per block, each on one micro-batch of --batch-size windows. Default: 100 (perp), 20 (paper).", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Calibration windows per micro-batch (forward passes and training steps). Default: 8 (perp), 1 (paper).", show_default=False)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak AdamW learning rate (10% linear warmup, then linear decay to 0, restarted for every block). Default: 1e-3 (perp), 5e-4 (paper).", show_default=False)] = None,
    order: Annotated[str | None, typer.Option("--order", help="Which micro-batch each step trains on: shuffle (a fresh permutation every pass over the windows; perp) or fixed (in order, cycling; paper).", show_default=False)] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="The block while it trains: eval (no dropout; only modules carrying adapters in train mode; perp) or train (the whole block, dropout included; paper).", show_default=False)] = None,
    restore: Annotated[bool | None, typer.Option("--restore/--no-restore", help="Put a block back to its pre-training state when training made its error worse (perp: on; paper: off).", show_default=False)] = None,
    prune_method: Annotated[str | None, typer.Option("--prune-method", help="Prune while reconstructing (PERP's order: block i is pruned from inputs that already went through the reconstructed blocks 0..i-1, then reconstructed against itself before pruning): magnitude, random, wanda or sparsegpt. MODEL is then the DENSE model (no --dense); the output has masks as after `perp prune`.", show_default=False)] = None,
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="With --prune-method: as in `perp prune` (default 0.5, or 1 - N/M).", show_default=False)] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="With --prune-method: unstructured or N:M, as in `perp prune`.")] = "unstructured",
    scope: Annotated[str | None, typer.Option("--scope", help="With --prune-method: row or matrix, as in `perp prune` (global cannot interleave). Default: the method's (wanda: row; with --recipe paper: matrix, as PERP's code).", show_default=False)] = None,
    sparsegpt_selection: Annotated[str, typer.Option("--sparsegpt-selection", help="With --prune-method sparsegpt: reference or exact, as in `perp prune`.")] = "reference",
    warmup: Annotated[float, typer.Option("--warmup", help="Linear warmup, as a fraction of --steps-per-block, in [0, 1).")] = 0.1,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decoupled weight decay (pruned weights stay 0 regardless).")] = 0.0,
    offload_activations: OffloadActivationsOpt = False,
    max_memory: MaxMemoryOpt = None,
    offload_dir: ActivationDirOpt = None,
    streaming_mode: Annotated[str, typer.Option("--streaming", help="Read both models one decoder block at a time and write each reconstructed block at once (peak memory: a pruned and a dense block plus the calibration activations and targets; same output, bit for bit): on, off, or auto = on when the two models' weights would take more than half of the available memory. Needs local safetensors checkpoints (MODEL and --dense).")] = "auto",
    max_shard_size: MaxShardSizeOpt = "5GB",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    *,
    writing: Writing,
) -> None:
    """Layer-wise reconstruction of a pruned checkpoint against its dense model (PERP).

    Block by block, the chosen parameters (and an adapter, merged under the mask) train
    so that the pruned block reproduces the dense block's output on the calibration
    activations (mean squared error). Only one pruned and one dense block are on the
    device at a time. A block that training makes worse keeps its pre-training state.
    Masks never change; the output is a normal checkpoint (no adapter files). With
    --streaming (automatic when the two models would not fit in memory) only one pruned
    and one dense block are in host memory at all, with the same result.

    With --prune-method, MODEL is the dense model and each block is pruned right before
    it is reconstructed, in the same pass (PERP's reference order); the output carries
    the masks. --recipe paper reproduces the reference code's settings.
    """
    if recipe not in RECIPES:
        raise UsageError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    chosen = {"steps_per_block": steps_per_block, "batch_size": batch_size, "lr": lr, "order": order, "mode": mode, "restore": restore}
    settings = {k: RECIPES[recipe][k] if v is None else v for k, v in chosen.items()}
    calibration = {"calib": calib, "text_field": text_field, "nsamples": nsamples, "seqlen": seqlen, "calib_concat": calib_concat}
    config = ReconstructConfig(
        train=train, adapter=adapter, adapter_targets=adapter_targets, rank=rank, alpha=alpha, add_biases=add_biases,
        target=target, granularity=granularity, warmup=warmup, weight_decay=weight_decay, seed=seed, device=device, offload=offload_activations,
        max_memory=max_memory, offload_dir=None if offload_dir is None else str(offload_dir), quiet=writing.quiet, **calibration, **settings,
    )
    prune_config = None
    if prune_method is not None:
        if scope is None and recipe == "paper" and prune_method == "wanda":
            scope = "matrix"  # PERP's code compares a Wanda score with the whole matrix, not per output row
        prune_config = PruneConfig(
            method=prune_method, sparsity=sparsity, pattern=pattern, scope=scope, sparsegpt_selection=sparsegpt_selection,
            **calibration, seed=seed, device=device, batch_size=config.batch_size, quiet=True,
        )
    elif sparsity is not None or scope is not None or pattern != "unstructured":
        raise UsageError("--sparsity/--pattern/--scope choose how --prune-method prunes; without it MODEL is already pruned")
    outcome = run(Config(
        model=model, output=output, reconstruct=config, dense=dense, prune=prune_config, preset=recipe, streaming=streaming_mode,
        dtype=dtype, max_shard_size=max_shard_size, seed=seed, **writing.step(),
    ), Reporter(writing.quiet))
    results = outcome.results
    if writing.json:
        emit_json({"output": str(output), "dense": outcome.dense, **results, "calibration": outcome.data,
                   "streaming": outcome.streaming, "shards": results.get("streaming")})
    if not writing.quiet:
        _render(results, outcome.dense, str(output))


def _render(results: dict, dense: str, output: str) -> None:
    what = ", ".join(results["trained"]) + (f" + {results['adapter']}" if results["adapter"] != "none" else "")
    granularity = results.get("granularity", "block")
    table = Table(title=f"reconstruct · {what} · target {results['target']}" + ("" if granularity == "block" else f" · {granularity}"),
                  title_justify="left")
    for col in ("block", "MSE before", "MSE after", "change", "trainable", "time (s)"):
        table.add_column(col, justify="right")
    for b in results["blocks"]:
        change = "restored (training made it worse)" if b["restored"] else f"{-b['reduction']:+.1%}"
        table.add_row(str(b["block"]) + ("" if b.get("part", "block") == "block" else f" {b['part']}"), f"{b['mse_before']:.4g}", f"{b['mse_after']:.4g}", change,
                      f"{b['trainable_parameters']:,}", f"{b['time_s']:.1f}")
    console.print(table)
    pruning = results.get("interleaved_pruning")
    if pruning:
        console.print(
            f"pruned while reconstructing: {pruning['method']} {pruning['pattern']}, sparsity "
            f"{pruning['sparsity_achieved']['pruned_tensors']:.2%} over {pruning['matrices_pruned']} matrices",
            soft_wrap=True, highlight=False,
        )
    console.print(
        f"{results['steps_per_block']} steps x {results['tokens_per_block'] // max(results['steps_per_block'], 1):,} tokens per {'half' if granularity == 'sublayer' else 'block'} "
        f"in {results['reconstruction_time_s']:.1f}s against {escape(dense)} → {escape(output)}",
        soft_wrap=True, highlight=False,
    )
