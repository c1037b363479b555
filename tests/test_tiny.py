"""The embedded tiny models are deterministic and run; the byte tokenizer round-trips."""

from __future__ import annotations

import torch

from perp_cli import tiny


def test_same_seed_same_weights_and_runs() -> None:
    for family in tiny.FAMILY_CONFIGS:
        a, b = tiny.build_model(family, seed=3), tiny.build_model(family, seed=3)
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
        logits = a(torch.randint(0, 300, (1, 8))).logits
        assert logits.shape == (1, 8, tiny.VOCAB) and torch.isfinite(logits).all()


def test_byte_tokenizer_round_trip() -> None:
    tok = tiny.build_tokenizer()
    text = "Prune, retrain — merge. Ünïcode ok"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < tiny.VOCAB
    assert tok.decode(ids) == text


def test_shrunk_configs_keep_each_layer_kind_and_stay_tiny() -> None:
    config = tiny.shrunk_config("qwen3_next")
    assert config.num_hidden_layers == 2 and set(config.layer_types) == {"linear_attention", "full_attention"}
    moe = tiny.shrunk_config("llama4_text")
    assert all(i < 2 for i in moe.moe_layers) and moe.hidden_size == 64 and moe.num_local_experts == 4
    model = tiny.build_model("gpt_oss")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tiny.shrunk_config("deepseek_v3").num_key_value_heads == tiny.shrunk_config("deepseek_v3").num_attention_heads
