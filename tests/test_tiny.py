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
