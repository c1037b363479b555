"""`perp merge IN -o OUT`: fold retrained adapters into the weights, keeping the masks."""

from __future__ import annotations

from typing import Annotated

import typer

from perp_cli import checkpoint
from perp_cli.cli.common import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    OutputOpt,
    OverwriteOpt,
    QuietOpt,
    TrustRemoteCodeOpt,
    SeedOpt,
    emit_json,
)
from perp_cli.manifest import StepRecord
from perp_cli.merging import merge_checkpoint
from perp_cli.progress import console


def merge_cmd(
    model: ModelArg,
    output: OutputOpt,
    allow_densify: Annotated[bool, typer.Option("--allow-densify", help="Merge plain LoRA adapters into pruned matrices densely: the pruned weights fill in, no masks are written, and the resulting density is reported.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Merge adapters written by `perp retrain` (masklora: W + s·(M⊙BA); scalelora: W ⊙ BA;
    lora-prune: W + M⊙(s·BA); lora: W + s·BA, only with --allow-densify).

    Before writing, checks that no pruned weight became nonzero and that the merged
    model's logits on a probe batch match the unmerged model's (float32: 1e-4 of the
    largest logit). The output has the same masks and no adapter files.
    """
    checkpoint.check_output(output, inputs=[model], overwrite=overwrite)
    ckpt = checkpoint.load(model, dtype=dtype, device=device, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    step = StepRecord("merge", args={"model": model, "output": str(output), "allow_densify": allow_densify,
                                     "dtype": dtype, "device": device}, input=model, seed=seed)
    # the seed only draws the probe batch: the merge itself is deterministic arithmetic
    report = merge_checkpoint(ckpt, allow_densify=allow_densify, seed=seed)
    step.results = report.to_json()
    masks = ckpt.masks if report.densified_density is None else None
    checkpoint.save(output, ckpt.model, ckpt.tokenizer, masks, manifest_in=ckpt.manifest, step=step, overwrite=overwrite)

    if json_out:
        emit_json({"output": str(output), **report.to_json()})
    if not quiet:
        if report.densified_density is not None:
            console.print(
                f"[yellow]warning[/]: plain LoRA merged densely: the adapted matrices are now {report.densified_density:.2%} "
                "dense and the output has no masks",
                soft_wrap=True,
            )
        console.print(
            f"merged {report.tensors} {report.kind} adapters · probe logits max |Δ| {report.max_abs_diff:.3g} "
            f"(relative {report.relative_diff:.2g} ≤ {report.tolerance:g}) · masks "
            f"{'kept' if report.masks_kept else 'none'} → {output}",
            soft_wrap=True,
        )
