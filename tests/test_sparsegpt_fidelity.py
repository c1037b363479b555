"""SparseGPT on a real checkpoint against an independent implementation of the REFERENCE's
semantics (IST-DASLab/sparsegpt `opt_sequential` + `SparseGPT.add_batch/fasterprune`),
written here from the published algorithm, not from perp's code:

* one calibration window at a time through each block (the reference's loop), a hook on
  every linear layer that keeps H as the running average 2/S · Σ_s X_s X_sᵀ over the S
  sequences seen (the reference's normalisation and update order),
* all linear layers of a block pruned from those statistics, then the windows go through
  the pruned block to the next one,
* dead inputs (H_jj = 0): H_jj = 1, weight column zeroed; damping 1% of mean(diag H);
  U = chol(H⁻¹) upper,
* per 128-column block: unstructured masks prune every w²/U_jj² <= the (k+1)-th
  smallest, k = floor(s·n) (the `reference` rule), or exactly k (`exact`, perp's
  alternative); N:M picks the N lowest of every M columns as they are reached; OBS
  updates applied to every remaining column at once (no lazy batching).

Masks are then compared entry by entry with `perp prune`. Float rounding differs between
any two implementations (summation order, batching, lazy vs immediate updates), and
through the OBS cascade a few near-tie entries flip: the tolerance is the reference
semantics against themselves with the windows in reverse order (same maths, other
rounding), and with U computed perp's way (issue 17: one Cholesky of the reversed H, same
maths, other rounding), the larger of the two, measured in the same test, x2 (issue 16's
target) plus 0.01% of the entries. Measured with these 16 x 128 windows and issue 17's
kernel: 50% 1,842 entries differ (floor 1,278 by U, 642 by the window order), 2:4 37,650
(37,992 / 17,080), 50% with the exact rule 9,494 (9,482 / 9,466), of 3,145,728; the per-token
Hessian perp used before fails (32,426 / 101,172 / 32,468). Against the reference code
itself (128 x 512 windows) the previous kernel's masks were bit-identical: docs/fidelity.md.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import shared_path
from test_pruning_sparsegpt import previous_inverse_hessian, previous_prune_matrix

from perp_cli import arch, checkpoint, data, pruner
from perp_cli.perplexity import eval_token_ids, perplexity
from perp_cli.pruner import PruneConfig, prune
from perp_cli.pruning.sparsegpt import inverse_hessian

pytestmark = pytest.mark.usefixtures("one_thread")

NSAMPLES, SEQLEN = 16, 128


class RunningHessian:
    """The reference's add_batch, one call per window (batch of 1)."""

    def __init__(self, features: int) -> None:
        self.h = torch.zeros(features, features)
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).t().float()  # [features, tokens] of one window
        self.h *= self.count / (self.count + 1)
        self.count += 1
        x = math.sqrt(2 / self.count) * x
        self.h += x @ x.t()


def reference_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float, n: int, m: int, rule: str,
                    blocksize: int = 128, damp: float = 0.01, perp_factor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned weight and mask (True = pruned); `n` = weights PRUNED per group of `m`.
    `perp_factor`: U from perp's factorisation (the same U, other float32 rounding)."""
    w = w.detach().float().clone()
    perp_upper = inverse_hessian(h, damp).upper if perp_factor else None
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True) if perp_upper is None else perp_upper
    d = torch.diag(u)
    rows, cols = w.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for b in range(0, cols, blocksize):
        e = min(b + blocksize, cols)
        if n == 0:
            scores = (w[:, b:e] / d[b:e]) ** 2
            flat = scores.flatten()
            k = int(flat.numel() * sparsity)
            if rule == "reference":
                pruned[:, b:e] = scores <= torch.sort(flat).values[k]
            else:
                chosen = torch.zeros(flat.numel(), dtype=torch.bool)
                chosen[torch.argsort(flat, stable=True)[:k]] = True
                pruned[:, b:e] = chosen.reshape(scores.shape)
        for j in range(b, e):
            if n != 0 and (j - b) % m == 0:
                scores = (w[:, j : j + m] / d[j : j + m]) ** 2
                pruned[:, j : j + m].scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :n], True)
            err = torch.where(pruned[:, j], w[:, j], 0) / d[j]
            w[:, j:] -= torch.outer(err, u[j, j:])
            w[:, j] = torch.where(pruned[:, j], 0, w[:, j])
    return w, pruned


@torch.no_grad()
def reference_run(model: nn.Module, tokens: torch.Tensor, sparsity: float, n: int, m: int, rule: str,
                  perp_factor: bool = False) -> dict[str, torch.Tensor]:
    """The reference's loop over blocks on `model` (modified in place); masks by weight name."""
    blocks = arch.blocks(model)
    caught: list[tuple[torch.Tensor, dict]] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise StopIteration

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    for window in tokens:
        try:
            model(input_ids=window[None], use_cache=False)
        except StopIteration:
            pass
    handle.remove()
    inputs = [x for x, _ in caught]
    kwargs = {k: v for k, v in caught[0][1].items() if k not in ("cache", "past_key_values")}
    masks: dict[str, torch.Tensor] = {}
    prefix = arch.spec_for(model).blocks
    for i, block in enumerate(blocks):
        linears = {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
        stats = {name: RunningHessian(mod.in_features) for name, mod in linears.items()}
        handles = [linears[name].register_forward_hook(stats[name]) for name in linears]
        for x in inputs:
            block(x, **kwargs)
        for hd in handles:
            hd.remove()
        for name, mod in linears.items():
            pruned_w, pruned = reference_prune(mod.weight, stats[name].h, sparsity, n, m, rule, perp_factor=perp_factor)
            mod.weight.copy_(pruned_w.to(mod.weight.dtype))
            masks[f"{prefix}.{i}.{name}.weight"] = pruned
        inputs = [block(x, **kwargs) for x in inputs]
        inputs = [y[0] if isinstance(y, tuple) else y for y in inputs]
    return masks


@pytest.fixture(scope="module")
def tiny_opt():
    model_dir = shared_path("models", "tiny-opt")
    c4 = shared_path("data", "c4", "c4-train.00000-of-01024.first1000.jsonl")
    base = checkpoint.open(model_dir, need_tokenizer=True)
    tokens = data.sample_windows(base.tokenizer, data.load_source(str(c4)), NSAMPLES, SEQLEN, seed=0)
    return base, tokens


def _perp_masks(base, tokens: torch.Tensor, pattern: str, selection: str) -> dict[str, torch.Tensor]:
    ckpt = copy.deepcopy(base)
    config = PruneConfig(method="sparsegpt", pattern=pattern, sparsegpt_selection=selection, batch_size=4)
    masks, _, _ = prune(ckpt, config, tokens=tokens)
    return {name: ~keep.bool() for name, keep in masks.masks.items()}


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    assert a.keys() == b.keys()
    return sum(int((a[k] != b[k]).sum()) for k in a)


@pytest.mark.parametrize("pattern,n,m,rule", [
    ("unstructured", 0, 0, "reference"),
    ("2:4", 2, 4, "reference"),
    ("unstructured", 0, 0, "exact"),
])
def test_masks_agree_with_the_reference_semantics_within_float_noise(tiny_opt, pattern: str, n: int, m: int, rule: str) -> None:
    base, tokens = tiny_opt
    ref = reference_run(copy.deepcopy(base.model), tokens, 0.5, n, m, rule)
    ref_reversed = reference_run(copy.deepcopy(base.model), tokens.flip(0), 0.5, n, m, rule)
    ours = _perp_masks(base, tokens, pattern, rule)
    total = sum(v.numel() for v in ref.values())
    floor = _differ(ref, ref_reversed)
    # perp computes U another way (same maths, other rounding): that is float noise too, and
    # for N:M it flips more than the window order (2:4: 37,992 against 17,080)
    floor = max(floor, _differ(ref, reference_run(copy.deepcopy(base.model), tokens, 0.5, n, m, rule, perp_factor=True)))
    differ = _differ(ours, ref)
    # the float-noise floor measured right here; a 0.01% allowance keeps a floor of 0 from
    # demanding bit-equality of two differently ordered float32 computations
    assert differ <= 2 * floor + total // 10_000, f"{differ} entries differ from the reference (noise floor {floor} of {total})"
    if rule == "reference" and n == 0:  # k+1 per 128-column block: a hair above 50%
        assert sum(int(v.sum()) for v in ours.values()) > total // 2
    if rule == "exact":
        assert sum(int(v.sum()) for v in ours.values()) == total // 2


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_kernel_agrees_with_the_previous_kernel_on_a_real_model(tiny_opt, monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
    """Issue 17: the kernel sums the OBS updates in another order (sub-block GEMMs) from a U
    computed another way (one Cholesky of the reversed H). On tiny-opt with real calibration
    the whole pruned model stays within float noise of the previous kernel (the column-by-
    column loop with LAPACK's U, kept in tests/test_pruning_sparsegpt.py): unstructured masks
    agree in >= 99.5% of the entries, 2:4 masks (chaotic under any rounding change: the
    reference itself flips 1.2% of them with perp's U, test above) in >= 98.5%; the
    perplexity on WikiText-2 is within 0.1% unstructured and 0.5% at 2:4. Both kernels
    round as the CPU's BLAS does, so the count moves with the machine (measured 0.06% and
    1.17% on one, 0.20% and 1.00% on another; perplexity +0.02%/+0.21% and -0.09%/-0.18%:
    docs/fidelity.md)."""
    base, tokens = tiny_opt
    wiki = shared_path("data", "wikitext-2-raw", "wiki.test.raw")
    config = PruneConfig(method="sparsegpt", pattern=pattern, batch_size=4)
    ours = copy.deepcopy(base)
    ours_masks, _, _ = prune(ours, config, tokens=tokens)
    with monkeypatch.context() as patch:
        patch.setattr(pruner, "inverse_hessian", previous_inverse_hessian)
        patch.setattr(pruner, "prune_matrix", previous_prune_matrix)
        previous = copy.deepcopy(base)
        previous_masks, _, _ = prune(previous, config, tokens=tokens)
    a, b = ours_masks.masks, previous_masks.masks
    total = sum(v.numel() for v in a.values())
    differ = _differ({k: ~v.bool() for k, v in a.items()}, {k: ~v.bool() for k, v in b.items()})
    limit = total * 5 // 1000 if pattern == "unstructured" else total * 15 // 1000
    assert differ <= limit, f"{differ} of {total} mask entries differ from the previous kernel"
    ids = eval_token_ids(base.tokenizer, data.load_source(str(wiki)), 256)
    ppl = [perplexity(ckpt.model, ids, 256, batch_size=8, max_windows=24).ppl for ckpt in (ours, previous)]
    print(f"{pattern}: {differ} of {total} mask entries differ; perplexity {ppl[0]:.4f} vs {ppl[1]:.4f} (previous kernel)")
    assert abs(ppl[0] / ppl[1] - 1) <= (1e-3 if pattern == "unstructured" else 5e-3)
