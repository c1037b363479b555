"""`perp reconstruct PRUNED -o OUT`: train each pruned block to reproduce the dense block."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from perp_cli import activations, checkpoint, data, streaming
from perp_cli.cli.common import (
    ActivationDirOpt,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    MaxShardSizeOpt,
    ModelArg,
    OffloadActivationsOpt,
    OutputOpt,
    OverwriteForeignOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    TrustInputsOpt,
    TrustRemoteCodeOpt,
    check_activation_memory,
    check_rank,
    emit_json,
)
from perp_cli.errors import UsageError
from perp_cli.manifest import StepRecord
from perp_cli.progress import console
from perp_cli.reconstruction import (
    ReconstructConfig,
    check_compatible,
    dense_source,
    reconstruct,
)
from perp_cli.shards import parse_size


def reconstruct_cmd(
    model: ModelArg,
    output: OutputOpt,
    dense: Annotated[str | None, typer.Option("--dense", help="The dense reference model (directory or hub id). Default: the source model recorded in MODEL's perp.json (the root of its history); an error if none is recorded.", show_default=False)] = None,
    target: Annotated[str, typer.Option("--target", help="dense: the dense block i applied to the reconstructed stream's inputs X_i (PERP's choice). dense-stream: the dense model's own block-i output on its own activations (the dense model runs block by block in lockstep; later blocks also learn to undo earlier drift).")] = "dense",
    train: Annotated[str, typer.Option("--train", help="What trains in each block, as in `perp retrain`: a comma list of biases (projection biases), norms (LayerNorm weight+bias / RMSNorm weight), all (every block weight; pruned weights stay exactly 0 through masked gradients) or none (adapter only).")] = "biases,norms",
    add_biases: Annotated[bool, typer.Option("--add-biases", help="Add zero-initialised biases to the projections of models without them (LLaMA) and set the config flags so the output loads in plain transformers.")] = False,
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter trained with each block and merged into it under its mask before the next block: masklora (W + s·(M⊙BA)), scalelora or multlora (W ⊙ BA), lora-prune (dense while training, masked at merge), or none. Plain lora is refused: its merge would fill pruned weights.")] = "masklora",
    adapter_targets: Annotated[str | None, typer.Option("--adapter-targets", help="Regex (re.search) on matrix names; experts are NAME[e]. Default: every prunable matrix.", show_default=False)] = None,
    rank: Annotated[int, typer.Option("--rank", help="Adapter rank r.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="Adapter scaling numerator: the update is (alpha/rank)·BA (unused by scalelora).")] = 32.0,
    calib: Annotated[str, typer.Option("--calib", help="Calibration text: c4 or wikitext2 (hub, needs network), or a local .txt/.raw/.jsonl/.parquet file or datasets directory.")] = "c4",
    text_field: Annotated[str, typer.Option("--text-field", help="Text field of .jsonl/.parquet/datasets calibration data.")] = "text",
    nsamples: Annotated[int, typer.Option("--nsamples", help="Number of calibration windows (the activations every block trains on).")] = 128,
    seqlen: Annotated[int | None, typer.Option("--seqlen", help="Tokens per calibration window. Default: min(2048, the model's max positions).", show_default=False)] = None,
    calib_concat: Annotated[bool, typer.Option("--calib-concat", help="Draw windows from all documents joined together (when too few documents are longer than --seqlen).")] = False,
    steps_per_block: Annotated[int, typer.Option("--steps-per-block", help="AdamW steps per block, each on one micro-batch of --batch-size windows (reshuffled every pass over the calibration set).")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration windows per micro-batch (forward passes and training steps).")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate (10% linear warmup, then linear decay to 0, restarted for every block).")] = 1e-3,
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
    overwrite: OverwriteOpt = False,
    overwrite_foreign: OverwriteForeignOpt = False,
    trust_inputs: TrustInputsOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Layer-wise reconstruction of a pruned checkpoint against its dense model (PERP).

    Block by block, the chosen parameters (and an adapter, merged under the mask) train
    so that the pruned block reproduces the dense block's output on the calibration
    activations (mean squared error). Only one pruned and one dense block are on the
    device at a time. A block that training makes worse keeps its pre-training state.
    Masks never change; the output is a normal checkpoint (no adapter files). With
    --streaming (automatic when the two models would not fit in memory) only one pruned
    and one dense block are in host memory at all, with the same result.
    """
    config = ReconstructConfig(
        train=train, adapter=adapter, adapter_targets=adapter_targets, rank=rank, alpha=alpha, add_biases=add_biases,
        target=target, steps_per_block=steps_per_block, batch_size=batch_size, lr=lr, warmup=warmup,
        weight_decay=weight_decay, seed=seed, device=device, offload=offload_activations, max_memory=max_memory,
        offload_dir=None if offload_dir is None else str(offload_dir), quiet=quiet,
    )
    config.validate()  # usage errors before loading anything
    shard_bytes = parse_size(max_shard_size)
    overwrite = overwrite or overwrite_foreign
    inputs = [model, dense, calib, offload_dir]
    checkpoint.check_output(output, inputs=inputs, overwrite=overwrite, overwrite_foreign=overwrite_foreign)
    activations.check_offload_dir(offload_dir, output, [model] + ([dense] if dense else []))
    decision = streaming.decide(streaming_mode, model, dtype=dtype, models=2)  # the dense model has the same shapes
    if decision.stream:
        if not quiet:
            console.print(escape(decision.reason), soft_wrap=True)
        ckpt = streaming.open_checkpoint(model, dtype=dtype, trust_remote_code=trust_remote_code, need_tokenizer=True,
                                         lazy_masks=True, trust_inputs=trust_inputs)
    else:
        ckpt = checkpoint.load(model, dtype=dtype, device="cpu", allow_pickle=allow_pickle,
                               trust_remote_code=trust_remote_code, need_tokenizer=True, trust_inputs=trust_inputs)
    dense_dir = dense_source(ckpt, dense)
    if dense is None:
        checkpoint.check_output(output, inputs=inputs + [dense_dir], overwrite=overwrite, overwrite_foreign=overwrite_foreign)
    if decision.stream:
        try:
            reference = streaming.open_checkpoint(dense_dir, dtype=dtype, trust_remote_code=trust_remote_code, lazy_masks=True,
                                                  trust_inputs=trust_inputs)
        except UsageError as exc:
            raise UsageError(f"--dense: {exc}; or use --streaming off") from exc
    else:
        reference = checkpoint.load(dense_dir, dtype=dtype, device="cpu", allow_pickle=allow_pickle,
                                    trust_remote_code=trust_remote_code, need_tokenizer=False,
                                    trust_inputs=trust_inputs)
    check_compatible(ckpt.model, reference.model)
    if not trust_inputs:
        checkpoint.check_source_weights(ckpt, dense_dir)
    if config.adapter_kind is not None:
        check_rank(ckpt.model, rank, adapter_targets)
    # the inputs, the dense targets and the block outputs
    check_activation_memory(ckpt.model, nsamples, seqlen, 3, offload_dir, "reconstruction")

    length = data.default_seqlen(ckpt.model, seqlen)
    source = data.load_source(calib, split="train", text_field=text_field)
    tokens = data.sample_windows(ckpt.require_tokenizer(), source, nsamples, length, seed, calib_concat)
    args = {
        "model": model, "output": str(output), "dense": dense_dir, "target": target, "train": train,
        "add_biases": add_biases, "adapter": config.adapter_kind or "none", "adapter_targets": adapter_targets,
        "rank": rank, "alpha": alpha, "calib": calib, "text_field": text_field, "nsamples": nsamples, "seqlen": length,
        "calib_concat": calib_concat, "steps_per_block": steps_per_block, "batch_size": batch_size, "lr": lr,
        "warmup": warmup, "schedule": "linear", "weight_decay": weight_decay,
        "offload_activations": offload_activations, "max_memory": max_memory,
        "offload_dir": None if offload_dir is None else str(offload_dir), "device": device, "dtype": dtype,
        "streaming": decision.stream, "streaming_reason": decision.reason, "max_shard_size": max_shard_size,
    }
    step = StepRecord("reconstruct", args=args, input=model, seed=seed)
    step.data = {**data.describe_tokens(source, tokens), "seqlen": length, "concat": calib_concat}
    if decision.stream:
        streaming.reconstruct(ckpt, reference, output, config, tokens, step, overwrite=overwrite, max_shard_size=shard_bytes)
        results = step.results
    else:
        step.results = results = reconstruct(ckpt, reference.model, tokens, config).results()
        checkpoint.save(output, ckpt.model, ckpt.tokenizer, ckpt.masks, manifest_in=ckpt.manifest, step=step,
                        overwrite=overwrite, max_shard_size=shard_bytes)

    if json_out:
        emit_json({"output": str(output), "dense": dense_dir, **results, "calibration": step.data,
                   "streaming": decision.stream, "shards": results.get("streaming")})
    if not quiet:
        _render(results, dense_dir, str(output))


def _render(results: dict, dense: str, output: str) -> None:
    what = ", ".join(results["trained"]) + (f" + {results['adapter']}" if results["adapter"] != "none" else "")
    table = Table(title=f"reconstruct · {what} · target {results['target']}", title_justify="left")
    for col in ("block", "MSE before", "MSE after", "change", "trainable", "time (s)"):
        table.add_column(col, justify="right")
    for b in results["blocks"]:
        change = "restored (training made it worse)" if b["restored"] else f"{-b['reduction']:+.1%}"
        table.add_row(str(b["block"]), f"{b['mse_before']:.4g}", f"{b['mse_after']:.4g}", change,
                      f"{b['trainable_parameters']:,}", f"{b['time_s']:.1f}")
    console.print(table)
    console.print(
        f"{results['steps_per_block']} steps x {results['tokens_per_block'] // max(results['steps_per_block'], 1):,} tokens per block "
        f"in {results['reconstruction_time_s']:.1f}s against {escape(dense)} → {escape(output)}",
        soft_wrap=True, highlight=False,
    )
