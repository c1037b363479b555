"""The retraining loop: schedules, masked full retraining, frozen tensors, NaN, precision."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import magnitude_masks, random_tokens
from perp_cli import adapters, mask, tiny
from perp_cli.errors import NumericalError, UsageError
from perp_cli.trainable import select_trainable
from perp_cli.training import TrainConfig, fit, lr_at, train_lm

WINDOWS = random_tokens(16, 32, high=260)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_schedules_match_their_definitions():
    total, warm, base = 10, 2, 1.0
    assert [lr_at(s, total, base, warm, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    linear = [lr_at(s, total, base, warm, "linear") for s in range(total)]
    assert linear[:2] == [0.5, 1.0]
    assert linear[2:] == pytest.approx([1 - k / 8 for k in range(8)])
    cosine = [lr_at(s, total, base, warm, "cosine") for s in range(total)]
    assert cosine[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert lr_at(0, 5, 3e-4, 0, "linear") == 3e-4


def test_config_validation():
    for bad in ({"steps": 0}, {"steps": 1, "warmup": 1.0}, {"steps": 1, "schedule": "step"}, {"steps": 1, "lr": 0.0},
                {"steps": 1, "grad_accum": 0}, {"steps": 1, "weight_decay": -1.0}):
        with pytest.raises(UsageError):
            TrainConfig(**bad).validate()


def test_biases_norms_change_only_those_tensors_and_frozen_ones_get_no_gradient():
    model = tiny.build_model("opt")
    masks = magnitude_masks(model)
    before = snapshot(model)
    params = select_trainable(model, "biases,norms")
    result = train_lm(model, WINDOWS, TrainConfig(steps=3, batch_size=2, lr=1e-2), params, masks=masks, quiet=True)
    for name, p in model.named_parameters():
        if name in params:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
            assert p.grad is None, name
    assert result.tokens_seen == 3 * 2 * 32 and len(result.losses) == 3
    assert math.isfinite(result.final_loss) and result.tokens_per_s > 0


def test_full_retraining_keeps_every_pruned_weight_exactly_zero():
    model = tiny.build_model("llama")
    masks = magnitude_masks(model)
    before = snapshot(model)
    params = select_trainable(model, "all")
    snapshots = []
    cfg = TrainConfig(steps=4, batch_size=2, lr=5e-2, weight_decay=0.1, warmup=0.0, eval_every=1)
    # the eval hook runs after every step: check the invariant at each one, not only at the end
    train_lm(model, WINDOWS, cfg, params, masks=masks, quiet=True, eval_fn=lambda: snapshots.append(snapshot(model)) or 1.0)
    assert len(snapshots) == 4
    for snap in snapshots:
        for name, keep in masks.masks.items():
            assert mask.nonzeros_outside(snap[name], keep) == 0, name
            assert not torch.equal(snap[name], before[name])  # the kept weights did move


def test_fit_masks_gradients_before_the_step():
    w = torch.nn.Parameter(torch.ones(4, 4))
    keep = torch.eye(4, dtype=torch.bool)
    with torch.no_grad():
        w.mul_(keep)
    target = torch.full((4, 4), 3.0)
    fit([w], lambda s, m: ((w - target) ** 2).sum(), TrainConfig(steps=20, lr=0.1, warmup=0.0, weight_decay=0.5),
        keep_masks=[(w, keep)], quiet=True)
    assert torch.equal(w.detach() * ~keep, torch.zeros(4, 4))
    assert (w.detach().diagonal() > 1.0).all()


def test_nan_loss_stops_with_a_numerical_error():
    model = tiny.build_model("opt")
    params = select_trainable(model, "biases,norms")
    with pytest.raises(NumericalError, match="loss became"):
        train_lm(model, WINDOWS, TrainConfig(steps=4, batch_size=2, lr=1e30, warmup=0.0), params, quiet=True)


def test_same_seed_gives_bitwise_identical_training():
    results = []
    for _ in range(2):
        model = tiny.build_model("opt")  # OPT's default dropout is active in training: seeded
        masks = magnitude_masks(model)
        torch.manual_seed(0)
        ads = adapters.attach(model, "masklora", rank=4, alpha=8, masks=masks)
        params = select_trainable(model, "norms")
        train_lm(model, WINDOWS, TrainConfig(steps=2, batch_size=2, seed=7), params, ads, masks, quiet=True)
        results.append((snapshot(model), adapters.state_dict(ads)))
    for a, b in zip(results[0], results[1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_and_checkpointing_give_the_same_step():
    finals = []
    for bs, accum, ckpt in ((4, 1, False), (2, 2, False), (4, 1, True)):
        model = tiny.build_model("llama")
        params = select_trainable(model, "norms")
        train_lm(model, WINDOWS, TrainConfig(steps=2, batch_size=bs, grad_accum=accum, grad_checkpointing=ckpt, lr=1e-2),
                 params, quiet=True)
        finals.append(torch.cat([p.detach().flatten() for p in params.values()]))
    assert torch.allclose(finals[0], finals[1], atol=1e-6)
    assert torch.allclose(finals[0], finals[2], atol=1e-6)


def test_mixed_precision_trains_float32_parameters_over_bf16_weights():
    model = tiny.build_model("llama").to(torch.bfloat16)
    params = select_trainable(model, "norms")
    before = snapshot(model)
    seen = {}

    def spy() -> float:
        seen["trainable"] = {p.dtype for p in params.values()}
        seen["frozen"] = {p.dtype for n, p in model.named_parameters() if n not in params}
        return 1.0

    train_lm(model, WINDOWS, TrainConfig(steps=2, batch_size=2, lr=1e-2, eval_every=1), params, quiet=True, eval_fn=spy)
    assert seen == {"trainable": {torch.float32}, "frozen": {torch.bfloat16}}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in params.items())


def test_too_few_windows_and_nothing_to_train_are_usage_errors():
    model = tiny.build_model("opt")
    with pytest.raises(UsageError, match="windows"):
        train_lm(model, WINDOWS[:3], TrainConfig(steps=2, batch_size=2), select_trainable(model, "norms"), quiet=True)
    with pytest.raises(UsageError, match="nothing to train"):
        train_lm(model, WINDOWS, TrainConfig(steps=1, batch_size=2), {}, quiet=True)


def test_adapters_train_identically_with_and_without_gradient_checkpointing():
    finals = []
    for ckpt in (False, True):
        model = tiny.build_model("llama")
        masks = magnitude_masks(model)
        torch.manual_seed(0)
        ads = adapters.attach(model, "masklora", rank=4, alpha=8, masks=masks)
        train_lm(model, WINDOWS, TrainConfig(steps=2, batch_size=2, lr=1e-2, grad_checkpointing=ckpt),
                 select_trainable(model, "norms"), ads, masks, quiet=True)
        finals.append(torch.cat([p.detach().flatten() for a in ads.values() for p in a.parameters()]))
    assert torch.allclose(finals[0], finals[1], atol=1e-6)


def test_padded_documents_train_on_the_real_tokens_only():
    """data.PAD rows (PERP's truncated/padded documents): the loss is the model's loss on
    the unpadded tokens alone (no attention to padding, no loss on it)."""
    from perp_cli.data import PAD

    model = tiny.build_model("opt")
    model.config.dropout = 0.0
    for m in model.modules():
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0
    doc = WINDOWS[:1, :20]
    padded = torch.full((1, WINDOWS.shape[1]), PAD)
    padded[:, :20] = doc
    params = select_trainable(model, "norms")
    with torch.no_grad():
        expected = model(input_ids=doc, labels=doc).loss.item()
    result = train_lm(model, padded, TrainConfig(steps=1, batch_size=1, lr=1e-9), params, quiet=True)
    assert result.initial_loss == pytest.approx(expected, rel=1e-5)
