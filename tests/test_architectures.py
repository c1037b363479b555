"""The registry sweep (`bench/architectures.py`) on one tiny model of every distinct layout:
prune (Wanda 50%, SparseGPT 2:4) -> retrain (MaskLoRA) -> merge -> inspect must pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from perp_cli import arch, checkpoint

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("architectures", ROOT / "bench" / "architectures.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules["architectures"] = sweep  # dataclasses look their module up while the class is built
_spec.loader.exec_module(sweep)

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {
    "phi3": "fused qkv and gate_up Linear",
    "gpt_neox": "fused query_key_value, parallel residual with two norms",
    "gptj": "parallel attention + MLP reading one norm",
    "falcon": "FalconLinear, fused qkv, parallel block",
    "cohere": "parallel block, LayerNorm without bias",
    "qwen3_moe": "fused experts [E, out, in]",
    "gpt_oss": "fused experts [E, in, out] with expert biases",
    "llama4_text": "batched experts [E, in, out] + shared expert",
    "gpt2": "Conv1D [in, out]",
    "gemma2": "sandwich norms",
    "bloom": "ALiBi folded into the batch",
}


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_every_layout_goes_through_the_whole_pipeline(model_type: str, tmp_path: Path) -> None:
    outcome = sweep.run_type(model_type, tmp_path)
    assert outcome.status == "pass", f"{LAYOUTS[model_type]}: {outcome.detail}"
    merged = checkpoint.open(tmp_path / model_type / "merged")
    assert merged.masks is not None and str(merged.masks.pattern) == "2:4"
    for m in arch.matrices(merged.model):  # 2 of every 4 consecutive inputs, along the true input dim
        keep = merged.masks.masks.get(m.name)
        if keep is None:
            continue
        view = keep[m.expert] if m.expert is not None else keep
        view = view.t() if m.transposed else view
        assert view.shape == m.shape
        assert torch.equal(view.reshape(view.shape[0], -1, 4).sum(-1), torch.full((view.shape[0], view.shape[1] // 4), 2))
        assert not bool((m.weight()[~view] != 0).any())


def test_non_transformers_are_reported_as_such(tmp_path: Path) -> None:
    assert sweep.run_type("mamba", tmp_path).status == "not-transformer"
    assert sweep.run_type("bert", tmp_path).status == "not-transformer"
