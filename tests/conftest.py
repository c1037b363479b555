"""Shared fixtures: tiny models of every family saved as checkpoint directories, the
real checkpoints and data in ../shared (skipped with a reason when absent), a CLI
runner that goes through `main` so exit codes are the real ones, and the helpers many
tests need: random token ids (`random_tokens`), magnitude masks (`magnitude_masks`) and file
digests of a directory (`tree_digest`)."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never touch the network: any accidental hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Idle OpenMP threads must not spin: subprocess tests and parallel jobs share 2 cores, and
# busy-waiting workers made forward passes ~70x slower there. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist each worker gets its share of the cores: N workers with every torch
# using all cores oversubscribe them (slower than one process). Subprocesses inherit it.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))

from perp_cli import tiny  # noqa: E402
from perp_cli.cli.app import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PERP_SHARED", ROOT.parent / "shared"))
FAMILIES = sorted(tiny.FAMILY_CONFIGS)


def shared_path(*parts: str) -> Path:
    """A path inside ../shared, or skip the test saying why."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real checkpoints/data live in ../shared or $PERP_SHARED)")
    return path


def save_tiny(path: Path, family: str = "opt", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of `family` plus the byte tokenizer as an HF directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = tiny.build_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    tiny.build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """Run a test single-threaded: small tensor ops on 2 shared cores are many times
    faster with one thread (OpenMP workers spin on every tiny op when cores are busy)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "tiny-opt-random", "opt")


@pytest.fixture(params=FAMILIES)
def family_dir(request, tmp_path: Path) -> Path:
    return save_tiny(tmp_path / f"tiny-{request.param}", request.param)


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    """A small local text corpus (the package's demo text) for calibration and training."""
    from importlib.resources import files

    path = tmp_path / "corpus.txt"
    path.write_text(files("perp_cli").joinpath("demo/corpus.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def run_cli(*args: str) -> CliResult:
    """Run `perp ARGS` in-process through `main`, capturing stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    from perp_cli.progress import console

    old_file = console.file
    console.file = err
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        console.file = old_file
    return CliResult(code, out.getvalue(), err.getvalue())


def read_weights(path: Path) -> dict:
    """Every weight tensor of a checkpoint directory, single file or sharded."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    """The same names, dtypes and bytes (bit for bit, NaN payloads included)."""
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), f"{name} differs"


def random_tokens(n: int, seqlen: int, seed: int = 0, high: int = tiny.VOCAB, low: int = 4):
    """`[n, seqlen]` random token ids in [low, high) from a seeded generator: calibration
    windows and probe batches for the tiny models (ids below 4 are the specials)."""
    import torch

    return torch.randint(low, high, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def magnitude_masks(model, sparsity: float = 0.5, apply: bool = True):
    """Per-matrix magnitude keep-masks (per expert slice for fused experts) in each
    parameter's layout: a weight is kept when |w| is above the k-th smallest |w| of its
    matrix, k = int(numel * sparsity). Applied to the model (pruned weights zeroed)
    unless `apply=False`."""
    import torch

    from perp_cli import arch, mask

    masks: dict = {}
    for m in arch.matrices(model):
        w = m.weight()
        keep = m.to_param_layout(w.abs() > w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values)
        if m.expert is None:
            masks[m.name] = keep.contiguous()
        else:
            masks.setdefault(m.name, torch.ones(m.parameter.shape, dtype=torch.bool))[m.expert] = keep
    ms = mask.MaskSet(masks)
    if apply:
        mask.apply(model, ms)
    return ms


def trained_adapters(model, kind: str, masks=None, rank: int = 4, alpha: int = 8, seed: int = 5) -> dict:
    """Attach `kind` adapters to `model` and give their factors random nonzero values, as if
    trained (a fresh LoRA's B is zero, so its merge would change nothing)."""
    import torch

    from perp_cli import adapters

    ads = adapters.attach(model, kind, rank=rank, alpha=alpha, masks=masks)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ads.values():
            a.lora_A.add_(0.1 * torch.randn(a.lora_A.shape, generator=gen))
            a.lora_B.add_(0.1 * torch.randn(a.lora_B.shape, generator=gen))
    return ads


def tree_digest(path: Path, mtimes: bool = False) -> dict:
    """Every file under `path` (or `path` itself, if a file) by relative name: its sha256,
    with its mtime too if `mtimes` ('byte-identical and untouched'); a symlink is
    recorded as '-> target', never followed."""
    from perp_cli.manifest import sha256_file

    def entry(p: Path):
        return (sha256_file(p), p.stat().st_mtime_ns) if mtimes else sha256_file(p)

    if path.is_file():
        return {path.name: entry(path)}
    out: dict = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(path))] = entry(p)
    return out
