"""The `perp shrink` recipe: open MODEL, sample the calibration windows, score and cut,
write the smaller dense model."""

from __future__ import annotations

from dataclasses import dataclass

from perp_cli import checkpoint, data
from perp_cli.recipes import Outcome, Step, check_activation_memory
from perp_cli.shrinking import ShrinkConfig, shrink, validate


@dataclass(kw_only=True)
class Config(Step):
    shrink: ShrinkConfig


def run(config: Config) -> Outcome:
    cfg = config.shrink
    validate(cfg)  # usage errors before loading anything
    shard_bytes = config.shard_bytes
    config.check_output(cfg.calib)
    # --- the library calls ------------------------------------------------------------
    ckpt = checkpoint.open(config.model, dtype=config.dtype, device="cpu", allow_pickle=config.allow_pickle,
                           trust_remote_code=config.trust_remote_code, need_tokenizer=True, trust_inputs=config.trust_inputs)
    check_activation_memory(ckpt.model, cfg.nsamples, cfg.seqlen, 1, None, "calibration")
    step = config.record("shrink", {**vars(cfg), "model": config.model, "output": str(config.output), "dtype": config.dtype,
                                    "max_shard_size": config.max_shard_size})
    outcome = shrink(ckpt, cfg, lambda: data.calibration(ckpt.require_tokenizer(), ckpt.model, cfg, cfg.seed))
    step.data, step.results = outcome.data, outcome.results
    checkpoint.save(config.output, outcome.model, ckpt.tokenizer, None, manifest_in=ckpt.manifest, step=step,
                    overwrite=config.replace, max_shard_size=shard_bytes)
    # -----------------------------------------------------------------------------------
    return Outcome(results=outcome.results, data=outcome.data)
