"""Interrupted steps lose nothing: SIGINT/SIGTERM/SIGKILL at random points of real runs.

Each case runs the real CLI in a subprocess on a small model, signals it after a random
delay drawn over the step's measured duration (so signals land while starting, while
computing and while writing), and then checks:

* no output directory unless the step had completed (a complete one loads and is
  consistent); after SIGINT/SIGTERM no temporary directory either;
* the input directory is byte-for-byte unchanged;
* a rerun succeeds (and removes a temporary left behind by SIGKILL).

The number of kill iterations is bounded for CI; set PERP_KILL_ITERATIONS to run more.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perp_cli import checkpoint

from conftest import save_tiny, tree_digest

ITERATIONS = int(os.environ.get("PERP_KILL_ITERATIONS", "1"))
CORPUS = Path(__file__).resolve().parents[2] / "perp_cli" / "demo" / "corpus.txt"


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PERP_DEBUG", None)
    return env


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "perp_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True
    )


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perp_cli", *args], capture_output=True, text=True, env=_env(), timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupts")
    # big enough that writing takes a noticeable share of the run
    save_tiny(root / "dense", "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3)
    pruned = _run(["prune", str(root / "dense"), "-o", str(root / "pruned"), "--method", "magnitude", "--sparsity", "0.5", "-q"])
    assert pruned.returncode == 0, pruned.stderr
    return root


def _prune_args(root: Path, out: Path) -> list[str]:
    return ["prune", str(root / "dense"), "-o", str(out), "--method", "wanda", "--sparsity", "0.5",
            "--calib", str(CORPUS), "--calib-concat", "--nsamples", "8", "--seqlen", "64", "-q"]


def _retrain_args(root: Path, out: Path) -> list[str]:
    return ["retrain", str(root / "pruned"), "-o", str(out), "--train", "biases,norms", "--adapter", "masklora",
            "--add-biases", "--data", str(CORPUS), "--steps", "6", "--batch-size", "2", "--seqlen", "64", "-q"]


def _temporaries(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}{checkpoint.TMP_MARKER}*"))


def _check_after(out: Path, proc: subprocess.Popen, sig: int) -> str:
    """Assert the invariants after a signalled run; return what happened."""
    stdout, stderr = proc.communicate(timeout=600)
    if out.exists():
        # the step finished before the signal, or SIGKILL landed after the rename
        assert (out / "perp.json").is_file(), f"partial output directory: {sorted(os.listdir(out))}"
        checkpoint.open(out)  # loads, hashes agree, masked weights are zero
        return "completed"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        return "killed"
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "no output was written" in stderr, stderr
    assert _temporaries(out) == [], "SIGINT/SIGTERM must remove the temporary directory"
    return "interrupted"


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGKILL]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prune", "retrain"])
def test_signals_at_random_points_lose_nothing(workdir: Path, command: str) -> None:
    make_args = _prune_args if command == "prune" else _retrain_args
    source = workdir / ("dense" if command == "prune" else "pruned")
    before = tree_digest(source)
    # one clean run to learn how long the step takes
    t0 = time.monotonic()
    clean = _run(make_args(workdir, workdir / f"{command}-clean"))
    assert clean.returncode == 0, clean.stderr
    duration = time.monotonic() - t0
    rng = random.Random(command)
    outcomes = []
    for i, sig in enumerate(SIGNALS * ITERATIONS):
        out = workdir / f"{command}-{i}"
        proc = _start(make_args(workdir, out))
        time.sleep(rng.uniform(0.2, duration))
        proc.send_signal(sig)
        outcomes.append((signal.Signals(sig).name, _check_after(out, proc, sig)))
        assert tree_digest(source) == before, "the input was modified"
        rerun = _run(make_args(workdir, out) + (["--overwrite"] if out.exists() else []))
        assert rerun.returncode == 0, rerun.stderr
        assert _temporaries(out) == [], "a rerun must clean up temporaries of killed runs"
        checkpoint.open(out)
    assert tree_digest(source) == before
    print(f"{command}: {outcomes}")
