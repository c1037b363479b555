"""Cutting a model down to a smaller dense one: the plan of what to keep, and the rebuild.

Every structure (depth, width, heads, experts) ends in the same place: a `Surgery` that
says which blocks survive, which indices of which tensors are kept, and the config the
smaller model has. `apply` then

1. takes the model's state dict, drops the removed blocks (renumbering the rest) and
   `index_select`s the kept rows/columns/experts of the sliced tensors;
2. builds the smaller model from the new config with `checkpoint.build_skeleton`
   (parameters on meta, buffers such as rotary tables computed from the config), which
   is exactly the module tree `AutoModelForCausalLM.from_pretrained` will build;
3. puts the tensors into it, requiring every parameter to be present with the shape the
   config implies. A config that cannot express the cut fails here, before anything is
   written, instead of producing a directory transformers cannot load.

Tied parameters (a tied `lm_head`) stay tied: the second name of a shared parameter
gets the same `nn.Parameter` as the first.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perp_cli import arch, checkpoint
from perp_cli.errors import ArchitectureError, UsageError

Slice = tuple[int, torch.Tensor]  # (dimension, kept indices in increasing order)


@dataclass
class Surgery:
    """What survives: `keep_blocks` (None: all), per-tensor `slices` by state-dict name
    (old names), and the `config` of the smaller model."""

    config: Any
    keep_blocks: list[int] | None = None
    slices: dict[str, list[Slice]] = field(default_factory=dict)

    def cut(self, name: str, dim: int, keep: torch.Tensor) -> None:
        self.slices.setdefault(name, []).append((dim, keep))


def new_config(model: nn.Module) -> tuple[Any, Any]:
    """A deep copy of the model's config and its text config (the one that describes the
    decoder; the same object for a text-only model)."""
    config = copy.deepcopy(model.config)
    get = getattr(config, "get_text_config", None)
    return config, (get() if callable(get) else config)


def check_config(config: Any, what: str) -> None:
    """The smaller config must survive a save and reload: transformers validates a
    config when it is built (a LLaMA config needs hidden_size divisible by
    num_attention_heads, even with an explicit head_dim), and a directory whose config
    fails that check cannot be loaded. A usage error naming the rule, before any work."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception as exc:  # transformers raises several kinds; the message is what matters
        text = str(exc).strip().splitlines()
        reason = next((line for line in text if "(" in line and not line.startswith("Class validation")), text[-1] if text else type(exc).__name__)
        raise UsageError(f"{what} gives a config {config.model_type} refuses: {reason.strip()}") from exc


def block_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in arch.blocks(model).parameters())


def _renamer(prefix: str, keep_blocks: list[int] | None):
    if keep_blocks is None:
        return lambda name: name
    new_index = {old: new for new, old in enumerate(keep_blocks)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")

    def rename(name: str) -> str | None:
        m = pattern.match(name)
        if m is None:
            return name
        old = int(m.group(1))
        if old not in new_index:
            return None
        return f"{prefix}.{new_index[old]}.{name[m.end():]}"

    return rename


def apply(model: nn.Module, surgery: Surgery) -> nn.Module:
    """The smaller model (see the module docstring). `model` is only read."""
    rename = _renamer(arch.spec_for(model).blocks, surgery.keep_blocks)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        new_name = rename(name)
        if new_name is None:
            continue
        t = tensor.detach()
        for dim, keep in surgery.slices.get(name, []):
            t = t.index_select(dim, keep.to(t.device))
        state[new_name] = t
    unused = [n for n in surgery.slices if rename(n) is None or n not in model.state_dict()]
    if unused:
        raise ArchitectureError(f"internal: the cut names {unused[0]}, which the model does not hold")
    check_config(surgery.config, "the cut")
    dtype = next(model.parameters()).dtype
    smaller = checkpoint.build_skeleton(surgery.config, dtype)
    _materialize(smaller, state)
    smaller.eval()
    return smaller


def _materialize(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `state` into a skeleton built on meta, checking names and shapes."""
    done: dict[int, nn.Parameter] = {}
    wanted = dict(model.named_parameters(remove_duplicate=False))
    for name, param in wanted.items():
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if id(param) in done:
            owner._parameters[attr] = done[id(param)]
            continue
        if name not in state:
            raise ArchitectureError(
                f"the smaller config expects {name}, which the cut model does not hold: this config cannot express the cut"
            )
        tensor = state[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ArchitectureError(
                f"the smaller config builds {name} as {list(param.shape)} but the cut gives {list(tensor.shape)}: "
                "this config cannot express the cut"
            )
        new = nn.Parameter(tensor.to(param.dtype).contiguous().clone(), requires_grad=param.requires_grad)
        owner._parameters[attr] = new
        done[id(param)] = new
    buffers = {n for n, _ in model.named_buffers()}
    persistent = set(model.state_dict()) & buffers
    for name in persistent:
        if name in state:
            owner_path, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            current = owner._buffers[attr]
            if tuple(current.shape) == tuple(state[name].shape):
                owner._buffers[attr] = state[name].to(current.dtype).clone()
    extra = sorted(set(state) - set(wanted) - buffers)
    if extra:
        raise ArchitectureError(f"the smaller config has no place for {extra[0]}: this config cannot express the cut")
