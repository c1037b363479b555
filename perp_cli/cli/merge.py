"""`perp merge IN -o OUT`: fold retrained adapters into the weights, keeping the masks."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from perp_cli import checkpoint, streaming
from perp_cli.cli.common import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxShardSizeOpt,
    ModelArg,
    OutputOpt,
    OverwriteForeignOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    TrustInputsOpt,
    TrustRemoteCodeOpt,
    emit_json,
)
from perp_cli.errors import UsageError
from perp_cli.manifest import StepRecord
from perp_cli.merging import merge
from perp_cli.progress import console, make_progress
from perp_cli.shards import parse_size


def merge_cmd(
    model: ModelArg,
    output: OutputOpt,
    allow_densify: Annotated[bool, typer.Option("--allow-densify", help="Merge plain LoRA adapters into pruned matrices densely: the pruned weights fill in, no masks are written, and the resulting density is reported.")] = False,
    streaming_mode: Annotated[str, typer.Option("--streaming", help="Read, merge and write one decoder block at a time (peak memory: one block and its adapters; same output, bit for bit): on, off, or auto = on when the weights would take more than half of the available memory. Needs a local safetensors checkpoint and --device cpu. The whole-model logits probe cannot run then; every merged matrix is still checked against W + Δ.")] = "auto",
    max_shard_size: MaxShardSizeOpt = "5GB",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    overwrite_foreign: OverwriteForeignOpt = False,
    trust_inputs: TrustInputsOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Merge adapters written by `perp retrain` (masklora: W + s·(M⊙BA); scalelora: W ⊙ BA;
    lora-prune: W + M⊙(s·BA); lora: W + s·BA, only with --allow-densify).

    Before writing, checks that no pruned weight became nonzero, that every merged matrix
    W' gives W'x = Wx + Δx on fixed random vectors, and (without streaming) that the
    merged model's logits on a probe batch match the unmerged model's (float32: 1e-4 of
    the largest value). The output has the same masks and no adapter files.
    """
    shard_bytes = parse_size(max_shard_size)
    overwrite = overwrite or overwrite_foreign
    checkpoint.check_output(output, inputs=[model], overwrite=overwrite, overwrite_foreign=overwrite_foreign)
    on_host = checkpoint.resolve_device(device).type == "cpu"
    if not on_host and streaming_mode == "on":
        raise UsageError(f"--streaming on merges on the host; use --device cpu (not {device}) or --streaming off")
    decision = streaming.decide(streaming_mode if on_host else "off", model, dtype)
    step = StepRecord("merge", args={"model": model, "output": str(output), "allow_densify": allow_densify,
                                     "dtype": dtype, "device": device, "streaming": decision.stream, "streaming_reason": decision.reason,
                                     "max_shard_size": max_shard_size}, input=model, seed=seed)
    # the seed only draws the probe inputs: the merge itself is deterministic arithmetic
    if decision.stream and not quiet:
        console.print(escape(decision.reason), soft_wrap=True)
    ckpt = checkpoint.open(model, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                           trust_inputs=trust_inputs, streamed=decision.stream, lazy_masks=True, lazy_adapters=True)
    with checkpoint.writing(ckpt, output, step, overwrite=overwrite, max_shard_size=shard_bytes) as sink, make_progress(quiet or not decision.stream) as progress:
        report = merge(ckpt, allow_densify=allow_densify, seed=seed, blocks=sink.blocks, progress=progress)
        step.results = report.results()
        sink.finish(ckpt.masks if report.densified_density is None else None)

    if json_out:
        skipped = step.results.get("checks_skipped", {})
        emit_json({"output": str(output), **report.to_json(), "checks_skipped": skipped, "streaming": decision.stream})
    if not quiet:
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
