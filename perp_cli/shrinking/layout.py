"""Where the removable structures of each block are, from the architecture map and config.

`perp_cli.arch` lists a block's matrices; this module groups them into what structured
pruning removes, by shape and by the attention/MLP split of the module tree (never by
family name):

* **MLP channels** (width): the block's output projection of the MLP is the last
  non-attention matrix writing the hidden size (`down_proj`, OPT `fc2`, GPT-2's MLP
  `c_proj`); its input width is the intermediate size I. The matrices reading the hidden
  state and writing I (`gate_proj`, `up_proj`, `fc1`, `c_fc`) or 2I (a fused `gate_up_proj`:
  gate half then up half) produce the channels. Channel c is row c of each producer (and
  row I + c of a fused one), the producers' bias entries, and column c of the consumer.
* **attention heads** (heads): `q_proj`, `k_proj`, `v_proj`, `o_proj` of the attention
  module. Under grouped-query attention r = heads / kv_heads query heads share one key-value
  head; the unit removed is the whole group (r query heads and one key-value head), so the
  ratio stays the same and transformers' `repeat_kv` still pairs them. Per-head parameters
  of the attention module (gpt-oss's attention sinks) follow their query heads; q/k norms
  act per head dimension and are untouched (head_dim does not change).
* **experts** (experts): the fused 3-D expert weights of the map (`arch.ArchSpec.fused_experts`)
  and every tensor of their module with a leading dimension of E (expert biases), plus the
  router: the block's `[E, hidden]` matrix and its module's other tensors with leading E.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from perp_cli import arch
from perp_cli.arch import Matrix
from perp_cli.errors import ArchitectureError, UsageError

INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "intermediate_size_mlp", "ffn_hidden_size", "d_ff")


def lowest(scores: torch.Tensor | list[float], k: int) -> list[int]:
    """Indices of the k lowest scores (ties: the lower index first), ascending: which
    blocks, channels, key-value groups or experts a shrink removes."""
    values = scores.tolist() if isinstance(scores, torch.Tensor) else scores
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    return sorted(order[:k])


# ----------------------------------------------------------------------------- MLP channels


@dataclass(frozen=True)
class Channels:
    """The MLP of one block: `size` channels, produced by `producers`, read by `consumer`."""

    block: int
    size: int
    producers: tuple[Matrix, ...]
    fused: frozenset[str]  # producer names that hold gate and up halves (2 * size rows)
    consumer: Matrix


def channels(model: nn.Module, index: int) -> Channels | None:
    """Block `index`'s dense MLP, or None when it has none (an MoE block)."""
    hidden = arch.hidden_size(model)
    dense = [m for m in arch.block_matrices(model, index) if m.expert is None and not arch.is_attention(m)]
    consumers = [m for m in dense if m.shape[0] == hidden]
    if not consumers:
        return None
    consumer = consumers[-1]  # the MLP's output projection is its last matrix (the width may equal the hidden size)
    size = consumer.shape[1]
    producers = tuple(m for m in dense if m is not consumer and m.shape[1] == hidden and m.shape[0] in (size, 2 * size))
    if not producers:
        raise ArchitectureError(f"block {index}: nothing writes the {size} inputs of {consumer.local}")
    fused = frozenset(m.name for m in producers if m.shape[0] == 2 * size)
    return Channels(index, size, producers, fused, consumer)


def intermediate_key(model: nn.Module, size: int) -> str:
    """The config field that holds the MLP width `size`."""
    config = arch.text_config(model)
    for key in INTERMEDIATE_KEYS:
        if getattr(config, key, None) == size:
            return key
    hidden = arch.hidden_size(model)
    if hasattr(config, "n_inner") and config.n_inner is None and hidden is not None and size == 4 * hidden:
        return "n_inner"  # GPT-2: n_inner = None means 4 * n_embd
    raise ArchitectureError(
        f"no config field of {config.model_type} holds the MLP width {size} (looked at {', '.join(INTERMEDIATE_KEYS)})"
    )


# ----------------------------------------------------------------------------- attention heads


@dataclass(frozen=True)
class Heads:
    """The attention of one block: `heads` query heads in `kv_heads` groups of head_dim."""

    block: int
    q: Matrix
    k: Matrix
    v: Matrix
    o: Matrix
    per_head: tuple[str, ...]  # full names of tensors with one entry per query head (sinks)
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def heads(model: nn.Module, index: int) -> Heads:
    """Block `index`'s attention projections (separate q/k/v/o, as LLaMA-like families have)."""
    config = arch.text_config(model)
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if not isinstance(n_heads, int):
        raise ArchitectureError(f"{config.model_type}'s config has no num_attention_heads")
    if not hasattr(config, "head_dim"):
        raise UsageError(
            f"{config.model_type} derives its head size from hidden_size / num_attention_heads (no head_dim in its config): "
            "a model with fewer heads cannot be written as a plain Hugging Face config of this family; "
            "use --structure width or depth"
        )
    by_suffix: dict[str, Matrix] = {}
    for m in arch.block_matrices(model, index):
        if m.expert is None and arch.is_attention(m):
            by_suffix[m.local.rsplit(".", 1)[-1]] = m
    missing = [k for k in ("q_proj", "k_proj", "v_proj", "o_proj") if k not in by_suffix]
    if missing:
        found = ", ".join(sorted(by_suffix)) or "none"
        raise UsageError(
            f"block {index} has no separate {', '.join(missing)} (attention matrices: {found}); "
            "head pruning needs q_proj, k_proj, v_proj and o_proj"
        )
    q, k, v, o = (by_suffix[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    head_dim = q.shape[0] // n_heads
    if q.shape[0] != n_heads * head_dim or k.shape[0] != n_kv * head_dim or o.shape[1] != n_heads * head_dim:
        raise ArchitectureError(
            f"block {index}: q/k/o shapes {q.shape}/{k.shape}/{o.shape} do not match {n_heads} heads, "
            f"{n_kv} key-value heads of {head_dim}"
        )
    prefix = arch.block_prefix(model, index)
    attention_path = q.local.rpartition(".")[0]
    attention = arch.blocks(model)[index].get_submodule(attention_path) if attention_path else arch.blocks(model)[index]
    per_head = tuple(
        f"{prefix}{attention_path + '.' if attention_path else ''}{n}" for n, p in attention.named_parameters(recurse=False)
        if p.dim() >= 1 and p.shape[0] == n_heads
    )
    return Heads(index, q, k, v, o, per_head, n_heads, n_kv, head_dim)


# ----------------------------------------------------------------------------- experts


@dataclass(frozen=True)
class Experts:
    """The routed experts of one MoE block."""

    block: int
    count: int
    module: nn.Module  # the fused experts module (called to score each expert)
    tensors: tuple[str, ...]  # full state-dict names with a leading expert dimension (experts and router)
    router: str  # full name of the router's [E, hidden] matrix


def experts(model: nn.Module, index: int) -> Experts | None:
    """Block `index`'s experts, or None for a dense block."""
    spec = arch.spec_for(model)
    count = arch.expert_count(model)
    hidden = arch.hidden_size(model)
    fused = [local for local in spec.matrices if local in spec.fused_experts and local in spec.present[index]]
    if count is None or not fused:
        return None
    block = arch.blocks(model)[index]
    owners = {local.rpartition(".")[0] for local in fused}
    if len(owners) != 1:
        raise ArchitectureError(f"block {index} has fused experts in several modules ({', '.join(sorted(owners))})")
    owner = owners.pop()
    routers = [p for p, t in block.named_parameters()
               if t.dim() == 2 and tuple(t.shape) == (count, hidden) and not arch.under(p, owner)]
    if len(routers) != 1:
        raise ArchitectureError(f"block {index}: expected one [{count}, {hidden}] router matrix, found {len(routers)}")
    router_path = routers[0].rpartition(".")[0]
    prefix = arch.block_prefix(model, index)
    tensors = [
        prefix + n for n, t in block.state_dict().items()
        if t.dim() >= 1 and t.shape[0] == count and (arch.under(n, owner) or (router_path and arch.under(n, router_path)))
    ]
    return Experts(index, count, block.get_submodule(owner), tuple(tensors), prefix + routers[0])
