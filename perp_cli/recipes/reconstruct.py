"""The `perp reconstruct` recipe: open the pruned model and its dense reference (in
memory or streamed), sample the calibration windows, reconstruct block by block
(pruning each block first with `prune`), write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.markup import escape

from perp_cli import activations, checkpoint, data, shrinking, streaming
from perp_cli.errors import UsageError
from perp_cli.progress import SILENT, Reporter
from perp_cli.pruner import PruneConfig, plan
from perp_cli.reconstruction import ReconstructConfig, check_compatible, dense_source, prepare, reconstruct
from perp_cli import recipes
from perp_cli.recipes import Step, check_activation_memory, check_rank


@dataclass(kw_only=True)
class Config(Step):
    reconstruct: ReconstructConfig
    dense: str | None = None  # default: the source model recorded in MODEL's perp.json
    prune: PruneConfig | None = None  # prune each block right before reconstructing it (MODEL is dense)
    preset: str = "perp"  # the --recipe the settings came from (recorded)
    streaming: str = "auto"  # on | off | auto


@dataclass(kw_only=True)
class Outcome(recipes.Outcome):
    dense: str  # the dense reference used


def run(config: Config, report: Reporter = SILENT) -> Outcome:
    cfg, prune_config, streaming_mode = config.reconstruct, config.prune, config.streaming
    shrunk = shrinking.shrunk_manifest(config.model)  # a smaller dense model from `perp shrink`
    if shrunk is not None:
        cfg.maskless, cfg.teacher_blocks = True, shrinking.source_blocks(shrunk)
        if prune_config is not None:
            raise UsageError(f"{config.model} is a `perp shrink` output; --prune-method prunes a dense model while reconstructing it, use `perp prune` first")
        if streaming_mode == "on":
            raise UsageError("reconstructing a `perp shrink` output does not stream yet; use --streaming off (or auto)")
        streaming_mode = "off"
    cfg.validate()  # usage errors before loading anything
    if prune_config is not None:
        if config.dense is not None:
            raise UsageError("--prune-method prunes MODEL (the dense model) while reconstructing it; --dense is not used with it")
        if streaming_mode == "on":
            raise UsageError("--prune-method does not stream yet; use --streaming off (or auto)")
        if cfg.granularity != "block":
            raise UsageError("--prune-method prunes whole blocks while reconstructing them: --granularity block only")
        plan(prune_config)
        streaming_mode = "off"
    shard_bytes = config.shard_bytes
    inputs = [config.dense, cfg.calib, cfg.offload_dir]
    config.check_output(*inputs)
    activations.check_offload_dir(cfg.offload_dir, config.output, [config.model] + ([config.dense] if config.dense else []))
    decision = streaming.decide(streaming_mode, config.model, dtype=config.dtype, models=1 if prune_config else 2)  # the dense model has the same shapes

    # --- the library calls: open both models -----------------------------------------
    if decision.stream:
        report.note(escape(decision.reason))
    ckpt = checkpoint.open(config.model, dtype=config.dtype, device="cpu", allow_pickle=config.allow_pickle,
                           trust_remote_code=config.trust_remote_code, need_tokenizer=True,
                           trust_inputs=config.trust_inputs, streamed=decision.stream, lazy_masks=True)
    dense_dir = config.model if prune_config is not None else dense_source(ckpt, config.dense)
    if config.dense is None:
        config.check_output(*inputs, dense_dir)
    reference = None
    if prune_config is None:
        try:
            reference = checkpoint.open(dense_dir, dtype=config.dtype, device="cpu", allow_pickle=config.allow_pickle,
                                        trust_remote_code=config.trust_remote_code, need_tokenizer=False,
                                        trust_inputs=config.trust_inputs, streamed=decision.stream, lazy_masks=True)
        except UsageError as exc:
            if not decision.stream:
                raise
            raise UsageError(f"--dense: {exc}; or use --streaming off") from exc
    # -----------------------------------------------------------------------------------
    if reference is not None:
        if shrunk is not None:
            shrinking.check_teacher(ckpt.model, reference.model, cfg.teacher_blocks)
        else:
            check_compatible(ckpt.model, reference.model)
        if not config.trust_inputs:
            checkpoint.check_source_weights(ckpt, dense_dir)
    if cfg.adapter_kind is not None:
        check_rank(ckpt.model, cfg.rank, cfg.adapter_targets)
    # the inputs, the dense targets and the block outputs
    check_activation_memory(ckpt.model, cfg.nsamples, cfg.seqlen, 3, cfg.offload_dir, "reconstruction")

    tokens, record = data.calibration(ckpt.require_tokenizer(), ckpt.model, cfg, cfg.seed)
    step = config.record("reconstruct", _args(config, dense_dir, record["seqlen"], decision))
    step.data = record

    # --- the library calls: reconstruct and write ------------------------------------
    prepare(ckpt, None if reference is None else reference.model, cfg)  # --add-biases: before the output is planned
    with checkpoint.writing(ckpt, config.output, step, overwrite=config.replace, max_shard_size=shard_bytes) as sink:
        outcome = reconstruct(ckpt, reference, tokens, cfg, prune=prune_config, blocks=sink.blocks)
        step.results = results = outcome.results()
        sink.finish(outcome.masks)
    # -----------------------------------------------------------------------------------
    return Outcome(results=results, data=record, streaming=decision.stream, dense=dense_dir)


def _args(config: Config, dense_dir: str, seqlen: int, decision: streaming.Decision) -> dict[str, Any]:
    """What perp.json records of the request."""
    cfg, prune_config = config.reconstruct, config.prune
    return {
        "model": config.model, "output": str(config.output), "dense": dense_dir, "target": cfg.target, "granularity": cfg.granularity,
        "train": cfg.train, "add_biases": cfg.add_biases, "adapter": cfg.adapter_kind or "none", "adapter_targets": cfg.adapter_targets,
        "rank": cfg.rank, "alpha": cfg.alpha, "calib": cfg.calib, "text_field": cfg.text_field, "nsamples": cfg.nsamples, "seqlen": seqlen,
        "calib_concat": cfg.calib_concat, "recipe": config.preset,
        **{k: getattr(cfg, k) for k in ("steps_per_block", "batch_size", "lr", "order", "mode", "restore")},
        "prune": None if prune_config is None else {k: v for k, v in vars(prune_config).items() if k not in ("quiet",)},
        "warmup": cfg.warmup, "schedule": "linear", "weight_decay": cfg.weight_decay,
        "offload_activations": cfg.offload, "max_memory": cfg.max_memory,
        "offload_dir": cfg.offload_dir, "device": cfg.device, "dtype": config.dtype,
        "streaming": decision.stream, "streaming_reason": decision.reason, "max_shard_size": config.max_shard_size,
    }
