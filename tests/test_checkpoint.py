"""The checkpoint contract: round trips, atomic writes, refusals, consistency checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from perp_cli import arch, checkpoint, shards, tiny
from perp_cli.errors import CheckpointError, NumericalError, UsageError
from perp_cli.manifest import StepRecord, sha256_file
from perp_cli.mask import apply

from conftest import magnitude_masks, save_tiny, tree_digest


def _step(inp: str = "in") -> StepRecord:
    return StepRecord(command="test", args={"x": 1}, input=inp, seed=0)


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_save_load_round_trip_is_bitwise(family_dir: Path, tmp_path: Path, shard: str | None) -> None:
    ckpt = checkpoint.open(family_dir)
    masks = magnitude_masks(ckpt.model, apply=False)
    apply(ckpt.model, masks)
    out = tmp_path / "out"
    kwargs = {"max_shard_size": shard} if shard else {}
    checkpoint.save(out, ckpt.model, ckpt.tokenizer, masks, ckpt.manifest, _step(str(family_dir)), **kwargs)
    if shard:
        assert (out / checkpoint.WEIGHTS_INDEX_NAME).is_file()
    again = checkpoint.open(out)
    before = ckpt.model.state_dict()
    for name, tensor in again.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for name, keep in masks.masks.items():
        assert torch.equal(again.masks[name], keep)
    manifest = json.loads((out / "perp.json").read_text())
    assert manifest["masks_sha256"] == sha256_file(out / "masks.safetensors")
    assert manifest["history"][-1]["command"] == "test"
    assert abs(manifest["sparsity"]["total"] - 0.5) < 0.01
    # plain transformers loads it without perp
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(plain.state_dict()[masks.names()[0]], before[masks.names()[0]])
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in config and "quantization_config" not in config


def test_masks_are_bit_packed(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.open(tiny_dir)
    masks = magnitude_masks(ckpt.model, apply=False)
    apply(ckpt.model, masks)
    checkpoint.save(tmp_path / "o", ckpt.model, ckpt.tokenizer, masks, ckpt.manifest, _step())
    raw = load_file(str(tmp_path / "o" / "masks.safetensors"))
    for name, keep in masks.masks.items():
        assert raw[name].dtype == torch.uint8 and raw[name].numel() == (keep.numel() + 7) // 8


def test_history_is_copied_and_appended(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.open(tiny_dir)
    checkpoint.save(tmp_path / "a", ckpt.model, ckpt.tokenizer, None, ckpt.manifest, _step(str(tiny_dir)))
    a = checkpoint.open(tmp_path / "a")
    checkpoint.save(tmp_path / "b", a.model, a.tokenizer, None, a.manifest, StepRecord("second", {}, str(tmp_path / "a")))
    history = json.loads((tmp_path / "b" / "perp.json").read_text())["history"]
    assert [h["command"] for h in history] == ["test", "second"]
    assert {"wall_time_s", "peak_memory", "versions", "args", "seed"} <= set(history[0])


class Boom(RuntimeError):
    pass


def test_failure_midway_leaves_no_output_and_input_unchanged(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    before = tree_digest(tiny_dir)
    ckpt = checkpoint.open(tiny_dir)
    masks = magnitude_masks(ckpt.model, apply=False)
    apply(ckpt.model, masks)

    def failing_write_masks(*args):  # the weights are written, the masks never are
        raise Boom("disk died after half the files")

    monkeypatch.setattr(shards, "write_masks", failing_write_masks)
    out = tmp_path / "out"
    with pytest.raises(Boom):
        checkpoint.save(out, ckpt.model, ckpt.tokenizer, masks, ckpt.manifest, _step())
    assert not out.exists()
    assert list(tmp_path.glob(".out*")) == []
    assert tree_digest(tiny_dir) == before


def test_keyboard_interrupt_during_write_leaves_nothing(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    ckpt = checkpoint.open(tiny_dir)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "out", ckpt.model, ckpt.tokenizer, None, ckpt.manifest, _step())
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_a_swallowed_signal_still_stops_the_commit(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # a library swallowed the KeyboardInterrupt (in a __del__, say); the record remains
    from perp_cli import errors

    ckpt = checkpoint.open(tiny_dir)
    monkeypatch.setattr(errors, "received_signals", [])
    monkeypatch.setattr(ckpt.tokenizer, "save_pretrained", lambda *a, **k: errors.received_signals.append("interrupted (SIGINT)"))
    with pytest.raises(errors.Interrupted, match="SIGINT"):
        checkpoint.save(tmp_path / "out", ckpt.model, ckpt.tokenizer, None, ckpt.manifest, _step())
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_stale_temporary_from_killed_process_is_cleaned(tiny_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / f".out{checkpoint.TMP_MARKER}999999"  # a pid that is not running
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    ckpt = checkpoint.open(tiny_dir)
    checkpoint.save(tmp_path / "out", ckpt.model, ckpt.tokenizer, None, ckpt.manifest, _step())
    assert not stale.exists() and (tmp_path / "out" / "perp.json").is_file()


def test_existing_output_needs_overwrite_and_is_replaced_whole(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-file").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        checkpoint.check_output(out, [tiny_dir], overwrite=False)
    ckpt = checkpoint.open(tiny_dir)
    checkpoint.save(out, ckpt.model, ckpt.tokenizer, None, ckpt.manifest, _step(), overwrite=True)
    assert not (out / "old-file").exists() and (out / "perp.json").exists()


def test_output_inside_input_or_symlink_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="inside"):
        checkpoint.check_output(tiny_dir / "sub", [tiny_dir], overwrite=False)
    with pytest.raises(UsageError, match="inside"):
        checkpoint.check_output(tiny_dir, [tiny_dir], overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="symlink"):
        checkpoint.check_output(link, [tiny_dir], overwrite=True)


def test_weights_changed_behind_the_masks_back_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.open(tiny_dir)
    masks = magnitude_masks(ckpt.model, apply=False)
    apply(ckpt.model, masks)
    name = masks.names()[0]
    dict(ckpt.model.named_parameters())[name].data[~masks[name]] = 0.5
    with pytest.raises(CheckpointError, match="refusing to write.*nonzero"):
        checkpoint.save(tmp_path / "o", ckpt.model, ckpt.tokenizer, masks, ckpt.manifest, _step())
    assert not (tmp_path / "o").exists()


def test_nan_weights_are_never_written(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.open(tiny_dir)
    next(ckpt.model.parameters()).data[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        checkpoint.save(tmp_path / "o", ckpt.model, ckpt.tokenizer, None, ckpt.manifest, _step())
    assert not (tmp_path / "o").exists()


def test_mask_hash_mismatch_and_foreign_masks_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.open(tiny_dir)
    masks = magnitude_masks(ckpt.model, apply=False)
    apply(ckpt.model, masks)
    out = tmp_path / "o"
    checkpoint.save(out, ckpt.model, ckpt.tokenizer, masks, ckpt.manifest, _step())
    manifest = json.loads((out / "perp.json").read_text())
    manifest["masks_sha256"] = "0" * 64
    (out / "perp.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.open(out)
    # masks of another model (llama names) on an OPT model
    other = save_tiny(tmp_path / "llama", "llama")
    lck = checkpoint.open(other)
    lmasks = magnitude_masks(lck.model, apply=False)
    apply(lck.model, lmasks)
    checkpoint.save(tmp_path / "l", lck.model, lck.tokenizer, lmasks, lck.manifest, _step())
    manifest["masks_sha256"] = sha256_file(tmp_path / "l" / "masks.safetensors")
    (out / "perp.json").write_text(json.dumps(manifest))
    (out / "masks.safetensors").write_bytes((tmp_path / "l" / "masks.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="names no parameter"):
        checkpoint.open(out)


def test_newer_manifest_version_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.open(tiny_dir)
    checkpoint.save(tmp_path / "o", ckpt.model, ckpt.tokenizer, None, ckpt.manifest, _step())
    manifest = json.loads((tmp_path / "o" / "perp.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "o" / "perp.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoint.open(tmp_path / "o")


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    tiny.build_model("opt").save_pretrained(d)
    os.remove(d / "model.safetensors")
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        checkpoint.open(d)


def test_corrupt_weights_and_missing_shard(tiny_dir: Path, tmp_path: Path) -> None:
    (tiny_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint.open(tiny_dir)
    sharded = tmp_path / "sharded"
    tiny.build_model("opt").save_pretrained(sharded, max_shard_size="100KB")
    shard = sorted(sharded.glob("model-0*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        checkpoint.open(sharded)


def test_missing_dir_and_unmapped_architecture(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoint.open(tmp_path / "nope")
    from transformers import AutoModelForCausalLM

    # XLM keeps attention and feed-forward layers in separate ModuleLists: no block class to find
    AutoModelForCausalLM.from_config(tiny.shrunk_config("xlm")).save_pretrained(tmp_path / "xlm")
    from perp_cli.errors import ArchitectureError

    with pytest.raises(ArchitectureError, match="cannot find the decoder blocks of XLMWithLMHeadModel"):
        checkpoint.open(tmp_path / "xlm")


def test_tokenizer_is_optional_until_needed(tmp_path: Path) -> None:
    d = tmp_path / "notok"
    tiny.build_model("opt").save_pretrained(d)
    ckpt = checkpoint.open(d)
    assert ckpt.tokenizer is None
    with pytest.raises(CheckpointError, match="no tokenizer"):
        ckpt.require_tokenizer()


def test_shared_checkpoints_load_dense(tmp_path: Path) -> None:
    from conftest import shared_path

    for name in ("tiny-opt", "stories260K"):
        ckpt = checkpoint.open(shared_path("models", name))
        assert ckpt.masks is None and ckpt.tokenizer is not None
        assert len(arch.matrices(ckpt.model)) > 0


def test_out_of_disk_is_a_clear_error_and_leaves_nothing(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import errno as _errno

    ckpt = checkpoint.open(tiny_dir)
    masks = magnitude_masks(ckpt.model, apply=False)
    apply(ckpt.model, masks)

    def full_disk(*a, **k):
        raise OSError(_errno.ENOSPC, "No space left on device")

    from perp_cli import shards

    monkeypatch.setattr(shards.ShardWriter, "write", full_disk)  # the masks are written with it
    with pytest.raises(CheckpointError, match="out of disk space"):
        checkpoint.save(tmp_path / "o", ckpt.model, ckpt.tokenizer, masks, ckpt.manifest, _step())
    assert not (tmp_path / "o").exists() and list(tmp_path.glob(".o*")) == []


def test_temporary_of_a_reused_pid_is_stale(tiny_dir: Path, tmp_path: Path) -> None:
    """A temporary named after a live pid but another start time belongs to a process that
    is gone (the pid was reused): it is removed; one of a live owner is kept."""
    import os

    reused = tmp_path / f".out{checkpoint.TMP_MARKER}{os.getppid()}-1"  # a live pid, started at tick 1
    reused.mkdir()
    live = tmp_path / f".out{checkpoint.TMP_MARKER}{os.getppid()}-{checkpoint.process_start(os.getppid())}"
    live.mkdir()
    removed = checkpoint.clean_stale_temporaries(tmp_path / "out")
    assert removed == [reused] and not reused.exists() and live.exists()


def test_foreign_content_rules(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.open(tiny_dir)
    out = tmp_path / "out"
    checkpoint.save(out, ckpt.model, ckpt.tokenizer, None, ckpt.manifest, _step())
    assert checkpoint.foreign_content(out) is None
    assert "no perp.json" in checkpoint.foreign_content(tiny_dir)
    (out / "extra.bin").write_bytes(b"x")
    assert "extra.bin" in checkpoint.foreign_content(out)
    (tmp_path / "empty").mkdir()
    assert checkpoint.foreign_content(tmp_path / "empty") is None
    with pytest.raises(UsageError, match="contains the input"):
        checkpoint.check_output(tmp_path, [tiny_dir], overwrite=True)


def test_missing_or_unexpected_tensor_is_refused_before_loading(tiny_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = tiny_dir / "model.safetensors"
    weights = load_file(str(f))
    weights["model.decoder.layers.0.extra.weight"] = torch.zeros(2)
    save_file(weights, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="extra.weight in the weights is not part of"):
        checkpoint.open(tiny_dir)
