"""The one architecture map: where a decoder-only causal LM keeps its blocks, prunable
matrices, norms and biases.

Every step (prune, retrain, reconstruct, merge, inspect) asks this module, never the
model's class name or `hasattr` guesses. A family is keyed by `config.model_type`.

Two layouts need care:

* GPT-2's `Conv1D` stores its weight transposed, `[in, out]`. `Matrix.weight()` always
  returns an `[out, in]` view, so "output row" and "input column" mean the same thing for
  every family, and writes through the view land in the real parameter.
* transformers 5 stores Mixtral's experts fused, as 3-D parameters
  `mlp.experts.gate_up_proj [E, 2I, H]` and `mlp.experts.down_proj [E, H, I]`. Each
  expert's slice is a separate prunable matrix (`Matrix.expert`), while its mask lives
  in one 3-D tensor under the parameter's own name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from perp_cli.errors import ArchitectureError, UsageError


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one family, as dotted paths.

    `matrices` are relative to a block. `input_groups` lists matrices that read the same
    input, so calibration statistics are computed once per group. `bias_flags` maps the
    config flag that turns biases on (for `--add-biases`) to the matrices it affects.
    """

    model_type: str
    blocks: str
    matrices: tuple[str, ...]
    norms: tuple[str, ...]
    final_norm: str
    embeddings: tuple[str, ...]
    input_groups: tuple[tuple[str, ...], ...]
    transposed: bool = False
    fused_experts: tuple[str, ...] = ()
    bias_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


def _llama_like(model_type: str, bias_flags: dict[str, tuple[str, ...]] | None = None) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        blocks="model.layers",
        matrices=_LLAMA_ATTN + _LLAMA_MLP,
        norms=_LLAMA_NORMS,
        final_norm="model.norm",
        embeddings=("model.embed_tokens",),
        input_groups=_LLAMA_GROUPS,
        bias_flags=bias_flags or {},
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "opt": ArchSpec(
        model_type="opt",
        blocks="model.decoder.layers",
        matrices=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        final_norm="model.decoder.final_layer_norm",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        input_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    "llama": _llama_like(
        "llama",
        {"attention_bias": _LLAMA_ATTN, "mlp_bias": _LLAMA_MLP},
    ),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "mixtral": ArchSpec(
        model_type="mixtral",
        blocks="model.layers",
        matrices=_LLAMA_ATTN + ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        norms=_LLAMA_NORMS,
        final_norm="model.norm",
        embeddings=("model.embed_tokens",),
        input_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.experts.gate_up_proj",),
            ("mlp.experts.down_proj",),
        ),
        fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    ),
    "gpt2": ArchSpec(
        model_type="gpt2",
        blocks="transformer.h",
        matrices=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        norms=("ln_1", "ln_2"),
        final_norm="transformer.ln_f",
        embeddings=("transformer.wte", "transformer.wpe"),
        input_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        transposed=True,
    ),
}


@dataclass(frozen=True, eq=False)
class Matrix:
    """One prunable weight matrix.

    `name` is the parameter's own name in the state dict (the key of its mask);
    `key` additionally names the expert for fused experts (`...gate_up_proj[3]`).
    """

    name: str
    block: int
    local: str
    owner: nn.Module
    attr: str
    expert: int | None = None
    transposed: bool = False

    @property
    def key(self) -> str:
        return self.name if self.expert is None else f"{self.name}[{self.expert}]"

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.owner, self.attr)

    def weight(self) -> torch.Tensor:
        """The weight as an `[out, in]` view sharing storage with the parameter."""
        w = self.parameter.data
        if self.expert is not None:
            w = w[self.expert]
        return w.t() if self.transposed else w

    def to_param_layout(self, matrix_mask: torch.Tensor) -> torch.Tensor:
        """Turn an `[out, in]` tensor back into this slice's stored layout."""
        return matrix_mask.t() if self.transposed else matrix_mask

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.weight().shape
        return int(out), int(inp)


def spec_for(model: nn.Module) -> ArchSpec:
    """The family of `model`, or a clear error naming its class."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise ArchitectureError(
            f"perp has no architecture map for {type(model).__name__} "
            f"(model_type={model_type!r}); supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return spec


def blocks(model: nn.Module) -> nn.ModuleList:
    """The ordered decoder blocks."""
    return model.get_submodule(spec_for(model).blocks)


def _expand(spec: ArchSpec, block_prefix: str, index: int, block: nn.Module, local: str) -> list[Matrix]:
    if local in spec.fused_experts:
        owner_path, attr = local.rsplit(".", 1)
        owner = block.get_submodule(owner_path)
        param = getattr(owner, attr)
        name = f"{block_prefix}.{index}.{local}"
        return [
            Matrix(name=name, block=index, local=local, owner=owner, attr=attr, expert=e)
            for e in range(param.shape[0])
        ]
    owner = block.get_submodule(local)
    return [
        Matrix(
            name=f"{block_prefix}.{index}.{local}.weight",
            block=index,
            local=local,
            owner=owner,
            attr="weight",
            transposed=spec.transposed,
        )
    ]


def block_matrices(model: nn.Module, index: int) -> list[Matrix]:
    """Prunable matrices of block `index`, in the spec's order (experts expanded)."""
    spec = spec_for(model)
    block = blocks(model)[index]
    out: list[Matrix] = []
    for local in spec.matrices:
        out.extend(_expand(spec, spec.blocks, index, block, local))
    return out


def matrices(model: nn.Module, targets: str | None = None, exclude: str | None = None) -> list[Matrix]:
    """All prunable matrices, optionally filtered by regexes on the parameter name.

    `targets` keeps names that match (re.search); `exclude` drops names that match.
    A `targets` regex that matches nothing is an error: silently pruning nothing is the
    one outcome a user never wants.
    """
    found = [m for i in range(len(blocks(model))) for m in block_matrices(model, i)]
    if targets:
        pattern = re.compile(targets)
        found = [m for m in found if pattern.search(m.name)]
        if not found:
            raise UsageError(f"--targets {targets!r} matches no prunable matrix (see `perp inspect` for the names)")
    if exclude:
        pattern = re.compile(exclude)
        found = [m for m in found if not pattern.search(m.name)]
    return found


def input_groups(model: nn.Module, index: int) -> list[list[Matrix]]:
    """Matrices of block `index` grouped by shared input (one group per expert slice)."""
    spec = spec_for(model)
    by_local: dict[str, list[Matrix]] = {}
    for m in block_matrices(model, index):
        by_local.setdefault(m.local, []).append(m)
    groups: list[list[Matrix]] = []
    for group in spec.input_groups:
        members = [by_local[local] for local in group]
        if group[0] in spec.fused_experts:
            for per_expert in zip(*members):
                groups.append(list(per_expert))
        else:
            groups.append([m for ms in members for m in ms])
    return groups


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every LayerNorm/RMSNorm, by module path (blocks first, then the final norm)."""
    spec = spec_for(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks(model)):
        for local in spec.norms:
            out[f"{spec.blocks}.{i}.{local}"] = block.get_submodule(local)
    out[spec.final_norm] = model.get_submodule(spec.final_norm)
    return out


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Norm weights (and LayerNorm biases), by parameter name."""
    out: dict[str, nn.Parameter] = {}
    for path, module in norm_modules(model).items():
        for pname, p in module.named_parameters(recurse=False):
            out[f"{path}.{pname}"] = p
    return out


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Biases of the prunable matrices (norm biases are counted as norms)."""
    out: dict[str, nn.Parameter] = {}
    for m in matrices(model):
        if m.expert is not None:
            continue
        bias = getattr(m.owner, "bias", None)
        if isinstance(bias, nn.Parameter):
            out[m.name[: -len("weight")] + "bias"] = bias
    return out


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    spec = spec_for(model)
    return {f"{path}.weight": model.get_submodule(path).weight for path in spec.embeddings}


def describe(model: nn.Module) -> dict[str, object]:
    """A JSON-able summary of the map for `inspect` and manifests."""
    spec = spec_for(model)
    ms = matrices(model)
    return {
        "model_type": spec.model_type,
        "class": type(model).__name__,
        "blocks": len(blocks(model)),
        "prunable_matrices": len(ms),
        "prunable_parameters": sum(m.shape[0] * m.shape[1] for m in ms),
        "norm_parameters": sum(p.numel() for p in norm_parameters(model).values()),
        "bias_parameters": sum(p.numel() for p in bias_parameters(model).values()),
    }
