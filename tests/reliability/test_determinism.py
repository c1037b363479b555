"""Same command, same seed, same inputs → bit-identical output tensors (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, save_tiny

CORPUS = Path(__file__).resolve().parents[2] / "perp_cli" / "demo" / "corpus.txt"
DATA = ["--calib-concat", "--nsamples", "8", "--seqlen", "32"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _chain(root: Path, dense: Path, tag: str) -> dict[str, Path]:
    runs = {
        "prune-wanda": ["prune", dense, "--method", "wanda", "--sparsity", "0.5", "--calib", CORPUS, *DATA],
        "prune-sparsegpt": ["prune", dense, "--method", "sparsegpt", "--pattern", "2:4", "--calib", CORPUS, *DATA],
    }
    outs = {}
    for name, argv in runs.items():
        outs[name] = root / f"{name}-{tag}"
        result = run_cli(*argv, "-o", outs[name], "--seed", "3", "-q")
        assert result.exit_code == 0, result.stderr
    steps = {
        "retrain": ["retrain", outs["prune-sparsegpt"], "--train", "biases,norms", "--adapter", "masklora",
                    "--data", CORPUS, "--steps", "3", "--batch-size", "2", "--seqlen", "32"],
        "retrain-all": ["retrain", outs["prune-wanda"], "--train", "all", "--data", CORPUS, "--steps", "3",
                        "--batch-size", "2", "--seqlen", "32"],
        "reconstruct": ["reconstruct", outs["prune-wanda"], "--dense", dense, "--calib", CORPUS, *DATA,
                        "--steps-per-block", "3", "--batch-size", "4"],
    }
    for name, argv in steps.items():
        outs[name] = root / f"{name}-{tag}"
        result = run_cli(*argv, "-o", outs[name], "--seed", "3", "-q")
        assert result.exit_code == 0, f"{name}: {result.stderr}"
    outs["merge"] = root / f"merge-{tag}"
    result = run_cli("merge", outs["retrain"], "-o", outs["merge"], "-q")
    assert result.exit_code == 0, result.stderr
    return outs


@pytest.mark.slow
def test_every_step_is_bit_reproducible(tmp_path: Path) -> None:
    dense = save_tiny(tmp_path / "dense", "opt")
    first, second = _chain(tmp_path, dense, "a"), _chain(tmp_path, dense, "b")
    for step in first:
        a, b = _tensors(first[step]), _tensors(second[step])
        assert a.keys() == b.keys(), step
        for key in a:
            assert torch.equal(a[key], b[key]), f"{step}: {key} differs between two identical runs"
        masks = first[step] / "masks.safetensors"
        if masks.exists():  # written by perp's own writer: the same bytes, so the same manifest hash
            assert masks.read_bytes() == (second[step] / "masks.safetensors").read_bytes(), step
