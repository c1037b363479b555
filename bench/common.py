"""What the benches share: where ../shared's models and data live, a child process
measured by its own peak RSS, a scratch directory that is kept or removed, and the setup
of the tiny-opt quality benches (checkpoint, calibration windows, WikiText-2 perplexity).

The benches run as scripts (`python bench/x.py`), so `import common` finds this file; a
bench loaded by path (tests/test_reproduce.py) puts bench/ on sys.path first. Nothing
here imports torch at module level: the memory benches' parent processes must stay small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PERP_SHARED", ROOT.parent / "shared"))
TINY_OPT = SHARED / "models" / "tiny-opt"
STORIES260K = SHARED / "models" / "stories260K"
C4_SAMPLE = SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKITEXT2_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


def cache_dir(name: str) -> Path:
    """Where a long bench keeps finished cells between runs (`~/.cache/perp/NAME`)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "perp" / name


# ----------------------------------------------------------------------------- measured children


@dataclass
class Child:
    """A finished child process: exit code, peak RSS (`ru_maxrss`, MiB), wall seconds, output."""

    code: int
    peak_mib: float
    seconds: float
    stdout: str
    stderr: str


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> Child:
    """Run `argv` in a fresh process, reaped with `os.wait4` for its own peak RSS (not
    this process's, not its siblings'). Output goes to temporary files, so a chatty child
    cannot fill a pipe and block; `env` adds to this process's environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Child(proc.returncode, usage.ru_maxrss / 1024, seconds, out.read(), err.read())


@contextmanager
def scratch(prefix: str, parent: Path | None, keep: bool) -> Iterator[Path]:
    """A fresh temporary directory (under `parent`, default the system's), removed on the
    way out, error or not, unless `keep` (then its path is printed)."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- quality benches


def quality_parser(doc: str | None, nsamples: int, seqlen: int) -> argparse.ArgumentParser:
    """A parser with the shared checkpoint, calibration and WikiText-2 evaluation arguments;
    each bench adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_OPT))
    parser.add_argument("--calib", default=str(C4_SAMPLE))
    parser.add_argument("--eval", default=str(WIKITEXT2_TEST))
    parser.add_argument("--nsamples", type=int, default=nsamples)
    parser.add_argument("--seqlen", type=int, default=seqlen)
    parser.add_argument("--eval-seqlen", type=int, default=seqlen)
    parser.add_argument("--windows", type=int, default=100, help="WikiText-2 windows evaluated (0 = all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser


@dataclass
class Quality:
    """The dense checkpoint, the calibration windows every row shares, and `ppl`."""

    base: Any  # perp_cli.checkpoint.Checkpoint
    tokens: Any  # [nsamples, seqlen] token ids
    record: dict[str, Any]  # how the windows were sampled (source, sha256)
    ppl: Callable[[Any], float]  # WikiText-2 perplexity of a model on the first --windows windows
    args: argparse.Namespace

    def calibration(self) -> str:
        """'model M; calibration SOURCE [n, seqlen] sha256 H' for the bench's header line."""
        return (f"model {self.args.model}; calibration {self.record['source']} {list(self.tokens.shape)} "
                f"sha256 {self.record['token_ids_sha256'][:12]}")

    def evaluation(self) -> str:
        return f"eval WikiText-2 test, first {self.args.windows} windows of {self.args.eval_seqlen}"

    def pruned(self, config: Any) -> tuple[Any, dict[str, Any], float]:
        """A copy of the dense checkpoint pruned by `config` (a `PruneConfig`) on the shared
        windows, with its masks set; returns it, the prune's results and its seconds."""
        import copy

        from perp_cli.pruner import prune

        ckpt = copy.deepcopy(self.base)
        start = time.time()
        ckpt.masks, results, _ = prune(ckpt, config, tokens=self.tokens)
        return ckpt, results, time.time() - start


def quality_setup(args: argparse.Namespace) -> Quality:
    """Load `--model`, sample the calibration windows as the references do, and tokenize
    the evaluation text: what every quality bench does before its rows."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from perp_cli import checkpoint, data
    from perp_cli.perplexity import eval_token_ids, perplexity
    from perp_cli.pruner import PruneConfig

    base = checkpoint.open(args.model, need_tokenizer=True)
    ids = eval_token_ids(base.tokenizer, data.load_source(args.eval), args.eval_seqlen)
    probe = PruneConfig("wanda", calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
    tokens, record = data.calibration(base.require_tokenizer(), base.model, probe, probe.seed)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, ids, args.eval_seqlen, batch_size=8, max_windows=args.windows).ppl

    return Quality(base, tokens, record, ppl, args)
