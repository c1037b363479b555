"""`perp shrink MODEL -o OUT --structure depth|width|heads|experts`: structured pruning
to a smaller dense model."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from perp_cli.cli.common import (CalibConcatOpt, CalibOpt, CalibSeqlenOpt, CalibTextFieldOpt, DeviceOpt, DtypeOpt, MaxShardSizeOpt,
                                 ModelArg, NsamplesOpt, OffloadActivationsOpt, OutputOpt, SeedOpt, Writing, emit_json, writes_checkpoint)
from perp_cli.errors import UsageError
from perp_cli.progress import console
from perp_cli.recipes import shrink as recipe
from perp_cli.shrinking import COUNT_FLAGS, ShrinkConfig


@writes_checkpoint
def shrink_cmd(
    model: ModelArg,
    output: OutputOpt,
    structure: Annotated[str, typer.Option("--structure", help="What to remove: depth (whole blocks, by block influence), width (MLP intermediate channels), heads (attention key-value groups with their query heads) or experts (routed experts of MoE blocks). Required.", show_default=False)],
    remove_ratio: Annotated[float | None, typer.Option("--remove-ratio", help="Fraction to remove, 0 < R < 1, rounded to the nearest whole unit: of the blocks (depth), of each block's MLP channels (width), of each block's key-value groups (heads), of each MoE block's experts (experts).", show_default=False)] = None,
    remove_blocks: Annotated[int | None, typer.Option("--remove-blocks", help="depth: remove this many blocks.", show_default=False)] = None,
    keep_ratio: Annotated[float | None, typer.Option("--keep-ratio", help="depth: keep this fraction of the blocks (0 < R < 1).", show_default=False)] = None,
    remove_channels: Annotated[int | None, typer.Option("--remove-channels", help="width: remove this many MLP channels from every block (intermediate_size stays one number).", show_default=False)] = None,
    remove_heads: Annotated[int | None, typer.Option("--remove-heads", help="heads: remove this many attention heads from every block; a multiple of heads / key-value heads (whole groups go).", show_default=False)] = None,
    remove_experts: Annotated[int | None, typer.Option("--remove-experts", help="experts: remove this many experts from every MoE block (at least num_experts_per_tok stay).", show_default=False)] = None,
    multiple_of: Annotated[int, typer.Option("--multiple-of", help="width: round the kept MLP width down to a multiple of this (e.g. 64 for fast kernels); more channels go.")] = 1,
    calib: CalibOpt = "c4",
    text_field: CalibTextFieldOpt = "text",
    nsamples: NsamplesOpt = 128,
    seqlen: CalibSeqlenOpt = None,
    calib_concat: CalibConcatOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration windows per forward micro-batch.")] = 8,
    offload_activations: OffloadActivationsOpt = False,
    max_shard_size: MaxShardSizeOpt = "5GB",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    *,
    writing: Writing,
) -> None:
    """Remove whole blocks, MLP channels, attention heads or experts and write a SMALLER
    dense model: a plain Hugging Face directory (no masks) that loads and runs faster in
    any runtime.

    The parts to remove are scored on calibration windows, block by block on the shared
    engine (docs/cli-shrink.md gives each score); the config is updated (num_hidden_layers
    and per-layer lists, intermediate_size, num_attention_heads/num_key_value_heads,
    num_experts) and perp.json records what was removed and the parameter counts before
    and after. Recover the result with `perp retrain` (biases,norms or LoRA, which merges
    without --allow-densify since there is no mask) or `perp reconstruct --adapter lora`.

    Examples: perp shrink MODEL -o OUT --structure depth --remove-blocks 2 --calib c4;
    perp shrink MODEL -o OUT --structure width --remove-ratio 0.25 --multiple-of 64.
    """
    counts = {"depth": remove_blocks, "width": remove_channels, "heads": remove_heads, "experts": remove_experts}
    wrong = [COUNT_FLAGS[s] for s, v in counts.items() if v is not None and s != structure]
    if wrong and structure in counts:
        raise UsageError(f"{wrong[0]} does not apply to --structure {structure}")
    config = ShrinkConfig(
        structure=structure, remove_ratio=remove_ratio, remove_count=counts.get(structure), keep_ratio=keep_ratio, multiple_of=multiple_of,
        calib=calib, text_field=text_field, nsamples=nsamples, seqlen=seqlen, calib_concat=calib_concat, seed=seed, device=device,
        batch_size=batch_size, offload_activations=offload_activations, quiet=writing.quiet,
    )
    outcome = recipe.run(recipe.Config(
        model=model, output=output, shrink=config, dtype=dtype, max_shard_size=max_shard_size, seed=seed, **writing.step(),
    ))
    results = outcome.results
    if writing.json:
        emit_json({"output": str(output), **{k: results[k] for k in ("structure", "removed", "sizes", "parameters", "shrink_time_s")},
                   "calibration": outcome.data})
    if not writing.quiet:
        p = results["parameters"]
        sizes = ", ".join(f"{k} {a} → {b}" for k, (a, b) in results["sizes"].items() if a != b)
        console.print(
            f"{structure}: {sizes}; parameters {p['before']:,} → {p['after']:,} (−{p['removed_fraction']:.1%}) "
            f"in {results['shrink_time_s']:.1f}s → {escape(str(output))}",
            soft_wrap=True,
        )
