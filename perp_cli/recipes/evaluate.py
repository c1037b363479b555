"""The `perp eval` recipe: check the outputs, then open each checkpoint in turn (one in
memory at a time), score it (`evaluation.evaluate_checkpoint`), record if asked, and write
the JSON summary and the plot."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perp_cli import checkpoint
from perp_cli.errors import UsageError
from perp_cli.evaluation import EvalSettings, TokenCache, check_inputs, evaluate_checkpoint, load_sources
from perp_cli.plotting import check_plot_path, eval_bars
from perp_cli.progress import SILENT, Reporter


@dataclass
class Config:
    models: list[str]
    settings: EvalSettings
    output: Path | None = None  # all results as JSON
    plot: Path | None = None  # a bar chart
    inputs: list[str] = field(default_factory=list)  # besides the models: data files, task directories


@dataclass
class Outcome:
    summary: dict[str, Any]  # {"settings": ..., "results": [one per model]}

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.summary["results"]


def run(config: Config, report: Reporter = SILENT) -> Outcome:
    inputs = config.models + config.inputs
    if config.output is not None:
        check_output_file(config.output, inputs)
    if config.plot is not None:
        check_output_file(config.plot, inputs, "--plot")
        check_plot_path(config.plot)  # unsupported suffix or missing matplotlib: fail before any model loads
    results = evaluate_checkpoints(config.models, config.settings, report)
    summary = {"settings": config.settings.args(), "results": results}
    if config.output is not None:
        checkpoint.write_json_file(config.output, summary)
    if config.plot is not None:
        eval_bars(results, config.plot)
    return Outcome(summary)


def evaluate_checkpoints(models: list[str], settings: EvalSettings, report: Reporter = SILENT) -> list[dict[str, Any]]:
    """Evaluate each model in turn (one in memory at a time); record if asked."""
    check_inputs(models, settings)
    sources = load_sources(settings)
    if settings.tasks:
        from perp_cli.zeroshot import task_manager

        task_manager(settings.tasks, settings.include_path)  # unknown tasks fail before any model loads
    cache = TokenCache()
    results = []
    for model in models:
        ckpt = checkpoint.open(
            model, dtype=settings.dtype, device=settings.device, allow_pickle=settings.allow_pickle,
            trust_remote_code=settings.trust_remote_code, need_tokenizer=True,
            device_map=settings.device_map, offload_dir=settings.offload_dir, trust_inputs=settings.trust_inputs,
        )
        try:
            result = evaluate_checkpoint(ckpt, settings, sources, cache, report)
        finally:
            del ckpt
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        record = result.pop("record")
        if settings.record:
            checkpoint.record_eval(model, record)
        results.append(result)
    return results


def check_output_file(output: Path, models: list[str], flag: str = "--output") -> None:
    """Usage errors for a results file that cannot be written, or would land on or inside an input."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(output)):
        raise UsageError(f"{flag} {str(output)!r} contains a newline or another control character; choose another name")
    target = output.expanduser().resolve()
    if target.is_dir():
        raise UsageError(f"{flag} {output} is a directory; give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"{flag} {output}: directory {target.parent} does not exist")
    for model in models:
        path = Path(model).expanduser()
        if path.exists() and path.resolve() == target:
            raise UsageError(f"{flag} {output} is the input {model}; eval never overwrites its inputs")
        if path.is_dir() and path.resolve() in target.parents:
            raise UsageError(f"{flag} {output} is inside the checkpoint {model}; eval never writes into a checkpoint")
