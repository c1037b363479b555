"""The `perp merge` recipe: open the retrained checkpoint (in memory or streamed), fold
its adapters into the weights, check, write."""

from __future__ import annotations

from dataclasses import dataclass

from rich.markup import escape

from perp_cli import checkpoint, streaming
from perp_cli.errors import UsageError
from perp_cli.merging import MergeReport, merge
from perp_cli.progress import SILENT, Reporter, make_progress
from perp_cli import recipes
from perp_cli.recipes import Step


@dataclass(kw_only=True)
class Config(Step):
    allow_densify: bool = False
    device: str = "cpu"
    streaming: str = "auto"  # on | off | auto


@dataclass(kw_only=True)
class Outcome(recipes.Outcome):
    report: MergeReport


def run(config: Config, report: Reporter = SILENT) -> Outcome:
    shard_bytes = config.shard_bytes
    config.check_output()
    on_host = checkpoint.resolve_device(config.device).type == "cpu"
    if not on_host and config.streaming == "on":
        raise UsageError(f"--streaming on merges on the host; use --device cpu (not {config.device}) or --streaming off")
    decision = streaming.decide(config.streaming if on_host else "off", config.model, config.dtype)
    step = config.record("merge", {"model": config.model, "output": str(config.output), "allow_densify": config.allow_densify,
                                   "dtype": config.dtype, "device": config.device, "streaming": decision.stream,
                                   "streaming_reason": decision.reason, "max_shard_size": config.max_shard_size})
    # the seed only draws the probe inputs: the merge itself is deterministic arithmetic
    # --- the library calls ------------------------------------------------------------
    if decision.stream:
        report.note(escape(decision.reason))
    ckpt = checkpoint.open(config.model, dtype=config.dtype, device=config.device, allow_pickle=config.allow_pickle,
                           trust_remote_code=config.trust_remote_code, trust_inputs=config.trust_inputs,
                           streamed=decision.stream, lazy_masks=True, lazy_adapters=True)
    with checkpoint.writing(ckpt, config.output, step, overwrite=config.replace, max_shard_size=shard_bytes) as sink, \
            make_progress(report.quiet or not decision.stream) as progress:
        merged = merge(ckpt, allow_densify=config.allow_densify, seed=config.seed, blocks=sink.blocks, progress=progress)
        step.results = merged.results()
        sink.finish(ckpt.masks if merged.densified_density is None else None)
    # -----------------------------------------------------------------------------------
    return Outcome(results=step.results, streaming=decision.stream, report=merged)
