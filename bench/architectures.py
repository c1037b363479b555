"""Registry sweep: every causal-LM model type transformers knows, through perp end to end.

    OMP_NUM_THREADS=1 python bench/architectures.py                  # all types -> docs/architectures.md
    OMP_NUM_THREADS=1 python bench/architectures.py --types qwen3,gpt_oss --out -   # a few, table on stdout
    OMP_NUM_THREADS=1 python bench/architectures.py --jobs 14    # a process per type, 14 at a time

For each type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` a tiny random checkpoint is built
from the type's own config class (`perp_cli.tiny.shrunk_config`: hidden 64, 2 layers, 4
experts...) and run through the CLI, in process:

    prune --method wanda --sparsity 0.5        (local calibration text, 4 x 32 tokens)
    prune --method sparsegpt --pattern 2:4
    retrain --adapter masklora --train norms   (2 steps, on the 2:4 model)
    merge                                      (verified: no nonzero where a mask says pruned)
    inspect --expect-pattern 2:4, inspect --arch

A type passes when every step exits 0. Types that are not decoder-only transformers are
reported as such, not as failures: bidirectional encoders (changing the last token
changes earlier logits) and blocks without any attention module (state-space and
recurrent models). Types whose config cannot be built small (composite configs the
shrinker does not reach, validation that rejects the small sizes, or transformers' own
forward failing at them) are listed apart, with the reason; the pass rate counts the
decoder-only transformers that were instantiated.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAX_PARAMETERS = 20_000_000  # a "tiny" model; larger means the shrinker did not reach every size
TIMEOUT_S = 240
REQUIRED = (
    "qwen3", "qwen3_moe", "qwen2_moe", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2", "granite", "starcoder2",
    "falcon", "gpt_oss", "llama4_text", "smollm3", "cohere", "bloom", "mpt", "gptj",
)
STEPS = ("build", "prune wanda 50%", "prune sparsegpt 2:4", "retrain masklora", "merge", "inspect")


@dataclass
class Outcome:
    model_type: str
    status: str  # pass, fail, not-transformer, not-tiny
    detail: str = ""
    model_class: str = ""
    seconds: float = 0.0


class _Timeout(Exception):
    pass


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if ln.startswith("perp: ")), lines[-1] if lines else "")
    return line.replace("|", "/")[:220]


def _corpus(workdir: Path) -> Path:
    from importlib.resources import files

    path = workdir / "corpus.txt"
    if not path.exists():
        path.write_text(files("perp_cli").joinpath("demo/corpus.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return path


def _cli(*args: object) -> tuple[int, str]:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from perp_cli.cli.app import main
    from perp_cli.progress import console

    out, err = io.StringIO(), io.StringIO()
    old = console.file
    console.file = err
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        console.file = old
    return code, err.getvalue()


def _not_transformer(model: torch.nn.Module) -> str | None:
    """Why `model` is not a decoder-only transformer, or None: it must be causal (changing
    the last token changes no earlier logit) and its blocks must hold attention."""
    from perp_cli import arch, tiny

    ids = torch.randint(4, tiny.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = 4 if int(ids[0, -1]) != 4 else 5
    with torch.no_grad():
        a, b = model(input_ids=ids, use_cache=False).logits, model(input_ids=changed, use_cache=False).logits
    if not torch.allclose(a[:, :-1], b[:, :-1], atol=1e-4):  # batched kernels may round differently
        return "bidirectional encoder (earlier logits see later tokens): not a decoder-only transformer"
    try:
        blocks = arch.blocks(model)
    except Exception:
        return None  # discovery's own failure is reported by the pipeline
    names = {type(m).__name__.lower() for b in blocks for m in b.modules()}
    if not any("attention" in n or "attn" in n for n in names):
        return "no attention in its blocks (state-space or recurrent): not a decoder-only transformer"
    return None


def build(model_type: str, directory: Path) -> tuple[str, str]:
    """Save a tiny random checkpoint of `model_type`; returns (status, class or reason)."""
    from transformers import AutoModelForCausalLM

    from perp_cli import tiny

    try:
        config = tiny.shrunk_config(model_type)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        size = sum(p.numel() for p in skeleton.parameters())
        if size > MAX_PARAMETERS:
            return "not-tiny", f"{size / 1e6:.0f}M parameters after shrinking its config (some sizes are out of reach)"
        model = tiny.build_model(model_type)
    except Exception as exc:
        return "not-tiny", f"cannot build a tiny model: {type(exc).__name__}: {_first_line(str(exc)) or '-'}"
    try:  # transformers' own forward must work at these sizes before perp is asked to
        with torch.no_grad():
            model(input_ids=torch.randint(4, tiny.VOCAB, (2, 16)), use_cache=False)
    except Exception as exc:
        return "not-tiny", f"the tiny model's own forward fails: {type(exc).__name__}: {_first_line(str(exc)) or '-'}"
    why = _not_transformer(model)
    if why:
        return "not-transformer", why
    try:  # and transformers must read back its own tiny checkpoint
        model.save_pretrained(directory)
        AutoModelForCausalLM.from_pretrained(directory)
    except Exception as exc:
        return "not-tiny", f"transformers cannot reload its own tiny checkpoint: {type(exc).__name__}: {_first_line(str(exc)) or '-'}"
    tiny.build_tokenizer().save_pretrained(directory)
    return "built", type(model).__name__


def run_type(model_type: str, workdir: Path, steps: int = 2) -> Outcome:
    """The whole pipeline on one model type (see the module docstring)."""
    start = time.time()
    base = workdir / model_type
    status, info = build(model_type, base / "base")
    if status != "built":
        return Outcome(model_type, status, info, seconds=time.time() - start)
    corpus = _corpus(workdir)
    calib = ("--calib", corpus, "--nsamples", 4, "--seqlen", 32, "--quiet")
    commands = [
        ("prune wanda 50%", ("prune", base / "base", "-o", base / "wanda", "--method", "wanda", "--sparsity", 0.5, *calib)),
        ("prune sparsegpt 2:4", ("prune", base / "base", "-o", base / "sgpt", "--method", "sparsegpt", "--pattern", "2:4", "--skip-indivisible", *calib)),
        ("retrain masklora", ("retrain", base / "sgpt", "-o", base / "lora", "--adapter", "masklora", "--train", "norms", "--rank", 4,
                              "--data", corpus, "--steps", steps, "--seqlen", 32, "--batch-size", 2, "--quiet")),
        ("merge", ("merge", base / "lora", "-o", base / "merged", "--quiet")),
        ("inspect", ("inspect", base / "merged", "--expect-pattern", "2:4", "--quiet")),
        ("inspect", ("inspect", "--arch", base / "merged", "--quiet")),
    ]
    for step, args in commands:
        code, err = _cli(*args)
        if code != 0:
            return Outcome(model_type, "fail", f"{step}: {_first_line(err)}", info, time.time() - start)
    return Outcome(model_type, "pass", "", info, time.time() - start)


def run_guarded(model_type: str, workdir: Path) -> Outcome:
    """`run_type` with a time limit and any escaping exception turned into a failure."""

    def alarm(signum: int, frame: object) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIMEOUT_S)
    start = time.time()
    try:
        return run_type(model_type, workdir)
    except _Timeout:
        return Outcome(model_type, "fail", f"timed out after {TIMEOUT_S}s", seconds=time.time() - start)
    except Exception as exc:  # the sweep reports, it does not stop
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return Outcome(model_type, "fail", f"{type(exc).__name__}: {_first_line(str(exc))} ({Path(where.filename).name}:{where.lineno})",
                       seconds=time.time() - start)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def table(outcomes: list[Outcome]) -> str:
    import transformers

    transformer = [o for o in outcomes if o.status in ("pass", "fail")]
    passed = [o for o in transformer if o.status == "pass"]
    rate = len(passed) / len(transformer) if transformer else 0.0
    required = {o.model_type: o.status for o in outcomes if o.model_type in REQUIRED}
    lines = [
        "# Architectures perp supports, measured",
        "",
        "Generated by `OMP_NUM_THREADS=1 python bench/architectures.py` (transformers "
        f"{transformers.__version__}, torch {torch.__version__}): every model type in transformers' "
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, built tiny from its own config class and run through "
        "`prune` (Wanda 50%, SparseGPT 2:4) → `retrain` (MaskLoRA + norms, 2 steps) → `merge` → "
        "`inspect` (`--expect-pattern 2:4`, `--arch`). Do not edit by hand; re-run the script.",
        "",
        f"**{len(passed)} of {len(transformer)} decoder-only transformer types pass ({rate:.0%}).** "
        f"{sum(o.status == 'not-transformer' for o in outcomes)} types are not decoder-only transformers and "
        f"{sum(o.status == 'not-tiny' for o in outcomes)} could not be built at tiny size (listed, not counted). "
        f"Required types passing: {sum(s == 'pass' for s in required.values())} of {len(REQUIRED)}.",
        "",
        "| model type | class | result | reason |",
        "|---|---|---|---|",
    ]
    label = {"pass": "pass", "fail": "**FAIL**", "not-transformer": "not a decoder-only transformer", "not-tiny": "not instantiable small"}
    for o in sorted(outcomes, key=lambda o: o.model_type):
        lines.append(f"| {o.model_type} | {o.model_class or '-'} | {label[o.status]} | {o.detail or ''} |")
    return "\n".join(lines) + "\n"


def _quiet_worker() -> None:
    """One thread, no warnings, no transformers chatter (the sweep's own lines say enough)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _run_one(model_type: str, tmp: str) -> Outcome:
    import shutil

    try:
        return run_guarded(model_type, Path(tmp))
    finally:
        shutil.rmtree(Path(tmp) / model_type, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", help="comma list of model types (default: every causal-LM type)")
    parser.add_argument("--jobs", type=int, default=1, help="model types run at once, each in its own one-thread process (default 1)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "architectures.md"), help="the table's file, or - for stdout")
    args = parser.parse_args()
    _quiet_worker()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    outcomes = []

    def report(o: Outcome) -> None:
        outcomes.append(o)
        print(f"{o.model_type:28s} {o.status:15s} {o.seconds:6.1f}s {o.detail}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="perp-architectures-") as tmp:
        if args.jobs <= 1:
            for model_type in types:
                report(_run_one(model_type, tmp))
        else:  # a fresh process per type: a type that breaks global state cannot touch the next
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_quiet_worker, max_tasks_per_child=1) as pool:
                for future in as_completed([pool.submit(_run_one, t, tmp) for t in types]):
                    report(future.result())
    text = table(outcomes)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
