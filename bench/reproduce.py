"""Reproduce PERP's Figure 1 on real checkpoints: perplexity after pruning and recovery.

    python bench/reproduce.py                    # ../shared/models/{tiny-opt,stories260K}, full grid
    python bench/reproduce.py --quick            # < 10 minutes on 2 CPU cores (see bench/README.md)
    python bench/reproduce.py --model DIR --calib c4.jsonl --eval-data wiki.test.raw
    python bench/reproduce.py --report-only      # rebuild results/ from the cached cells

The grid is models x pruning methods (magnitude, wanda, sparsegpt) x sparsities (50%, 60%,
70%, 2:4) x recoveries:

    none          the pruned model as it is
    biases+norms  `perp retrain --train biases,norms` (PERP's headline subset)
    norms         `perp retrain --train norms`
    masklora      `perp retrain --train biases,norms --adapter masklora`, then `perp merge`
    scalelora     `perp retrain --train biases,norms --adapter scalelora`, then `perp merge`
    full          `perp retrain --train all` (full retraining, pruned weights stay 0)
    reconstruct   `perp reconstruct` (biases+norms+MaskLoRA per block against the dense block)

The LoRA variants train biases and norms alongside the adapters, as the paper's reference
code does by default (SelectivePEFT with biases, LN and the adapters; its default also
trains lm_head, which we leave out: both shared models tie it to the input embeddings, so
it would add a quarter of tiny-opt's parameters). Models without biases (LLaMA) get
zero-initialised ones (`--add-biases`) wherever biases train.

Every retraining recovery sees the same token budget (`--steps` x `--batch-size` x
`--seqlen` tokens of the training text, a peak lr per recovery (`TUNED_LR`, `--lr`), 10% warmup, linear decay, AdamW, seed
0); reconstruction trains `--rec-steps` x `--rec-batch` x `--seqlen` tokens per block from
`--nsamples` calibration windows. Perplexity: the WikiText-2 test rows joined with blank
lines, the first `--windows` non-overlapping windows of `--eval-seqlen` tokens.

Only perp's public CLI runs the steps (`perp_cli.cli.app.main`, in-process, `--json`).
Every finished cell is a JSON file under `--work` (and every pruned model a checkpoint
directory reused by all its recoveries), keyed by a hash of everything that determines
it: an interrupted run resumes where it stopped, and a changed setting recomputes only
what it changes. Outputs in `--out`: results.csv, results.md and the PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on shared cores

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (the tests)
from common import C4_SAMPLE, ROOT, STORIES260K, TINY_OPT, WIKITEXT2_TEST, cache_dir  # noqa: E402

DEFAULT_MODELS = [TINY_OPT, STORIES260K]
DEFAULT_CALIB = C4_SAMPLE
DEFAULT_EVAL = WIKITEXT2_TEST
DEFAULT_WORK = cache_dir("reproduce")

METHODS = ["magnitude", "wanda", "sparsegpt"]
SETTINGS = ["0.5", "0.6", "0.7", "2:4"]


# ----------------------------------------------------------------------------- what is run


@dataclass(frozen=True)
class Recovery:
    """One way to recover a pruned model, as perp commands."""

    name: str
    kind: str  # "none" | "retrain" | "reconstruct"
    train: str = ""
    adapter: str = "none"


RECOVERIES = {
    r.name: r
    for r in [
        Recovery("none", "none"),
        Recovery("biases+norms", "retrain", "biases,norms"),
        Recovery("norms", "retrain", "norms"),
        Recovery("masklora", "retrain", "biases,norms", "masklora"),
        Recovery("scalelora", "retrain", "biases,norms", "scalelora"),
        Recovery("full", "retrain", "all"),
        Recovery("reconstruct", "reconstruct", "biases,norms", "masklora"),
    ]
}


@dataclass(frozen=True)
class Variant:
    """How one row of the methods study makes its pruned model: `perp prune --method
    METHOD` with extra flags, optionally followed by `perp reconstruct` (biases+norms+
    MaskLoRA at the study's reconstruction budget) at a granularity. The recoveries then
    run on that model. A plain method name is the variant with no extra flags."""

    name: str
    method: str
    prune_args: tuple[str, ...] = ()
    reconstruct: str | None = None  # None, "block" or "sublayer": `perp reconstruct --granularity`
    settings: tuple[str, ...] = ()  # where the methods study runs it
    baseline: str | None = None  # the variant it is compared with
    what: str = ""

    @property
    def options(self) -> dict[str, list[str]]:
        """The command-line options each perp command of this variant needs, by command."""
        out = {"prune": [a for a in self.prune_args if a.startswith("--")]}
        if self.reconstruct == "sublayer":
            out["reconstruct"] = ["--granularity"]
        return out


# The methods study (issue 15): each row against its baseline, on both shared checkpoints.
# RIA+permute only at 2:4: the permutation only decides which inputs share an N:M group.
METHOD_VARIANTS = {
    v.name: v
    for v in [
        Variant("wanda", "wanda", settings=("0.5", "0.6", "0.7", "0.8", "2:4"), what="uniform Wanda (baseline)"),
        Variant("sparsegpt", "sparsegpt", settings=("0.6", "0.7", "0.8"), what="uniform SparseGPT (baseline)"),
        Variant("owl-wanda", "wanda", ("--allocation", "owl"), settings=("0.6", "0.7", "0.8"), baseline="wanda",
                what="OWL layer-wise sparsity (M 5, lambda 0.08), Wanda"),
        Variant("owl-sparsegpt", "sparsegpt", ("--allocation", "owl"), settings=("0.6", "0.7", "0.8"), baseline="sparsegpt",
                what="OWL layer-wise sparsity (M 5, lambda 0.08), SparseGPT"),
        Variant("ria", "ria", settings=("0.5", "2:4"), baseline="wanda", what="RIA scores (a = 0.5)"),
        Variant("ria+permute", "ria", ("--permute",), settings=("2:4",), baseline="wanda", what="RIA with channel permutation"),
        Variant("dsnot-wanda", "wanda", ("--refine", "dsnot"), settings=("0.6", "0.7"), baseline="wanda",
                what="Wanda, then DSnoT prune-and-grow"),
        Variant("dsnot-sparsegpt", "sparsegpt", ("--refine", "dsnot"), settings=("0.6", "0.7"), baseline="sparsegpt",
                what="SparseGPT, then DSnoT prune-and-grow"),
        Variant("sparsegpt+rec-block", "sparsegpt", reconstruct="block", settings=("0.6", "0.7"), baseline="sparsegpt",
                what="SparseGPT, then block-wise reconstruction"),
        Variant("sparsegpt+rec-sublayer", "sparsegpt", reconstruct="sublayer", settings=("0.6", "0.7"), baseline="sparsegpt+rec-block",
                what="SparseGPT, then sublayer (attention/MLP) reconstruction"),
    ]
}
METHOD_SETTINGS = ["0.5", "0.6", "0.7", "0.8", "2:4"]
METHOD_RECOVERIES = ["none", "biases+norms", "masklora"]
STUDIES = ("results", "methods")


def variant(name: str) -> Variant:
    """The methods study's variant of that name, else the plain method."""
    return METHOD_VARIANTS.get(name) or Variant(name, name)


def perp_options(command: str) -> set[str]:
    """Every option name the installed `perp COMMAND` accepts."""
    import typer

    from perp_cli.cli.app import app

    group = typer.main.get_command(app)
    return {o for p in group.commands[command].params for o in getattr(p, "opts", [])}


def unavailable(v: Variant) -> str | None:
    """Why the installed perp cannot run this variant (None: it can)."""
    from perp_cli.pruning import METHODS as PRUNE_METHODS

    if v.method not in PRUNE_METHODS:
        return f"the installed perp has no `perp prune --method {v.method}`"
    for command, options in v.options.items():
        missing = [o for o in options if o not in perp_options(command)]
        if missing:
            return f"the installed `perp {command}` does not accept {missing[0]}"
    return None


@dataclass(frozen=True)
class Budget:
    """Everything numeric that defines a cell (part of its cache key)."""

    seqlen: int = 256  # calibration and training windows
    nsamples: int = 128  # calibration windows (Wanda, SparseGPT, reconstruction), as the references
    steps: int = 100  # retraining optimizer steps ...
    batch_size: int = 4  # ... of this many windows: 100 x 4 x 256 = 102,400 tokens
    lr: dict[str, float] = field(default_factory=lambda: dict(TUNED_LR))  # per retraining recovery
    rank: int = 16
    alpha: float = 32.0
    rec_steps: int = 100  # reconstruction steps per block ...
    rec_batch: int = 4  # ... of this many calibration windows (same tokens per block as retraining)
    rec_lr: float = 1e-3
    windows: int = 100  # WikiText-2 test windows ...
    eval_seqlen: int = 256  # ... of this many tokens
    seed: int = 0

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch_size * self.seqlen

    @property
    def rec_tokens(self) -> int:
        return self.rec_steps * self.rec_batch * self.seqlen


# AdamW peak learning rate of each retraining recovery, chosen from {5e-4, 2e-3, 5e-3}
# ({3e-5, 1e-4, 5e-4} for full retraining) by the sum of tiny-opt's perplexities after
# magnitude pruning to 50% and 70% at the default budget (see docs/results.md).
TUNED_LR = {"biases+norms": 2e-3, "norms": 5e-3, "masklora": 2e-3, "scalelora": 2e-3, "full": 1e-4}

QUICK_BUDGET = Budget(nsamples=32, steps=25, rec_steps=25, windows=25)
QUICK_METHODS = ["magnitude", "sparsegpt"]
QUICK_SETTINGS = ["0.5", "0.7"]


@dataclass
class Grid:
    models: list[Path]
    calib: Path
    train_data: Path
    eval_data: Path
    work: Path
    out: Path
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    recoveries: list[str] = field(default_factory=lambda: list(RECOVERIES))
    budget: Budget = field(default_factory=Budget)
    keep_checkpoints: bool = False
    dense_controls: bool = True
    command: str = ""
    study: str = "results"  # "results" (PERP's Figure 1) or "methods" (issue 15's methods against their baselines)

    def cells(self) -> list[tuple[Path, str, str, str]]:
        """(model, method, setting, recovery) in run order: per model, the dense controls
        (the unpruned model with the same retraining), then all recoveries of one pruned
        model together, so it is pruned once."""
        out = []
        for m in self.models:
            if self.dense_controls:
                out += [(m, "dense", "0", r) for r in self.recoveries if RECOVERIES[r].kind == "retrain"]
            out += [(m, meth, s, r) for s in self.settings for meth in self.methods for r in self.recoveries
                    if self.study != "methods" or s in variant(meth).settings]
        return out


def setting_label(setting: str) -> str:
    return setting if ":" in setting else f"{float(setting):.0%}"


def setting_args(setting: str) -> list[str]:
    return ["--pattern", setting] if ":" in setting else ["--sparsity", setting]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "+-." else "_" for c in text)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


_CONTENT_IDS: dict[tuple[str, int, int], str] = {}


def _content_id(path: Path) -> str:
    """sha256 of a file (first 16 hex digits), computed once per process per version."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _CONTENT_IDS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _CONTENT_IDS[memo] = digest.hexdigest()[:16]
    return _CONTENT_IDS[memo]


def _file_id(path: Path) -> dict[str, Any]:
    """Identify a model directory or data file by content (names, sizes, sha256) for cache
    keys: a copy, a fresh checkout or a remount with new mtimes reuses the cache, and any
    changed byte invalidates it."""
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"path": str(path), "files": [(p.name, p.stat().st_size, _content_id(p)) for p in files]}


# ----------------------------------------------------------------------------- running perp


class Runner:
    """Runs `perp ...` in-process through the public entry point and returns its --json.

    `commands` lists every command run (tests use it to check that cached cells run
    nothing). A nonzero exit raises `StepFailed`; exit 130 (Ctrl-C) raises KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, *args: str) -> dict[str, Any]:
        from perp_cli.cli.app import main

        argv = [str(a) for a in args]
        self.commands.append(argv)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(argv)
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            raise StepFailed(f"`perp {' '.join(argv[:2])} ...` exited {code}")
        text = out.getvalue().strip()
        return json.loads(text) if text else {}


class StepFailed(RuntimeError):
    """A perp command exited nonzero (its one-line error is already on stderr)."""


def model_needs_biases(model: Path) -> bool:
    """True when the model has no projection biases (LLaMA): biases must be added to train them."""
    from perp_cli import arch, checkpoint

    ckpt = checkpoint.open(str(model), device="cpu", need_tokenizer=False)
    return not arch.bias_parameters(ckpt.model)


class Study:
    """The grid's state on disk: pruned checkpoints and one JSON per finished cell."""

    def __init__(self, grid: Grid, run: Runner) -> None:
        self.grid, self.run, self.b = grid, run, grid.budget
        self._needs_biases: dict[Path, bool] = {}

    # -- keys and paths
    def model_dir(self, model: Path) -> Path:
        return self.grid.work / f"{_slug(model.name)}-{_digest(str(model.resolve()))[:6]}"

    def eval_key(self, model: Path) -> dict[str, Any]:
        return {"model": _file_id(model), "eval": _file_id(self.grid.eval_data), "windows": self.b.windows, "eval_seqlen": self.b.eval_seqlen}

    def prune_key(self, model: Path, method: str, setting: str) -> dict[str, Any]:
        if method == "dense":
            return {"model": _file_id(model), "method": "dense"}
        v = variant(method)
        key = {"model": _file_id(model), "method": v.method, "setting": setting, "seed": self.b.seed}
        if self.needs_calibration(v):
            key |= {"calib": _file_id(self.grid.calib), "nsamples": self.b.nsamples, "seqlen": self.b.seqlen}
        if v.prune_args:
            key["prune_args"] = list(v.prune_args)
        if v.reconstruct:
            key["reconstruct"] = {"granularity": v.reconstruct, **self.reconstruct_key()}
        return key

    @staticmethod
    def needs_calibration(v: Variant) -> bool:
        return v.method not in ("magnitude", "random") or bool(v.prune_args)

    def reconstruct_key(self) -> dict[str, Any]:
        return {"calib": _file_id(self.grid.calib), "nsamples": self.b.nsamples, "seqlen": self.b.seqlen,
                "rec_steps": self.b.rec_steps, "rec_batch": self.b.rec_batch, "rec_lr": self.b.rec_lr,
                "rank": self.b.rank, "alpha": self.b.alpha}

    def cell_key(self, model: Path, method: str, setting: str, recovery: Recovery) -> dict[str, Any]:
        key = {"prune": self.prune_key(model, method, setting), "eval": self.eval_key(model), "recovery": asdict(recovery)}
        if recovery.kind == "retrain":
            key |= {"data": _file_id(self.grid.train_data), "steps": self.b.steps, "batch_size": self.b.batch_size,
                    "seqlen": self.b.seqlen, "lr": self.retrain_lr(recovery)}
        if recovery.kind == "reconstruct":
            key |= {"calib": _file_id(self.grid.calib), "nsamples": self.b.nsamples, "seqlen": self.b.seqlen,
                    "rec_steps": self.b.rec_steps, "rec_batch": self.b.rec_batch, "rec_lr": self.b.rec_lr}
        if recovery.adapter != "none":
            key |= {"rank": self.b.rank, "alpha": self.b.alpha}
        return key

    def pruned_path(self, model: Path, method: str, setting: str) -> Path:
        return self.model_dir(model) / "pruned" / f"{method}-{_slug(setting)}-{_digest(self.prune_key(model, method, setting))}"

    def cell_path(self, model: Path, method: str, setting: str, recovery: Recovery) -> Path:
        key = _digest(self.cell_key(model, method, setting, recovery))
        return self.model_dir(model) / "cells" / f"{method}-{_slug(setting)}-{_slug(recovery.name)}-{key}.json"

    def dense_path(self, model: Path) -> Path:
        return self.model_dir(model) / "cells" / f"dense-{_digest(self.eval_key(model))}.json"

    def retrain_lr(self, recovery: Recovery) -> float:
        return self.b.lr[recovery.name]

    # -- steps
    def needs_biases(self, model: Path) -> bool:
        if model not in self._needs_biases:
            self._needs_biases[model] = model_needs_biases(model)
        return self._needs_biases[model]

    def evaluate(self, directory: Path) -> dict[str, Any]:
        started = time.time()
        out = self.run("eval", directory, "--dataset", self.grid.eval_data, "--seqlen", self.b.eval_seqlen,
                       "--max-windows", self.b.windows, "--batch-size", 8, "--seed", self.b.seed, "--quiet", "--json")
        result = out["results"][0]
        ppl = next(iter(result["perplexity"].values()))
        return {"perplexity": ppl["ppl"], "sparsity": result["sparsity"], "eval_windows": ppl["windows"],
                "eval_tokens": ppl.get("tokens"), "eval_s": round(time.time() - started, 2)}

    def dense(self, model: Path) -> dict[str, Any]:
        path = self.dense_path(model)
        if path.exists():
            return json.loads(path.read_text())
        row = {"model": model.name, "method": "dense", "setting": "0%", "recovery": "none", **self.evaluate(model),
               "trainable_parameters": 0, "trainable_share": 0.0, "train_tokens": 0, "recover_s": 0.0, "prune_s": 0.0}
        _write_json(path, row)
        return row

    def pruned(self, model: Path, method: str, setting: str) -> tuple[Path, float]:
        """The pruned checkpoint (pruned now, or reused) and the time its pruning took."""
        if method == "dense":
            return model, 0.0
        path = self.pruned_path(model, method, setting)
        sidecar = path.with_name(path.name + ".json")
        if path.is_dir() and sidecar.exists():
            return path, json.loads(sidecar.read_text())["prune_s"]
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        v = variant(method)
        first = path.with_name(path.name + ".pruned") if v.reconstruct else path
        shutil.rmtree(first, ignore_errors=True)
        args = ["prune", model, "-o", first, "--method", v.method, *setting_args(setting), *v.prune_args,
                "--seed", self.b.seed, "--quiet", "--json"]
        if self.needs_calibration(v):
            args += ["--calib", self.grid.calib, "--nsamples", self.b.nsamples, "--seqlen", self.b.seqlen]
        started = time.time()
        self.run(*args)
        if v.reconstruct:  # the variant's model is the reconstructed one; the recoveries start from it
            try:
                self.run(*self.reconstruct_args(model, first, path, "biases,norms", "masklora", v.reconstruct))
            finally:
                shutil.rmtree(first, ignore_errors=True)
        prune_s = round(time.time() - started, 2)
        _write_json(sidecar, {"prune_s": prune_s, "key": self.prune_key(model, method, setting)})
        return path, prune_s

    def reconstruct_args(self, model: Path, pruned: Path, out: Path, train: str, adapter: str, granularity: str = "block") -> list[Any]:
        """`perp reconstruct` of `pruned` against `model` at the study's budget."""
        b = self.b
        args = ["reconstruct", pruned, "-o", out, "--dense", model, "--train", train, "--adapter", adapter,
                "--rank", b.rank, "--alpha", b.alpha, "--calib", self.grid.calib, "--nsamples", b.nsamples,
                "--seqlen", b.seqlen, "--steps-per-block", b.rec_steps, "--batch-size", b.rec_batch, "--lr", b.rec_lr,
                "--seed", b.seed, "--overwrite", "--quiet", "--json"]
        if granularity != "block":  # block is the default (and the only one before issue 15)
            args += ["--granularity", granularity]
        if "biases" in train.split(",") and self.needs_biases(pruned):
            args.append("--add-biases")
        return args

    def recover(self, model: Path, pruned: Path, recovery: Recovery, out: Path) -> dict[str, Any]:
        """Run one recovery into `out`; return what it trained and how long it took.

        On the dense model (a control) there is no mask: MaskLoRA with an all-ones mask is
        plain LoRA, so it runs as `--adapter lora` and merges with `--allow-densify`."""
        b = self.b
        dense = pruned == model
        adapter = "lora" if dense and recovery.adapter == "masklora" else recovery.adapter
        add_biases = "biases" in recovery.train.split(",") and self.needs_biases(pruned)  # a reconstructed variant already has them
        started = time.time()
        if recovery.kind == "retrain":
            adapted = out.with_name(out.name + ".adapted") if recovery.adapter != "none" else out
            args = ["retrain", pruned, "-o", adapted, "--train", recovery.train, "--data", self.grid.train_data,
                    "--seqlen", b.seqlen, "--batch-size", b.batch_size, "--steps", b.steps, "--lr", self.retrain_lr(recovery),
                    "--seed", b.seed, "--overwrite", "--quiet", "--json"]
            if recovery.adapter != "none":
                args += ["--adapter", adapter, "--rank", b.rank, "--alpha", b.alpha]
            if add_biases:
                args.append("--add-biases")
            res = self.run(*args)
            info = {"trainable_parameters": res["trainable_parameters"], "trainable_share": res["trainable_share"],
                    "train_tokens": res["tokens_seen"], "final_loss": res.get("final_loss")}
            if recovery.adapter != "none":
                merged = self.run("merge", adapted, "-o", out, "--overwrite", "--quiet", "--json", *(["--allow-densify"] if adapter == "lora" else []))
                info["merge_max_abs_diff"] = merged.get("max_abs_diff")
                shutil.rmtree(adapted, ignore_errors=True)
        elif recovery.kind == "reconstruct":
            res = self.run(*self.reconstruct_args(model, pruned, out, recovery.train, recovery.adapter))
            info = {"trainable_parameters": res["trainable_parameters"],
                    "trainable_share": res["trainable_parameters"] / res["total_parameters"],
                    "train_tokens": sum(blk["tokens"] for blk in res["blocks"]),
                    "restored_blocks": len(res.get("restored_blocks") or [])}
        else:
            raise ValueError(recovery.kind)
        info["added_biases"] = add_biases
        info["recover_s"] = round(time.time() - started, 2)
        return info

    def cell(self, model: Path, method: str, setting: str, recovery: Recovery) -> tuple[dict[str, Any], bool]:
        """A finished cell's row (from the cache or computed now) and whether it was cached."""
        path = self.cell_path(model, method, setting, recovery)
        if path.exists():
            return json.loads(path.read_text()), True
        pruned, prune_s = self.pruned(model, method, setting)
        row: dict[str, Any] = {"model": model.name, "method": method, "setting": setting_label(setting),
                               "recovery": recovery.name, "prune_s": prune_s}
        if recovery.kind == "none":
            row |= {"trainable_parameters": 0, "trainable_share": 0.0, "train_tokens": 0, "recover_s": 0.0, **self.evaluate(pruned)}
        else:
            out = self.model_dir(model) / "recovered" / path.stem
            try:
                row |= self.recover(model, pruned, recovery, out)
                row |= self.evaluate(out)
            finally:
                if not self.grid.keep_checkpoints:
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(out.with_name(out.name + ".adapted"), ignore_errors=True)
        row["key"] = self.cell_key(model, method, setting, recovery)
        _write_json(path, row)
        return row, False


def _write_json(path: Path, obj: Any) -> None:
    """Atomically (temp file + rename): a cell file exists only when it is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_grid(grid: Grid, runner: Runner | None = None, quiet: bool = False, report_only: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Run (or, with `report_only`, only collect) every cell; return the rows and failures."""
    from perp_cli.progress import make_progress

    runner = runner or Runner()
    study = Study(grid, runner)
    rows, failures = [], []
    skipped = skipped_variants(grid)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    cells = [c for c in grid.cells() if c[1] not in skipped]
    with make_progress(quiet) as progress:
        task = progress.add_task("grid", total=len(cells) + len(grid.models), status="")
        for model in grid.models:
            progress.update(task, status=f"{model.name} · dense")
            if report_only and not study.dense_path(model).exists():
                progress.advance(task)
                continue
            try:
                rows.append(study.dense(model))
            except StepFailed as exc:
                failures.append(f"{model.name} dense: {exc}")
            progress.advance(task)
        for model, method, setting, name in cells:
            recovery = RECOVERIES[name]
            progress.update(task, status=f"{model.name} · {method} {setting_label(setting)} · {name}")
            if report_only and not study.cell_path(model, method, setting, recovery).exists():
                progress.advance(task)
                continue
            try:
                row, cached = study.cell(model, method, setting, recovery)
                rows.append(row)
                if not cached and not quiet:
                    progress.console.print(
                        f"{model.name} · {method} {setting_label(setting)} · {name}: ppl {row['perplexity']:.2f} "
                        f"(trainable {row['trainable_share']:.3%}, {row['recover_s']:.0f}s)", highlight=False)
            except StepFailed as exc:
                failures.append(f"{model.name} {method} {setting_label(setting)} {name}: {exc}")
                progress.console.print(f"[red]failed[/] {failures[-1]}", highlight=False)
            progress.advance(task)
    return with_gaps(rows), failures


def skipped_variants(grid: Grid) -> dict[str, str]:
    """The methods study's rows the installed perp cannot run, with the reason (a flag of
    issue 15 not merged yet); rerun the same command once it is, and only they run."""
    if grid.study != "methods":
        return {}
    return {name: why for name in grid.methods if (why := unavailable(variant(name)))}


def with_gaps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add to every row the dense and pruned perplexity, the share of the pruning gap the
    recovery closed, (pruned - recovered) / (pruned - dense), and the dense control: the
    unpruned model after the same retraining (what the recovery would do without pruning;
    it moves when the retraining text differs from the model's own training text)."""
    dense = {r["model"]: r["perplexity"] for r in rows if r["method"] == "dense" and r["recovery"] == "none"}
    control = {(r["model"], r["recovery"]): r["perplexity"] for r in rows if r["method"] == "dense"}
    pruned = {(r["model"], r["method"], r["setting"]): r["perplexity"] for r in rows if r["recovery"] == "none" and r["method"] != "dense"}
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "key"}
        d, p = dense.get(r["model"]), pruned.get((r["model"], r["method"], r["setting"]))
        r["dense_perplexity"], r["pruned_perplexity"] = d, p
        r["gap_closed"] = (p - r["perplexity"]) / (p - d) if d is not None and p is not None and p != d and r["method"] != "dense" else None
        c = r["dense_control_perplexity"] = control.get((r["model"], r["recovery"])) if r["method"] != "dense" else None
        # the same share measured against the dense model retrained the same way: what is left once
        # the retraining text's own effect (domain adaptation) is taken out
        r["gap_closed_vs_control"] = (p - r["perplexity"]) / (p - c) if c is not None and p is not None and p != c else None
        out.append(r)
    return out


# ----------------------------------------------------------------------------- outputs

CSV_COLUMNS = ["model", "method", "setting", "sparsity", "recovery", "perplexity", "dense_perplexity", "pruned_perplexity",
               "gap_closed", "dense_control_perplexity", "gap_closed_vs_control", "trainable_parameters", "trainable_share", "train_tokens", "added_biases", "prune_s",
               "recover_s", "eval_s", "eval_windows"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def claims(rows: list[dict[str, Any]], model: str) -> list[str]:
    """The paper's three claims, checked on this model's numbers (one bullet each)."""
    by = {(r["method"], r["setting"], r["recovery"]): r for r in rows if r["model"] == model}
    lines = []
    # 1. biases+norms closes most of the gap at 50% (and is close to full retraining there)
    def vs_control(r: dict[str, Any]) -> str:
        return f", {r['gap_closed_vs_control']:.0%} against its dense control" if r.get("gap_closed_vs_control") is not None else ""

    parts = []
    for m in METHODS:
        bn, full = by.get((m, "50%", "biases+norms")), by.get((m, "50%", "full"))
        if bn and bn["gap_closed"] is not None:
            parts.append(f"{m} {bn['pruned_perplexity']:.2f} → {bn['perplexity']:.2f} ({bn['gap_closed']:.0%} of the gap{vs_control(bn)}"
                         + (f"; full retraining {full['perplexity']:.2f}, {full['gap_closed']:.0%}{vs_control(full)})" if full and full["gap_closed"] is not None else ")"))
    if parts:
        ctrl = by.get(("dense", "0%", "biases+norms"))
        lines.append("**biases+norms at 50%** (claim: closes most of the gap): " + "; ".join(parts)
                     + (f"; the dense model after the same retraining: {ctrl['perplexity']:.2f}" if ctrl else "") + ".")
    # 2. MaskLoRA closes more than biases+norms at high sparsity
    parts = []
    for m in METHODS:
        bn, ml = by.get((m, "70%", "biases+norms")), by.get((m, "70%", "masklora"))
        if bn and ml and bn["gap_closed"] is not None:
            parts.append(f"{m}: biases+norms {bn['perplexity']:.2f} ({bn['gap_closed']:.0%}{vs_control(bn)}) vs MaskLoRA {ml['perplexity']:.2f} ({ml['gap_closed']:.0%}{vs_control(ml)})")
    if parts:
        lines.append("**MaskLoRA at 70%** (claim: closes more than biases+norms at high sparsity): " + "; ".join(parts) + ".")
    # 3. reconstruction improves Wanda and SparseGPT
    parts = []
    for m in ("wanda", "sparsegpt"):
        for s in ("50%", "60%", "70%", "2:4"):
            none, rec = by.get((m, s, "none")), by.get((m, s, "reconstruct"))
            if none and rec:
                parts.append(f"{m} {s} {none['perplexity']:.2f} → {rec['perplexity']:.2f}")
    if parts:
        lines.append("**reconstruction** (claim: improves Wanda and SparseGPT): " + "; ".join(parts) + ".")
    return lines


def markdown(rows: list[dict[str, Any]], grid: Grid, failures: list[str]) -> str:
    b = grid.budget
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        "# PERP reproduction: WikiText-2 perplexity after pruning and recovery", "",
        f"Command: `{grid.command}`" if grid.command else "", "",
        f"- Evaluation: WikiText-2 test (`{grid.eval_data.name}`), first {b.windows} windows of {b.eval_seqlen} tokens.",
        f"- Pruning calibration (Wanda, SparseGPT): {b.nsamples} windows x {b.seqlen} tokens of `{grid.calib.name}`, seed {b.seed}.",
        f"- Retraining (every `retrain` recovery): {b.steps} steps x {b.batch_size} x {b.seqlen} = {b.train_tokens:,} tokens of "
        f"`{grid.train_data.name}`, AdamW (peak lr " + ", ".join(f"{k} {v:g}" for k, v in b.lr.items()) + "), "
        f"10% warmup, linear decay; adapters rank {b.rank}, alpha {b.alpha:g}; "
        "LoRA variants also train biases and norms, and are merged (`perp merge`) before evaluation.",
        f"- Reconstruction: biases+norms+MaskLoRA per block, {b.rec_steps} steps x {b.rec_batch} x {b.seqlen} = {b.rec_tokens:,} "
        f"tokens per block from the {b.nsamples} calibration windows, lr {b.rec_lr:g}.",
        "- trainable = share of all model parameters that receive gradients (reconstruction: summed over blocks).",
        "- dense (control) = the unpruned model after the same retraining (LoRA stands in for MaskLoRA: with no mask they "
        "are the same); it shows what the retraining text does on its own.",
        f"- Machine: {_machine()}.", "",
    ]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        dense = next((r for r in mine if r["method"] == "dense"), None)
        recs = [r for r in grid.recoveries if any(x["recovery"] == r and x["method"] != "dense" for x in mine)]
        lines += [f"## {model}", "", f"Dense perplexity: **{_fmt(dense['perplexity']) if dense else '-'}**.", ""]
        lines += ["| method | sparsity | " + " | ".join(recs) + " |", "|---|---|" + "---:|" * len(recs)]
        cell = {(r["method"], r["setting"], r["recovery"]): r for r in mine}
        controls = [cell.get(("dense", "0%", r)) for r in recs]
        if any(c for c in controls if c and c["recovery"] != "none"):
            lines.append("| dense (control) | 0% | " + " | ".join("-" if c is None else f"{c['perplexity']:.2f}" for c in controls) + " |")
        for s in [setting_label(s) for s in grid.settings]:
            for m in grid.methods:
                vals = [cell.get((m, s, r)) for r in recs]
                if not any(vals):
                    continue
                best = min((v["perplexity"] for v in vals if v), default=None)
                txt = [("-" if v is None else (f"**{v['perplexity']:.2f}**" if v["perplexity"] == best else f"{v['perplexity']:.2f}")) for v in vals]
                lines.append(f"| {m} | {s} | " + " | ".join(txt) + " |")
        lines += ["", "| recovery | trainable share | trainable parameters | tokens | mean time (s) |", "|---|---:|---:|---:|---:|"]
        for r in recs:
            sel = [x for x in mine if x["recovery"] == r and x["method"] != "dense"]
            share = sel[0]["trainable_share"]
            lines.append(f"| {r} | {share:.3%} | {sel[0]['trainable_parameters']:,} | {sel[0]['train_tokens']:,} | "
                         f"{sum(x['recover_s'] for x in sel) / len(sel):.1f} |")
        slug = _slug(model)
        lines += ["", f"![perplexity vs sparsity](ppl_vs_sparsity_{slug}.png)", "", f"![perplexity vs trainable share](ppl_vs_share_{slug}.png)", ""]
        found = claims(rows, model)
        if found:
            lines += ["Paper's claims on this model:", ""] + [f"- {c}" for c in found] + [""]
    if failures:
        lines += ["## Failed cells", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _machine() -> str:
    """Where the cells ran: perp's steps use the GPU when there is one (`--device auto`)."""
    import torch

    where = f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {_threads()}, float32"
    if torch.cuda.is_available():
        where += f", steps on {torch.cuda.get_device_name(0)} (CUDA)"
    return where


def baseline_deltas(rows: list[dict[str, Any]], model: str, grid: Grid) -> list[dict[str, Any]]:
    """Each methods-study row against its baseline at the same setting and recovery:
    {label, variant, baseline, setting, recovery, perplexity, baseline_perplexity, delta}."""
    cell = {(r["method"], r["setting"], r["recovery"]): r for r in rows if r["model"] == model}
    out = []
    for name in grid.methods:
        v = variant(name)
        for s in [setting_label(s) for s in grid.settings]:
            for rec in grid.recoveries:
                mine, base = cell.get((name, s, rec)), cell.get((v.baseline, s, rec))
                if v.baseline and mine and base:
                    out.append({"label": f"{name} {s} vs {v.baseline}", "variant": name, "baseline": v.baseline, "setting": s,
                                "recovery": rec, "perplexity": mine["perplexity"], "baseline_perplexity": base["perplexity"],
                                "delta": mine["perplexity"] - base["perplexity"]})
    return out


def methods_markdown(rows: list[dict[str, Any]], grid: Grid, failures: list[str]) -> str:
    """methods.md: every row of the methods study next to its baseline."""
    b = grid.budget
    skipped = skipped_variants(grid)
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        "# Methods study: OWL, RIA, DSnoT and sublayer reconstruction against their baselines", "",
        f"Command: `{grid.command}`" if grid.command else "", "",
        f"- Evaluation: WikiText-2 test (`{grid.eval_data.name}`), first {b.windows} windows of {b.eval_seqlen} tokens.",
        f"- Calibration (every method, DSnoT, OWL's statistics, reconstruction): {b.nsamples} windows x {b.seqlen} tokens of "
        f"`{grid.calib.name}`, seed {b.seed}.",
        f"- Recoveries: {', '.join(grid.recoveries)}; retraining {b.steps} steps x {b.batch_size} x {b.seqlen} = {b.train_tokens:,} "
        f"tokens of `{grid.train_data.name}` (peak lr " + ", ".join(f"{k} {v:g}" for k, v in b.lr.items() if k in grid.recoveries)
        + f"); MaskLoRA rank {b.rank}, alpha {b.alpha:g}, merged before evaluation.",
        f"- Reconstruction rows (`+rec-block`, `+rec-sublayer`): biases+norms+MaskLoRA, {b.rec_steps} steps x {b.rec_batch} x "
        f"{b.seqlen} tokens per block (sublayer: per half), lr {b.rec_lr:g}, against the dense model; the recoveries then "
        "retrain the reconstructed model.",
        "- Δ = perplexity minus the baseline row's at the same sparsity and recovery (negative: the method helps).",
        f"- Machine: {_machine()}.", "",
        "| row | what | baseline |", "|---|---|---|",
    ]
    lines += [f"| {n} | {variant(n).what} | {variant(n).baseline or '-'} |" for n in grid.methods]
    lines.append("")
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        dense = next((r for r in mine if r["method"] == "dense"), None)
        cell = {(r["method"], r["setting"], r["recovery"]): r for r in mine}
        deltas = {(d["variant"], d["setting"], d["recovery"]): d["delta"] for d in baseline_deltas(rows, model, grid)}
        recs = grid.recoveries
        lines += [f"## {model}", "", f"Dense perplexity: **{_fmt(dense['perplexity']) if dense else '-'}**.", ""]
        if not any(r["method"] != "dense" for r in mine):
            lines += ["No finished cell yet.", ""]
            continue
        lines += ["| row | sparsity | " + " | ".join(recs) + " | " + " | ".join(f"Δ {r}" for r in recs) + " |",
                  "|---|---|" + "---:|" * (2 * len(recs))]
        for s in [setting_label(s) for s in grid.settings]:
            for name in grid.methods:
                vals = [cell.get((name, s, r)) for r in recs]
                if not any(vals):
                    continue
                ds = [deltas.get((name, s, r)) for r in recs]
                lines.append(f"| {name} | {s} | " + " | ".join("-" if v is None else f"{v['perplexity']:.2f}" for v in vals)
                             + " | " + " | ".join("-" if d is None else f"{d:+.2f}" for d in ds) + " |")
        summary = []
        for name in grid.methods:
            v = variant(name)
            mine_d = [(rec, {st: d for (n, st, r), d in deltas.items() if n == name and r == rec}) for rec in recs]
            mine_d = [(rec, ds) for rec, ds in mine_d if ds]
            if v.baseline and mine_d:
                summary.append(f"**{name}** vs {v.baseline}, mean Δ: " + "; ".join(
                    f"{rec} {sum(ds.values()) / len(ds):+.2f} ({', '.join(ds)})" for rec, ds in mine_d) + ".")
        if summary:
            lines += [""] + [f"- {line}" for line in summary]
        lines += ["", f"![difference to the baseline](methods_vs_baseline_{_slug(model)}.png)"] if deltas else []
        lines.append("")
        timed = [r for r in mine if r["method"] != "dense"]
        if timed:
            lines += ["| recovery | cells | mean prune (+reconstruct) s | mean recovery s | mean eval s |", "|---|---:|---:|---:|---:|"]
            for rec in recs:
                sel = [r for r in timed if r["recovery"] == rec]
                if sel:
                    lines.append(f"| {rec} | {len(sel)} | {sum(r['prune_s'] for r in sel) / len(sel):.1f} | "
                                 f"{sum(r['recover_s'] for r in sel) / len(sel):.1f} | {sum(r.get('eval_s') or 0 for r in sel) / len(sel):.1f} |")
            lines.append("")
    if skipped:
        lines += ["## Not run", "", "Rows whose flags the installed perp does not accept; rerun the same command once they exist "
                  "(finished cells are cached, only these run):", ""] + [f"- {n}: {why}" for n, why in skipped.items()] + [""]
    if failures:
        lines += ["## Failed cells", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], grid: Grid, failures: list[str]) -> list[Path]:
    """results.csv, results.md and two plots per model in `grid.out` (the methods study:
    methods.csv, methods.md and one plot per model); returns the paths."""
    from perp_cli import plotting

    if grid.study == "methods":
        grid.out.mkdir(parents=True, exist_ok=True)
        written = [grid.out / "methods.csv", grid.out / "methods.md"]
        write_csv(rows, written[0])
        written[1].write_text(methods_markdown(rows, grid, failures))
        for model in dict.fromkeys(r["model"] for r in rows):
            entries = baseline_deltas(rows, model, grid)
            if entries:
                written.append(plotting.baseline_deltas(entries, grid.out / f"methods_vs_baseline_{_slug(model)}.png",
                                                        title=f"{model}: each method against its baseline", recoveries=grid.recoveries))
        return written
    grid.out.mkdir(parents=True, exist_ok=True)
    written = [grid.out / "results.csv", grid.out / "results.md"]
    write_csv(rows, written[0])
    written[1].write_text(markdown(rows, grid, failures))
    settings = [setting_label(s) for s in grid.settings]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["method"] != "dense"]
        dense = next((r["perplexity"] for r in rows if r["model"] == model and r["method"] == "dense" and r["recovery"] == "none"), None)
        controls = [r for r in rows if r["model"] == model and r["method"] == "dense" and r["recovery"] != "none"]
        if not mine:
            continue
        slug = _slug(model)
        # the dense controls start every method's curves at 0% sparsity
        curves = mine + [{**c, "method": m} for c in controls for m in grid.methods]
        shown = (["0%"] if controls else []) + settings
        written.append(plotting.sparsity_curves(curves, grid.out / f"ppl_vs_sparsity_{slug}.png", title=f"{model}: perplexity after pruning and recovery",
                                                dense=dense, methods=grid.methods, settings=shown, recoveries=grid.recoveries))
        controls = [{**c, "method": "dense, retrained"} for c in controls]
        written.append(plotting.share_scatter(mine + controls, grid.out / f"ppl_vs_share_{slug}.png", title=f"{model}: perplexity vs trainable parameters",
                                              dense=dense, settings=shown, methods=grid.methods + ["dense, retrained"], recoveries=grid.recoveries))
    return written


# ----------------------------------------------------------------------------- command line


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> tuple[Grid, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", type=Path, help="model directory, repeatable (default: ../shared/models/tiny-opt and stories260K when present; --quick: tiny-opt)")
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB, help="calibration text for Wanda/SparseGPT/reconstruction (default: the shared C4 sample)")
    p.add_argument("--train-data", type=Path, default=None, help="retraining text (default: --calib)")
    p.add_argument("--eval-data", type=Path, default=DEFAULT_EVAL, help="perplexity text (default: the shared wiki.test.raw)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"cache of pruned checkpoints and finished cells (default: {DEFAULT_WORK})")
    p.add_argument("--out", type=Path, default=None, help="where results.csv/.md and the plots go (default: results/, --quick: results/quick/)")
    p.add_argument("--study", choices=STUDIES, default="results", help="results: PERP's Figure 1 grid (results.md); methods: "
                   "issue 15's rows (OWL, RIA, DSnoT, sublayer reconstruction) against their baselines (methods.md); rows whose "
                   "flags the installed perp lacks are skipped with the reason")
    p.add_argument("--quick", action="store_true", help=f"quick mode: first model only, methods {','.join(QUICK_METHODS)}, sparsities "
                   f"{','.join(QUICK_SETTINGS)}, {QUICK_BUDGET.steps} steps, {QUICK_BUDGET.nsamples} calibration windows, {QUICK_BUDGET.windows} eval windows")
    p.add_argument("--methods", type=_csv_list, default=None, help=f"pruning methods (default: {','.join(METHODS)}); "
                   f"--study methods: its rows (default: {','.join(METHOD_VARIANTS)})")
    p.add_argument("--settings", type=_csv_list, default=None, help=f"sparsities and N:M patterns (default: {','.join(SETTINGS)})")
    p.add_argument("--recoveries", type=_csv_list, default=None, help=f"recoveries (default: {','.join(RECOVERIES)})")
    p.add_argument("--steps", type=int, default=None, help=f"retraining steps (default {Budget.steps}; quick {QUICK_BUDGET.steps})")
    p.add_argument("--rec-steps", type=int, default=None, help=f"reconstruction steps per block (default {Budget.rec_steps}; quick {QUICK_BUDGET.rec_steps})")
    p.add_argument("--nsamples", type=int, default=None, help=f"calibration windows (default {Budget.nsamples}; quick {QUICK_BUDGET.nsamples})")
    p.add_argument("--windows", type=int, default=None, help=f"WikiText-2 eval windows (default {Budget.windows}; quick {QUICK_BUDGET.windows})")
    p.add_argument("--seqlen", type=int, default=None, help=f"calibration/training window length (default {Budget.seqlen})")
    p.add_argument("--lr", action="append", default=[], metavar="[RECOVERY=]LR",
                   help="peak learning rate of one retraining recovery (e.g. full=1e-4) or, without a name, of all of them; "
                   f"repeatable (default: {', '.join(f'{k} {v:g}' for k, v in TUNED_LR.items())})")
    p.add_argument("--seed", type=int, default=None, help="seed of calibration sampling, data order and adapter init (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-dense-controls", action="store_true", help="skip the dense controls (the unpruned model after each retraining recovery; off in --quick)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every recovered checkpoint under --work (default: delete after evaluation)")
    p.add_argument("--report-only", action="store_true", help="run nothing: rebuild the outputs from the cached cells")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    a = p.parse_args(argv)

    models = a.model or [m for m in DEFAULT_MODELS if m.is_dir()]
    if not models:
        p.error(f"no --model given and none of {', '.join(map(str, DEFAULT_MODELS))} exists")
    if a.quick and not a.model:
        models = models[:1]
    for m in models:
        if not m.is_dir():
            p.error(f"--model {m}: no such directory")
    for name, path in (("--calib", a.calib), ("--eval-data", a.eval_data), ("--train-data", a.train_data)):
        if path is not None and not path.exists():
            p.error(f"{name} {path}: no such file")
    budget = QUICK_BUDGET if a.quick else Budget()
    overrides = {k: v for k, v in {"steps": a.steps, "rec_steps": a.rec_steps, "nsamples": a.nsamples, "windows": a.windows,
                                   "seqlen": a.seqlen, "seed": a.seed}.items() if v is not None}
    lrs = dict(TUNED_LR)
    for item in a.lr:
        name, _, value = item.rpartition("=")
        if name and name not in lrs:
            p.error(f"--lr {item}: {name!r} is not a retraining recovery ({', '.join(lrs)})")
        try:
            lrs |= {n: float(value) for n in ([name] if name else lrs)}
        except ValueError:
            p.error(f"--lr {item}: {value!r} is not a number")
    budget = replace(budget, lr=lrs, **overrides)
    methods_study = a.study == "methods"
    recoveries = a.recoveries or (METHOD_RECOVERIES if methods_study else list(RECOVERIES))
    unknown = [r for r in recoveries if r not in RECOVERIES]
    if unknown:
        p.error(f"unknown recovery {unknown[0]!r}; choose from {', '.join(RECOVERIES)}")
    if methods_study:
        methods = a.methods or list(METHOD_VARIANTS)
        unknown = [m for m in methods if m not in METHOD_VARIANTS]
        if unknown:
            p.error(f"unknown row {unknown[0]!r} of --study methods; choose from {', '.join(METHOD_VARIANTS)}")
        settings = a.settings or METHOD_SETTINGS
    else:
        methods = a.methods or (QUICK_METHODS if a.quick else METHODS)
        settings = a.settings or (QUICK_SETTINGS if a.quick else SETTINGS)
    if "none" not in recoveries:
        recoveries = ["none"] + recoveries  # the pruned perplexity defines the gap
    grid = Grid(
        models=models, calib=a.calib, train_data=a.train_data or a.calib, eval_data=a.eval_data, work=a.work,
        out=a.out or (ROOT / "results" / ("quick" if a.quick else "")), methods=methods,
        settings=settings, recoveries=recoveries, budget=budget, study=a.study,
        keep_checkpoints=a.keep_checkpoints, dense_controls=not (a.quick or a.no_dense_controls or methods_study), command=" ".join(["python bench/reproduce.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    return grid, a


def main(argv: list[str] | None = None) -> int:
    grid, a = parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    started = time.time()
    try:
        rows, failures = run_grid(grid, Runner(), quiet=a.quiet, report_only=a.report_only)
    except KeyboardInterrupt:
        print(f"interrupted: finished cells are cached in {grid.work}; rerun the same command to resume", file=sys.stderr)
        return 130
    written = write_outputs(rows, grid, failures)
    print(f"{len(rows)} rows in {time.time() - started:.0f}s; wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
