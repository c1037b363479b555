"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on the loaded model.

The papers (Wanda, SparseGPT, PERP) report lm-eval accuracy on BoolQ, RTE, HellaSwag,
WinoGrande, ARC-e, ARC-c and OpenBookQA (`PAPER_TASKS`). We hand lm-eval the model
already in memory (`HFLM(pretrained=model, tokenizer=tok)`) instead of a path, so a
checkpoint with unmerged adapters is scored exactly as perp runs it, and nothing is
loaded twice. Any lm-eval task works, including local ones: a task YAML in
`include_path` whose data is a local file runs fully offline.

lm-eval is optional (`pip install 'perp[eval]'`); it is imported only here, lazily.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from perp_cli.errors import DataError, PerpError, UsageError
from perp_cli.perplexity import evaluation_mode

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc", "acc_norm")


class MissingExtra(PerpError):
    """An optional dependency is not installed."""

    exit_code = 1


def require_lm_eval() -> Any:
    """The `lm_eval` module, or a one-line error saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails on a broken install)
    except ImportError as exc:
        raise MissingExtra(
            f"zero-shot tasks need lm-evaluation-harness, which is not installed ({exc}); "
            "run: pip install 'perp[eval]'"
        ) from exc
    return lm_eval


@dataclass
class ZeroShotResult:
    """Per-task metrics (acc, acc_stderr, acc_norm, acc_norm_stderr, samples) and their mean.

    `mean_acc` averages `acc` over the requested tasks that define it, as the papers'
    "mean zero-shot accuracy" does.
    """

    tasks: dict[str, dict[str, Any]]
    mean_acc: float | None
    limit: float | None
    lm_eval_version: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "mean_acc": self.mean_acc,
            "limit": self.limit,
            "lm_eval_version": self.lm_eval_version,
            **self.settings,
        }


def parse_tasks(values: list[str] | None) -> list[str]:
    """`--tasks a,b --tasks c` -> [a, b, c]; `paper` expands to the papers' seven tasks."""
    out: list[str] = []
    for value in values or []:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            for task in PAPER_TASKS if name == "paper" else (name,):
                if task not in out:
                    out.append(task)
    return out


def task_manager(tasks: list[str], include_path: str | None = None) -> Any:
    """An lm-eval TaskManager that knows `tasks`, or a usage error naming the unknown ones.

    Indexing lm-eval's ~15k built-in task files takes seconds, so when every requested
    task is found in `include_path` alone the built-ins are not indexed, and a manager is
    built once per (tasks, include_path) and reused for every model.
    """
    require_lm_eval()
    return _task_manager(tuple(tasks), include_path)


@functools.lru_cache(maxsize=4)
def _task_manager(tasks: tuple[str, ...], include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        manager = None
        if include_path is not None:
            local = TaskManager(include_path=include_path, include_defaults=False)
            if all(t in local.all_tasks for t in tasks):
                manager = local
        if manager is None:
            manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (built-in or in {include_path})" if include_path else " (pass --include-path for local task YAMLs)"
        raise UsageError(f"unknown lm-eval task(s): {', '.join(unknown)}{where}")
    return manager


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs warnings meant for its own CLI; keep only errors, and keep stdout clean
    (our --json goes there)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _task_metrics(entry: dict[str, Any], samples: int | None) -> dict[str, Any]:
    """lm-eval's `{"acc,none": .., "acc_stderr,none": ..}` -> `{"acc": .., "acc_stderr": ..}`."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        if _number(value) is not None:
            out[name] = _number(value)
    out["samples"] = samples
    return out


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    batch_size: int = 1,
    limit: float | None = None,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> ZeroShotResult:
    """Run lm-eval `tasks` on the in-memory model and collect accuracy per task and the mean.

    `limit` caps the documents per task (an int, or a fraction < 1) for quick runs;
    papers use none. lm-eval's own seeds are fixed from `seed`, so repeated runs agree.
    """
    if not tasks:
        raise UsageError("--tasks names no task")
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be positive, got {limit}")
    lm_eval = require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include_path)
    lm_limit = None if limit is None else (int(limit) if limit >= 1 else float(limit))
    with _quiet_lm_eval(), evaluation_mode(model):  # HFLM switches the model to eval mode
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=lm_limit,
                task_manager=manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (UsageError, DataError):
            raise
        except Exception as exc:  # dataset download failures, task config errors, ...
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"lm-eval could not run {', '.join(tasks)}: {text} "
                "(hub tasks need network access to download their data once)"
            ) from exc
    if out is None:
        raise DataError("lm-eval returned no results")
    samples = {name: (n.get("effective") if isinstance(n, dict) else n) for name, n in out.get("n-samples", {}).items()}
    per_task = {name: _task_metrics(entry, samples.get(name)) for name, entry in out["results"].items()}
    accs = [per_task[t]["acc"] for t in tasks if t in per_task and "acc" in per_task[t]]
    return ZeroShotResult(
        tasks=per_task,
        mean_acc=sum(accs) / len(accs) if accs else None,
        limit=limit,
        lm_eval_version=getattr(lm_eval, "__version__", "unknown"),
        settings={"num_fewshot": num_fewshot, "seed": seed, "batch_size": batch_size, "requested": list(tasks)},
    )
