"""Which parameters retrain: PERP's small, expressive subsets, chosen from the arch map.

PERP (Zimmer et al., 2023, arXiv 2312.15230) shows that after pruning, retraining only
the biases and the normalisation parameters (0.01-0.05% of an OPT model) recovers most
of the lost quality, at a fraction of full retraining's memory: gradients and AdamW
state exist only for what is selected. This module decides *what* is selected; the loop
in `training.py` trains it.

Subsets (comma-separated, any combination):

* `biases`     the biases of the prunable projections (`arch.bias_parameters`),
* `norms`      LayerNorm weight and bias, RMSNorm weight, including the final norm,
* `lm_head`    the output projection (tied to the input embeddings on many models:
               then training one trains the other, as they are one tensor),
* `lm_head-lora` a dense LoRA on the output projection (PERP's default set trains one
               beside biases, norms and MaskLoRA; `recipes.retrain.retrain` attaches it and
               merges it densely into an untied lm_head at the end; not a parameter here),
* `embeddings` the input embeddings (and learned positions for OPT/GPT-2),
* `all`        every parameter (full retraining; masks keep pruned weights at zero),
* `none`       nothing (only meaningful with an adapter).

`block=i` restricts the choice to decoder block i, for layer-wise reconstruction.
"""

from __future__ import annotations

import torch
from torch import nn

from perp_cli import arch
from perp_cli.errors import ArchitectureError, UsageError

SUBSETS = ("biases", "norms", "lm_head", "lm_head-lora", "embeddings", "all", "none")
OUTSIDE_BLOCKS = ("lm_head", "lm_head-lora", "embeddings")


def parse_spec(spec: str) -> list[str]:
    """`"biases,norms"` -> `["biases", "norms"]`, rejecting unknown or empty names."""
    parts = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if not parts:
        raise UsageError(f"--train {spec!r} names no subset; choose from {', '.join(SUBSETS)}")
    unknown = [p for p in parts if p not in SUBSETS]
    if unknown:
        raise UsageError(f"--train: unknown subset {unknown[0]!r}; choose a comma list of {', '.join(SUBSETS)}")
    if "none" in parts and len(parts) > 1:
        raise UsageError("--train none cannot be combined with other subsets")
    return list(dict.fromkeys(parts))


def lm_head_is_tied(model: nn.Module) -> bool:
    """True when the output projection and the input embeddings are one tensor."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (`named_parameters` order), so a tied tensor has one name."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _missing_biases_message(model: nn.Module) -> str:
    spec = arch.spec_for(model)
    flags = ", ".join(arch.bias_flags(model))
    if flags:
        return (
            f"{spec.model_type} has no biases on its projections; pass --add-biases to add zero-initialised "
            f"biases (sets the config flags {flags} so the checkpoint loads in plain transformers)"
        )
    return (
        f"{spec.model_type} has no biases on its projections and no config flag that would let a saved "
        "checkpoint load added ones; train norms (and/or an adapter) instead"
    )


def select_trainable(model: nn.Module, spec: str, block: int | None = None) -> dict[str, nn.Parameter]:
    """The parameters named by `spec`, by canonical parameter name, in model order.

    A tied lm_head is returned under its canonical name (the input embedding's), once.
    With `block`, only parameters of that decoder block are chosen (`lm_head` and
    `embeddings` live outside every block and are refused). Asking for `biases` on a
    model without any is an error that points at `--add-biases`, not a silent no-op.
    """
    parts = parse_spec(spec)
    if "none" in parts:
        return {}
    if block is not None:
        n_blocks = len(arch.blocks(model))
        if not 0 <= block < n_blocks:
            raise UsageError(f"block {block} does not exist (the model has {n_blocks})")
        outside = [p for p in parts if p in OUTSIDE_BLOCKS]
        if outside:
            raise UsageError(f"--train {outside[0]} is not part of a decoder block; block-wise training takes biases, norms or all")
    prefix = None if block is None else arch.block_prefix(model, block)
    names = _canonical_names(model)
    chosen: dict[int, nn.Parameter] = {}

    def take(params: dict[str, nn.Parameter] | list[nn.Parameter]) -> None:
        values = params.values() if isinstance(params, dict) else params
        for p in values:
            if prefix is None or names[id(p)].startswith(prefix):
                chosen.setdefault(id(p), p)

    for part in parts:
        if part == "all":
            take(list(model.parameters()))
        elif part == "biases":
            biases = arch.bias_parameters(model)
            if not biases:
                raise UsageError(_missing_biases_message(model))
            take(biases)
        elif part == "norms":
            take(arch.norm_parameters(model))
        elif part == "embeddings":
            take(arch.embedding_parameters(model))
        elif part == "lm_head":
            head = model.get_output_embeddings()
            if head is None:
                raise ArchitectureError(f"{type(model).__name__} has no output projection (lm_head)")
            take([head.weight])
    order = {id(p): i for i, p in enumerate(model.parameters())}
    selected = sorted(chosen.values(), key=lambda p: order[id(p)])
    return {names[id(p)]: p for p in selected}


def set_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Freeze everything, then let exactly `params` receive gradients.

    Frozen parameters get no `.grad` and no optimizer state: that is where PERP's
    memory saving comes from.
    """
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in model.parameters())


def add_biases(model: nn.Module) -> list[str]:
    """Add zero biases to every projection a config bias flag covers; set the flags.

    The flags (LLaMA: `attention_bias`, `mlp_bias`) turn biases on for *all* the
    projections they cover, so all of them get one: a saved checkpoint with the flag set
    but a bias missing would load with random values. Zero biases leave the model's
    function unchanged. Returns the names of the biases added.
    """
    spec = arch.spec_for(model)
    flags = arch.bias_flags(model)
    if not flags:
        raise UsageError(
            f"--add-biases: {spec.model_type} has no config flag for projection biases, so a checkpoint with added "
            "biases would not load in plain transformers; train norms (and/or an adapter) instead"
        )
    added = []
    for flag, locals_ in flags.items():
        setattr(model.config, flag, True)
        for i, block in enumerate(arch.blocks(model)):
            for local in locals_:
                if local not in spec.present[i]:
                    continue
                owner = block.get_submodule(local)
                if getattr(owner, "bias", None) is not None:
                    continue
                w = owner.weight
                owner.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
                added.append(f"{arch.block_prefix(model, i)}{local}.bias")
    return added


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding matrix (`tie_word_embeddings=False`).

    Then `--train lm_head` leaves the input embeddings alone, at the cost of storing the
    matrix twice. Returns False when it was not tied.
    """
    if not lm_head_is_tied(model):
        return False
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    arch.text_config(model).tie_word_embeddings = False
    return True
