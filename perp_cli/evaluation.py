"""Evaluate several checkpoints with one protocol and line them up for comparison.

`perp eval dense pruned retrained` answers "what did each step cost or recover?", so
every directory is scored on the same token streams (tokenized once per tokenizer),
the same windows and the same tasks, one model in memory at a time. Each result carries
what the manifest says about the model (sparsity, the share of parameters retraining
touched) and exactly what was measured (data hashes, BOS, windows), so numbers can be
compared with the papers and with each other.

A directory with unmerged adapters is scored with its adapters attached. Evaluation
never writes to a checkpoint, except `record=True`, which appends the results to its
`perp.json` (see `checkpoint.record_eval`).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perp_cli import arch, checkpoint
from perp_cli.checkpoint import Checkpoint
from perp_cli.data import TextSource, default_seqlen, describe_tokens, load_source
from perp_cli.errors import CheckpointError, UsageError
from perp_cli.manifest import StepRecord
from perp_cli.perplexity import eval_token_ids, perplexity, resolve_add_bos
from perp_cli.progress import SILENT, Reporter


@dataclass
class EvalSettings:
    """Everything that defines an evaluation (recorded with its results)."""

    datasets: list[str] = field(default_factory=list)
    split: str = "test"
    text_field: str = "text"
    seqlen: int | None = None
    batch_size: int = 1
    max_windows: int | None = None
    add_bos: bool | None = None
    tasks: list[str] = field(default_factory=list)
    limit: float | None = None
    include_path: str | None = None
    num_fewshot: int | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    offload_dir: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    trust_inputs: bool = False
    record: bool = False
    quiet: bool = True

    def validate(self) -> None:
        if not self.datasets and not self.tasks:
            raise UsageError("nothing to evaluate: give --dataset and/or --tasks")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_windows is not None and self.max_windows < 1:
            raise UsageError(f"--max-windows must be at least 1, got {self.max_windows}")
        if self.seqlen is not None and self.seqlen < 2:
            raise UsageError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"--limit must be positive, got {self.limit}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise UsageError(f"--include-path {self.include_path} is not a directory")
        if len(set(dataset_labels(self.datasets))) != len(self.datasets):
            raise UsageError("the same --dataset is given twice")
        if self.device_map is not None and self.device != "auto":
            raise UsageError("give --device or --device-map, not both")
        checkpoint.device_map_kwargs(self.device_map, self.offload_dir)

    def args(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("quiet", "record")}


def dataset_labels(datasets: list[str]) -> list[str]:
    """Short column names: `wikitext2`, `c4`, or a file's name (its path if names clash)."""
    names = [d if d in ("wikitext2", "c4") else Path(d).name for d in datasets]
    return [n if names.count(n) == 1 else d for n, d in zip(names, datasets)]


def check_inputs(models: list[str], settings: EvalSettings) -> None:
    """Fail before any model is loaded: a typo in the third directory should not cost the
    first two evaluations. Missing inputs are usage errors (exit 2)."""
    settings.validate()
    for model in models:
        path = Path(model).expanduser()
        local = path.exists() or checkpoint.looks_local(model)
        if local and not path.is_dir():
            raise UsageError(f"{model}: no such directory")
        if settings.record:
            if not local:
                raise UsageError(f"--record writes into a local checkpoint directory; {model} is a hub id")
            if not os.access(path, os.W_OK):
                raise UsageError(f"--record: {model} is not writable")


def load_sources(settings: EvalSettings) -> dict[str, TextSource]:
    """Each --dataset read once, keyed by its label."""
    return {
        label: load_source(name, settings.split, settings.text_field)
        for label, name in zip(dataset_labels(settings.datasets), settings.datasets)
    }


def measured_sparsity(model: torch.nn.Module) -> float:
    """Fraction of exact zeros over the prunable matrices (each tensor counted once;
    weights a device map offloaded are read one module at a time)."""
    seen: dict[str, torch.Tensor] = {}
    for m in arch.matrices(model):
        seen.setdefault(m.name, m.parameter)
    total = sum(p.numel() for p in seen.values())
    zeros = 0
    for name, p in seen.items():
        with checkpoint.resident(model, name, p) as values:
            zeros += int((values.detach() == 0).sum())
    return zeros / total if total else 0.0


def placement(model: torch.nn.Module) -> str:
    """Where the model computes: one device, or a device map's devices in order."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return str(next(model.parameters()).device)
    return ",".join(dict.fromkeys(str(d) for d in device_map.values()))


def manifest_sparsity(manifest: dict[str, Any]) -> float | None:
    total = (manifest.get("sparsity") or {}).get("total")
    return float(total) if isinstance(total, (int, float)) else None


def trainable_share(manifest: dict[str, Any]) -> float | None:
    """`results.trainable_share` of the last step that reported it (the last retrain)."""
    for step in reversed(manifest.get("history", [])):
        share = (step.get("results") or {}).get("trainable_share")
        if isinstance(share, (int, float)):
            return float(share)
    return None


def attach_adapters(ckpt: Checkpoint) -> None:
    """Wrap the model with its saved adapters, so it is scored as `retrain` left it."""
    if ckpt.adapters is None:
        return
    if checkpoint.offloaded_parameters(ckpt.model):
        raise UsageError(
            f"{ckpt.source} has unmerged adapters, which cannot wrap weights a device map offloaded to CPU/disk; "
            "run `perp merge` on it first, or use more GPUs"
        )
    try:
        from perp_cli.adapters import attach_from_checkpoint
    except ImportError as exc:
        raise CheckpointError(
            f"{ckpt.source} has unmerged adapters, which this build of perp cannot apply yet; "
            "run `perp merge` on it first"
        ) from exc
    attach_from_checkpoint(ckpt)


def _adapters_summary(config: dict[str, Any] | None) -> dict[str, Any]:
    """adapters.json without the (long) list of matrices, which becomes a count."""
    config = dict(config or {})
    matrices = config.pop("matrices", None)
    if isinstance(matrices, list):
        config["matrices"] = len(matrices)
    return config


def _tokenizer_key(tokenizer: Any) -> str:
    """Identify a tokenizer's behaviour, so directories sharing one tokenize only once."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"id:{id(tokenizer)}"
    text = backend.to_str() + repr((type(tokenizer).__name__, tokenizer.bos_token_id))
    return hashlib.sha256(text.encode()).hexdigest()


class TokenCache:
    """Evaluation token streams by (dataset, tokenizer, seqlen, BOS)."""

    def __init__(self) -> None:
        self._ids: dict[tuple, torch.Tensor] = {}

    def get(self, label: str, source: TextSource, tokenizer: Any, seqlen: int, add_bos: bool | None) -> torch.Tensor:
        key = (label, _tokenizer_key(tokenizer), seqlen if not source.stream else None, add_bos)
        if key not in self._ids:
            self._ids[key] = eval_token_ids(tokenizer, source, seqlen, add_bos)
        return self._ids[key]


def evaluate_checkpoint(
    ckpt: Checkpoint,
    settings: EvalSettings,
    sources: dict[str, TextSource],
    cache: TokenCache | None = None,
    report: Reporter = SILENT,
) -> dict[str, Any]:
    """Perplexity on every source and lm-eval tasks for one loaded checkpoint; each
    perplexity is told to `report` as soon as it is known."""
    cache = cache or TokenCache()
    step = StepRecord(command="eval", args=settings.args(), input=ckpt.source, seed=settings.seed)
    model = ckpt.model
    sparsity = manifest_sparsity(ckpt.manifest)
    result: dict[str, Any] = {
        "model": ckpt.source,
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": placement(model),
        "sparsity": sparsity if sparsity is not None else measured_sparsity(model),
        "sparsity_from": "manifest" if sparsity is not None else "measured",
        "trainable_share": trainable_share(ckpt.manifest),
        "adapters": _adapters_summary(ckpt.adapters_config) if ckpt.adapters is not None else None,
        "perplexity": {},
        "zeroshot": None,
    }
    attach_adapters(ckpt)

    if sources:
        tokenizer = ckpt.require_tokenizer()
        seqlen = default_seqlen(model, settings.seqlen)
        bos = resolve_add_bos(tokenizer, settings.add_bos)
        for label, source in sources.items():
            ids = cache.get(label, source, tokenizer, seqlen, settings.add_bos)
            started = time.time()
            ppl = perplexity(model, ids, seqlen, settings.batch_size, settings.max_windows, settings.quiet, description=f"ppl {label}")
            step.data[label] = describe_tokens(source, ids)
            result["perplexity"][label] = {
                **ppl.to_json(),
                "add_bos": bos,
                "max_windows": settings.max_windows,
                "protocol": "wikitext (rows joined with blank lines)" if source.stream else "c4 (first 1100 documents, 256 x seqlen tokens)",
                "source": source.name,
                "source_sha256": source.sha256,
                "token_ids_sha256": step.data[label]["token_ids_sha256"],
                "seconds": round(time.time() - started, 2),
            }
            report.note(f"{ckpt.source} · {label}: perplexity {ppl.ppl:.2f} ({ppl.windows} windows of {seqlen})")

    if settings.tasks:
        from perp_cli.zeroshot import zero_shot

        zs = zero_shot(
            model, ckpt.require_tokenizer(), settings.tasks, batch_size=settings.batch_size, limit=settings.limit,
            include_path=settings.include_path, num_fewshot=settings.num_fewshot, seed=settings.seed,
        )
        result["zeroshot"] = zs.to_json()

    step.results = {"perplexity": result["perplexity"], "zeroshot": result["zeroshot"]}
    result["record"] = step.finish()
    return result


def comparison_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table: one row per model; ppl per dataset, sparsity, trainable
    share, accuracy per task and the mean. Returns (header, rows) as strings."""
    datasets = list(dict.fromkeys(label for r in results for label in r["perplexity"]))
    tasks = list(dict.fromkeys(t for r in results if r["zeroshot"] for t in r["zeroshot"]["requested"]))
    header = ["model", "sparsity", "trainable"] + [f"ppl {d}" for d in datasets]
    if tasks:
        header += tasks + ["mean acc"]
    rows = []
    for r in results:
        row = [
            r["model"],
            f"{r['sparsity']:.2%}",
            "-" if r["trainable_share"] is None else f"{r['trainable_share']:.3%}",
        ]
        row += [f"{r['perplexity'][d]['ppl']:.2f}" if d in r["perplexity"] else "-" for d in datasets]
        if tasks:
            zs = r["zeroshot"] or {"tasks": {}, "mean_acc": None}
            for t in tasks:
                acc = zs["tasks"].get(t, {}).get("acc")
                row.append("-" if acc is None else f"{acc:.4f}")
            row.append("-" if zs["mean_acc"] is None else f"{zs['mean_acc']:.4f}")
        rows.append(row)
    return header, rows
