"""`perp inspect`: tables, consistency verdicts, expectations and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from perp_cli import arch, checkpoint, shards
from perp_cli.inspection import expectation_failures, inspect_checkpoint
from perp_cli.manifest import StepRecord
from perp_cli.mask import MaskSet, Pattern, apply

from conftest import run_cli, shared_path


def _nm_pruned(src: Path, out: Path, n: int = 2, m: int = 4) -> Path:
    """Keep the n largest of every m consecutive inputs, in each matrix's [out, in] view."""
    ckpt = checkpoint.open(src)
    masks: dict[str, torch.Tensor] = {}
    for mat in arch.matrices(ckpt.model):
        w = mat.weight()
        groups = w.abs().reshape(w.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        keep = mat.to_param_layout(keep.reshape(w.shape))
        full = masks.setdefault(mat.name, torch.ones_like(mat.parameter, dtype=torch.bool))
        if mat.expert is None:
            full.copy_(keep)
        else:
            full[mat.expert] = keep
    maskset = MaskSet(masks, Pattern(n, m))
    apply(ckpt.model, maskset)
    checkpoint.save(out, ckpt.model, ckpt.tokenizer, maskset, ckpt.manifest, StepRecord("prune", {"pattern": "2:4"}, str(src)))
    return out


def test_nm_checkpoint_of_every_family_is_consistent(family_dir: Path, tmp_path: Path) -> None:
    out = _nm_pruned(family_dir, tmp_path / "pruned")
    report = inspect_checkpoint(checkpoint.open(out, verify=False))
    assert report.consistent and report.pattern == "2:4"
    assert abs(report.total_sparsity - 0.5) < 1e-9
    assert all(abs(m.zero_fraction - 0.5) < 1e-9 for m in report.matrices)
    result = run_cli("inspect", out, "--json", "--expect-pattern", "2:4", "--expect-sparsity", "0.5")
    assert result.exit_code == 0, result.stderr
    assert result.json()["consistent"] is True
    assert result.json()["history"][0]["command"] == "prune"


def test_inspect_detects_weight_changed_behind_masks_back(tiny_dir: Path, tmp_path: Path) -> None:
    out = _nm_pruned(tiny_dir, tmp_path / "pruned")
    weights = load_file(str(out / "model.safetensors"))
    name = "model.decoder.layers.1.fc2.weight"
    masks = shards.MaskReader.open(out, None).mask_set()
    w = weights[name]
    w[~masks[name]] = 0.125  # every pruned weight of fc2 revived
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli("inspect", out, "--json")
    assert result.exit_code == 3
    data = result.json()
    assert data["consistent"] is False
    bad = [m for m in data["matrices"] if m["masked_nonzeros"]]
    assert [m["name"] for m in bad] == [name]
    assert "inconsistent" in result.stderr and "Traceback" not in result.stderr


def test_expectations_fail_with_exit_3(tiny_dir: Path, tmp_path: Path) -> None:
    out = _nm_pruned(tiny_dir, tmp_path / "pruned")
    assert run_cli("inspect", out, "--expect-sparsity", "0.7", "-q").exit_code == 3
    assert run_cli("inspect", out, "--expect-pattern", "4:8", "-q").exit_code == 3
    report = inspect_checkpoint(checkpoint.open(out))
    assert expectation_failures(report, 0.5, 0.001, "2:4") == []
    assert run_cli("inspect", tiny_dir, "--expect-pattern", "2:4", "-q").exit_code == 3


def test_inspect_bad_input_exit_codes(tmp_path: Path) -> None:
    result = run_cli("inspect", tmp_path / "missing")
    assert result.exit_code == 1 and "no such directory" in result.stderr and "Traceback" not in result.stderr
    assert run_cli("inspect").exit_code == 2


def test_shared_tiny_opt_reports_zero_sparsity() -> None:
    for name in ("tiny-opt", "stories260K"):
        result = run_cli("inspect", shared_path("models", name), "--json")
        assert result.exit_code == 0, result.stderr
        data = result.json()
        assert data["total_sparsity"] == 0.0 and data["consistent"] and data["pattern"] == "dense"
    assert len(json.loads(run_cli("inspect", shared_path("models", "tiny-opt"), "--json").stdout)["matrices"]) == 24


def test_inspect_arch_prints_the_discovered_map(tmp_path: Path) -> None:
    from conftest import save_tiny

    path = save_tiny(tmp_path / "tiny-gpt2", "gpt2")
    result = run_cli("inspect", "--arch", "--json", path)
    assert result.exit_code == 0, result.stderr
    found = result.json()
    assert found["blocks"] == {"path": "transformer.h", "count": 2, "classes": ["GPT2Block"]}
    assert found["matrices"]["attn.c_attn"]["layout"] == "[in, out] (Conv1D)"
    assert found["matrices"]["attn.c_attn"]["out_in"] == [192, 64]
    assert found["excluded"]["transformer.wte.weight"] == "embedding"
    shown = run_cli("inspect", "--arch", path)
    assert shown.exit_code == 0 and "attn.c_attn" in shown.stderr and "never pruned" in shown.stderr
