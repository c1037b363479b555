"""The `perp prune` recipe: open MODEL (in memory or streamed), sample the calibration
windows when the method needs them, prune, write the output with its masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.markup import escape

from perp_cli import activations, checkpoint, data, reconstruction, streaming
from perp_cli.errors import UsageError
from perp_cli.progress import SILENT, Reporter
from perp_cli.pruner import PruneConfig, plan, prune, streaming_refusal
from perp_cli.recipes import Outcome, Step, check_activation_memory

CALIBRATED = ("wanda", "sparsegpt", "ria")


@dataclass(kw_only=True)
class Config(Step):
    prune: PruneConfig
    dense: str | None = None  # --method keep --refine: the dense model (default: the recorded source)
    streaming: str = "auto"  # on | off | auto


def run(config: Config, report: Reporter = SILENT) -> Outcome:
    cfg = config.prune
    if config.dense is not None and cfg.method != "keep":
        raise UsageError("--dense is for --method keep --refine (the dense values of the pruned weights)")
    plan(cfg)  # usage errors before loading anything
    shard_bytes = config.shard_bytes
    config.check_output(cfg.calib, cfg.offload_dir, *([config.dense] if config.dense else []))
    activations.check_offload_dir(cfg.offload_dir, config.output, [config.model])
    decision = streaming.decide(config.streaming, config.model, config.dtype, refusal=streaming_refusal(cfg))
    step = config.record("prune", {**vars(cfg), "model": config.model, "output": str(config.output), "dtype": config.dtype,
                                   "streaming": decision.stream, "streaming_reason": decision.reason,
                                   "max_shard_size": config.max_shard_size})
    calibrated = cfg.method in CALIBRATED or cfg.refine is not None or cfg.allocation == "owl"

    # --- the library calls ------------------------------------------------------------
    if decision.stream:
        report.note(escape(decision.reason))
    ckpt = checkpoint.open(config.model, dtype=config.dtype, device="cpu", allow_pickle=config.allow_pickle,
                           trust_remote_code=config.trust_remote_code, need_tokenizer=False,
                           trust_inputs=config.trust_inputs, streamed=decision.stream)
    if calibrated:
        check_activation_memory(ckpt.model, cfg.nsamples, cfg.seqlen, 1, cfg.offload_dir, "calibration")
    dense_model = _dense_model(ckpt, config) if cfg.method == "keep" else None
    with checkpoint.writing(ckpt, config.output, step, overwrite=config.replace, max_shard_size=shard_bytes) as sink:
        masks, results, data_record = prune(ckpt, cfg, tokens=_sampler(ckpt, cfg) if calibrated else None,
                                            dense=dense_model, blocks=sink.blocks, spool=sink.spool)
        del dense_model
        step.data, step.results = data_record, results
        sink.finish(masks)
    # -----------------------------------------------------------------------------------
    return Outcome(results=results, data=data_record, streaming=decision.stream)


def _sampler(ckpt: checkpoint.Checkpoint, cfg: PruneConfig) -> data.Windows:
    """The calibration windows, sampled once the pruner's own checks have passed."""
    return lambda: data.calibration(ckpt.require_tokenizer(), ckpt.model, cfg, cfg.seed)


def _dense_model(ckpt: checkpoint.Checkpoint, config: Config) -> Any:
    """--method keep --refine: the dense model (--dense, else the recorded source)."""
    if ckpt.masks is None:
        raise UsageError(f"--refine on {ckpt.source}: it has no masks.safetensors (prune it first, or pass a --method)")
    source = reconstruction.dense_source(ckpt, config.dense)
    model = checkpoint.open(source, dtype=config.dtype, device="cpu", trust_remote_code=config.trust_remote_code,
                            need_tokenizer=False, trust_inputs=config.trust_inputs).model
    reconstruction.check_compatible(ckpt.model, model)
    return model
