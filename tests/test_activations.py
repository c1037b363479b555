"""Activation placement: device budget, host and disk levels, bit-identical read-back,
files cleaned up, clear errors; and pruning with activations on disk changes nothing."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perp_cli import activations
from perp_cli.activations import ActivationStore, Placement, placement_for
from perp_cli.errors import PerpError, UsageError

from conftest import run_cli, save_tiny

CPU = torch.device("cpu")


def _batches(n: int = 5, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 8, generator=g).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_budget_fills_the_device_first_then_disk_and_reads_back_bit_identical(tmp_path: Path, dtype: torch.dtype) -> None:
    batches = _batches(dtype=dtype)
    size = batches[0].numel() * batches[0].element_size()
    store = ActivationStore(Placement(CPU, 2 * size, tmp_path))
    for b in batches:
        store.append(b)
    assert store.levels() == {"device": 2, "host": 0, "disk": 3}
    assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(store, batches))
    assert [store.shape(k) for k in range(5)] == [b.shape for b in batches]
    assert len(list(tmp_path.rglob("*.bin"))) == 3


def test_replacing_and_dropping_give_back_budget_and_files(tmp_path: Path) -> None:
    batches = _batches()
    size = batches[0].numel() * 4
    store = ActivationStore(Placement(CPU, size, tmp_path))
    store.append(batches[0])
    store.append(batches[1])  # over budget: disk
    assert store.levels()["disk"] == 1
    store[0] = batches[2]  # the device slot is given back before the new tensor is placed
    assert store.levels() == {"device": 1, "host": 0, "disk": 1} and torch.equal(store[0], batches[2])
    other = store.empty_like()  # shares the budget: the device is full
    other.append(batches[3])
    assert other.levels()["disk"] == 1
    before = set(tmp_path.rglob("*.bin"))
    assert len(before) == 2
    store[1] = batches[4]  # the old file is removed, a new one written
    after = set(tmp_path.rglob("*.bin"))
    assert len(after) == 2 and len(after - before) == 1
    del store, other
    gc.collect()
    assert list(tmp_path.iterdir()) == []  # files and the run's directory are gone


def test_no_budget_keeps_everything_on_the_device_and_host_offload_on_the_host() -> None:
    store = ActivationStore(Placement.of(CPU, False))
    for b in _batches(3):
        store.append(b)
    assert store.levels() == {"device": 3, "host": 0, "disk": 0}
    assert Placement.of(CPU, True).device_budget == 0


def test_a_directory_left_by_a_killed_process_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / f"{activations.SPILL_PREFIX}999999-abc"  # a pid that is not running
    stale.mkdir()
    (stale / "00000001.bin").write_bytes(b"x")
    mine = tmp_path / f"{activations.SPILL_PREFIX}{os.getpid()}-live"
    mine.mkdir()
    assert activations.clean_stale_spills(tmp_path) == [stale]
    assert not stale.exists() and mine.exists()


def test_a_failed_write_is_one_clear_error_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(activations, "open", full, raising=False)
    store = ActivationStore(Placement(CPU, 0, tmp_path))
    with pytest.raises(PerpError, match="No space left on device.*--offload-dir"):
        store.append(_batches(1)[0])
    assert list(tmp_path.rglob("*.bin")) == []


def test_options_are_validated(tmp_path: Path) -> None:
    assert placement_for(CPU, max_memory="1KiB", offload_dir=tmp_path) == Placement(CPU, 1024, tmp_path)
    assert placement_for(CPU, offload_dir=tmp_path).device_budget == 0  # disk only: everything goes there
    assert placement_for(CPU, max_memory="0").ineffective  # allowed on a CPU box, and reported
    assert not placement_for(torch.device("cuda"), max_memory="1GB").ineffective
    with pytest.raises(UsageError, match="give one of them"):
        placement_for(CPU, offload_activations=True, max_memory="1GB")
    with pytest.raises(UsageError, match="--max-memory '12 apples' is not a size"):
        placement_for(CPU, max_memory="12 apples")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        placement_for(CPU, offload_dir=tmp_path / "file")
    with pytest.raises(UsageError, match="inside the output"):
        activations.check_offload_dir(tmp_path / "out" / "spill", tmp_path / "out", [tmp_path / "in"])
    with pytest.raises(UsageError, match="inside the input"):
        activations.check_offload_dir(tmp_path / "in", tmp_path / "out", [tmp_path / "in"])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("streaming", ["off", "on"])
def test_pruning_with_activations_on_disk_is_bit_identical(tmp_path: Path, calib_file: Path, method: str, streaming: str) -> None:
    save_tiny(tmp_path / "dense", "llama")
    common = ["prune", str(tmp_path / "dense"), "--method", method, "--sparsity", "0.5", "--calib", str(calib_file),
              "--calib-concat", "--nsamples", "6", "--seqlen", "32", "--batch-size", "2", "--streaming", streaming, "-q"]
    assert run_cli(*common, "-o", str(tmp_path / "memory")).exit_code == 0
    spill = tmp_path / "spill"
    result = run_cli(*common, "-o", str(tmp_path / "disk"), "--max-memory", "20KiB", "--offload-dir", str(spill), "--json")
    assert result.exit_code == 0, result.stderr
    a, b = load_file(tmp_path / "memory" / "model.safetensors"), load_file(tmp_path / "disk" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_file(tmp_path / "memory" / "masks.safetensors"), load_file(tmp_path / "disk" / "masks.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert list(spill.iterdir()) == []  # nothing left behind
    record = json.loads((tmp_path / "disk" / "perp.json").read_text())["history"][-1]["results"]["activations"]
    assert "files in" in record["placement"] and 0 < record["peak_device_bytes"] <= 20 * 1024


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_reconstruction_with_activations_on_disk_is_bit_identical(tmp_path: Path, calib_file: Path, streaming: str) -> None:
    save_tiny(tmp_path / "dense", "opt")
    assert run_cli("prune", str(tmp_path / "dense"), "-o", str(tmp_path / "pruned"), "--method", "magnitude", "--sparsity", "0.5", "-q").exit_code == 0
    common = ["reconstruct", str(tmp_path / "pruned"), "--calib", str(calib_file), "--calib-concat", "--nsamples", "6",
              "--seqlen", "32", "--batch-size", "2", "--steps-per-block", "4", "--target", "dense-stream", "--streaming", streaming, "-q"]
    assert run_cli(*common, "-o", str(tmp_path / "memory")).exit_code == 0
    spill = tmp_path / "spill"
    # three micro-batches of 16 KiB per stream; the dense stream, inputs, targets and outputs share 40 KiB
    result = run_cli(*common, "-o", str(tmp_path / "disk"), "--max-memory", "40KiB", "--offload-dir", str(spill))
    assert result.exit_code == 0, result.stderr
    a, b = load_file(tmp_path / "memory" / "model.safetensors"), load_file(tmp_path / "disk" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "disk" / "perp.json").read_text())["history"][-1]["results"]
    assert 0 < record["activations"]["peak_device_bytes"] <= 40 * 1024
    assert list(spill.iterdir()) == []
