"""Low-rank adapters on the prunable matrices, including PERP's sparsity-preserving ones.

Every adapter holds `A [r, in]` and `B [out, r]` (float32) for one `[out, in]` matrix of
the arch map and changes the weight the layer computes with, as its variant says (one
small class per type, `VARIANTS`, with PEFT's `LoraVariant` as the model):

* `lora`       W + s·BA                 plain LoRA (Hu et al.); merging densifies a pruned W,
* `masklora`   W + s·(M ⊙ BA)           PERP's MaskLoRA: the update lives on the kept weights,
* `scalelora`  W ⊙ BA                   PERP's ScaleLoRA (alias `multlora`): a multiplicative
                                        update, so zeros stay zero; A = B = 1/sqrt(r) makes
                                        BA all ones, the model unchanged at step 0,
* `lora-prune` W + s·BA while training, W + M ⊙ (s·BA) in eval mode and when merged
               (dense LoRA pruned at the end, PERP's baseline).

s = alpha / r. M is the mask from `masks.safetensors`, never `W != 0`: a kept weight may
be exactly zero and must still be allowed to move. Standard LoRA initialisation (A
Kaiming-uniform, B = 0) makes `lora`, `masklora` and `lora-prune` exact no-ops at step 0.

How adapters enter the forward pass: the module that owns the weight (`nn.Linear`, GPT-2
`Conv1D`, Mixtral's fused `experts`) keeps its parameters and names; its `forward` is
wrapped so that, for the duration of the call, the parameter slot holds the effective
weight in the parameter's own layout (expert slices stacked back into the 3-D tensor).
The original forward code then runs unchanged, so every layout and routing detail stays
the library's. Plain LoRA on a 2-D layer uses the cheaper `W x + s·B(A x)` path instead of
materialising the weight.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from perp_cli import arch
from perp_cli.errors import CheckpointError, NumericalError, UsageError
from perp_cli.mask import MaskSet, nonzeros_outside
from perp_cli.shards import all_finite

CONFIG_FORMAT = 1
_HOOK_ATTR = "_perp_adapted"


# ----------------------------------------------------------------------------- variants


class LoRA:
    """`lora`: W + s·BA (Hu et al.). Also the additive base the masked variants refine.

    A variant says how one adapter type combines its factors with the weight (as PEFT's
    `LoraVariant`): it holds no state (one instance per type, in `VARIANTS`); the
    `Adapter` passed to each method holds the factors, the scale and the mask.
    """

    name = "lora"
    init_doc = "A kaiming_uniform(a=sqrt(5)), B zeros"  # recorded in adapters.json ("init")
    needs_mask = False  # the update lives on M: refused on a model without masks
    densifies = True  # merging fills the weights M says pruned
    scaled = True  # the update is multiplied by s = alpha / r (adapters.json "scale")
    peft = True  # PEFT's LoRA loads it (--export-peft)

    def init(self, adapter: Adapter) -> None:
        """Standard LoRA initialisation: BA = 0, an exact no-op at step 0."""
        nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
        nn.init.zeros_(adapter.lora_B)

    def masked(self, adapter: Adapter, training: bool) -> bool:
        """Whether the update is restricted to M."""
        return False

    def lowrank_path(self, adapter: Adapter, training: bool) -> bool:
        """True when the update is a dense s·BA, computable as s·B(Ax) without the weight."""
        return not self.masked(adapter, training)

    def forward(self, adapter: Adapter, weight: torch.Tensor, training: bool) -> torch.Tensor:
        """The weight the layer computes with, in `weight`'s dtype and `[out, in]` layout.

        Built in place in the one buffer `BA` allocates (scale, mask, add W): the forward
        pass then creates a single weight-sized tensor per matrix instead of four, which
        keeps MaskLoRA's peak memory close to what its saved tensors need.
        """
        return self.combine(adapter, adapter.product(), weight, adapter.mask if self.masked(adapter, training) else None)

    def combine(self, adapter: Adapter, ba: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The effective weight from `BA` (overwritten), W and the keep-mask (None:
        unmasked), whole or the same rows of each."""
        ba.mul_(adapter.scale)
        if keep is not None and ba.requires_grad:
            # autograd keeps the mask for backward: `keep` itself, which the adapter holds
            # anyway (an inverted mask would be a new byte per weight kept per matrix)
            ba.mul_(keep)
        elif keep is not None:
            # without gradients: `ba.mul_(keep)` would first cast the mask to a float copy (4
            # bytes per weight); zeroing through the inverted mask, a slice of rows at a time,
            # costs a few MiB. The same values (after adding W, whose pruned entries are zero)
            rows = max(1, _CHUNK // max(1, ba.shape[-1]))
            for r in range(0, ba.shape[0], rows):
                ba[r : r + rows].masked_fill_(~keep[r : r + rows], 0.0)
        return ba.add_(weight).to(weight.dtype)

    def delta(self, adapter: Adapter, weight: torch.Tensor, training: bool) -> torch.Tensor:
        """The additive update `effective - W`, float32 `[out, in]`."""
        update = adapter.scale * adapter.product()
        if self.masked(adapter, training):
            update = torch.where(adapter.mask, update, torch.zeros((), dtype=update.dtype, device=update.device))
        return update

    def merge(self, adapter: Adapter, weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The merged weight: the eval-mode forward weight (lora-prune masked), bit for bit,
        with the mask `keep` (`adapter.mask`) passed in, since the merge checks use it too."""
        return self.combine(adapter, adapter.product(), weight, keep if self.masked(adapter, training=False) else None)

    def unmerge(self, adapter: Adapter, merged: torch.Tensor, key: str) -> torch.Tensor:
        """The weight before `merge`, float32 (up to float rounding, as PEFT's): W - delta."""
        return merged.float() - self.delta(adapter, merged, training=False)

    def reference(self, ba: torch.Tensor, weight: torch.Tensor, scale: float, keep: torch.Tensor | None) -> torch.Tensor:
        """W + s·(M ⊙ BA) from rows of BA (overwritten), W and M (None: unmasked), in
        BA's dtype: the merge check's float64 reference, written apart from `forward`."""
        ba.mul_(scale)
        if keep is not None:
            ba.mul_(keep)
        return ba.add_(weight)


class MaskLoRA(LoRA):
    """`masklora`: W + s·(M ⊙ BA), PERP's MaskLoRA: the update lives on the kept weights."""

    name = "masklora"
    needs_mask = True
    densifies = False
    peft = False

    def masked(self, adapter: Adapter, training: bool) -> bool:
        return adapter.has_mask

    def lowrank_path(self, adapter: Adapter, training: bool) -> bool:
        return False  # always W + s·(M ⊙ BA) materialised, on unmasked matrices too


class LoRAPrune(LoRA):
    """`lora-prune`: W + s·BA while training, W + M ⊙ (s·BA) in eval mode and when merged
    (dense LoRA pruned at the end, PERP's baseline)."""

    name = "lora-prune"
    needs_mask = True
    densifies = False
    peft = False

    def masked(self, adapter: Adapter, training: bool) -> bool:
        return adapter.has_mask and not training


class ScaleLoRA(LoRA):
    """`scalelora` (alias `multlora`): W ⊙ BA, PERP's ScaleLoRA. A multiplicative update,
    so zeros stay zero; A = B = 1/sqrt(r) makes BA all ones, the model unchanged at step 0."""

    name = "scalelora"
    init_doc = "A = B = 1/sqrt(rank) (BA all ones)"
    densifies = False
    scaled = False
    peft = False

    def init(self, adapter: Adapter) -> None:
        adapter.lora_A.fill_(1.0 / math.sqrt(adapter.rank))
        adapter.lora_B.fill_(1.0 / math.sqrt(adapter.rank))

    def lowrank_path(self, adapter: Adapter, training: bool) -> bool:
        return False

    def combine(self, adapter: Adapter, ba: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return ba.mul_(weight).to(weight.dtype)

    def delta(self, adapter: Adapter, weight: torch.Tensor, training: bool) -> torch.Tensor:
        """W ⊙ (BA - 1)."""
        return weight.float() * adapter.product() - weight.float()

    def unmerge(self, adapter: Adapter, merged: torch.Tensor, key: str) -> torch.Tensor:
        """W / BA where W' is nonzero; refused where BA is zero on a kept weight (lost)."""
        ba = adapter.product()
        keep = adapter.mask if adapter.mask is not None else torch.ones_like(ba, dtype=torch.bool)
        if bool(((ba == 0) & (merged == 0) & keep).any()):
            raise NumericalError(f"cannot unmerge {key}: BA has zeros, the original weights there are lost")
        return torch.where(merged == 0, torch.zeros_like(ba), merged.float() / ba)

    def reference(self, ba: torch.Tensor, weight: torch.Tensor, scale: float, keep: torch.Tensor | None) -> torch.Tensor:
        return ba.mul_(weight)  # W ⊙ BA


Variant = LoRA  # every variant has LoRA's interface
VARIANTS: dict[str, Variant] = {v.name: v for v in (LoRA(), MaskLoRA(), ScaleLoRA(), LoRAPrune())}
KINDS = tuple(VARIANTS)
ALIASES = {"multlora": "scalelora"}
NEEDS_MASK = tuple(name for name, v in VARIANTS.items() if v.needs_mask)


def canonical_kind(kind: str) -> str:
    """The adapter type for a user-facing name (`multlora` -> `scalelora`)."""
    kind = ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if kind not in KINDS:
        names = ", ".join(KINDS + tuple(ALIASES))
        raise UsageError(f"--adapter {kind!r} is not one of none, {names}")
    return kind


def variant(kind: str) -> Variant:
    """The variant of an adapter type (any user-facing name; UsageError if unknown)."""
    return VARIANTS[canonical_kind(kind)]


class Adapter(nn.Module):
    """Low-rank factors for one `[out, in]` matrix, and how they combine with it."""

    def __init__(
        self,
        kind: str,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        mask: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.kind = canonical_kind(kind)
        self.variant = VARIANTS[self.kind]
        if rank < 1:
            raise UsageError(f"--rank must be at least 1, got {rank}")
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=torch.float32, device=device))
        if mask is not None and tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the matrix {(out_features, in_features)}")
        self._mask = None if mask is None else mask.to(device=device, dtype=torch.bool)
        self._mask_source: Callable[[], torch.Tensor] | None = None
        self.merged = False
        self.reset_parameters()

    @property
    def has_mask(self) -> bool:
        return self._mask is not None or self._mask_source is not None

    @property
    def mask(self) -> torch.Tensor | None:
        """The `[out, in]` keep-mask (bool), or None; read anew at each use when shared."""
        if self._mask_source is not None:
            return self._mask_source()
        return self._mask

    def share_mask(self, source: Callable[[], torch.Tensor]) -> None:
        """Read the mask from `source()` at each use instead of holding it: for a pass
        that uses every mask a few times, one matrix at a time, such as `perp merge`. The
        checkpoint's packed masks are then the only copy (bool masks for every matrix
        would add a quarter of a float32 model to the peak, packed copies 1/32 of it).
        Training keeps its masks unpacked."""
        self._mask = None
        self._mask_source = source

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.variant.init(self)

    def extra_repr(self) -> str:
        return f"{self.kind}, rank={self.rank}, alpha={self.alpha}, masked={self.has_mask}"

    def product(self) -> torch.Tensor:
        """BA, `[out, in]`, float32."""
        return self.lora_B @ self.lora_A

    def lowrank(self, x: torch.Tensor) -> torch.Tensor:
        """s·B(Ax), the dense LoRA update applied to activations."""
        return self.scale * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self, matrix: arch.Matrix, allow_densify: bool = False) -> None:
        """Fold the update into the matrix in place (eval semantics: lora-prune masked).

        Safe: the new weight is computed aside and checked (finite; no nonzero where the
        mask says pruned, unless `allow_densify`) before it replaces the old one.
        """
        if self.merged:
            raise UsageError(f"adapter on {matrix.key} is already merged")
        w = matrix.weight()
        keep = self.mask  # unpacked once: the merge and its checks use it
        new = self.variant.merge(self, w, keep)
        if not _all_finite(new):
            raise NumericalError(f"merging the adapter into {matrix.key} gives NaN or inf; nothing was changed")
        if keep is not None and not allow_densify:
            outside = nonzeros_outside(new, keep)
            if outside:
                raise NumericalError(
                    f"merging the {self.kind} adapter into {matrix.key} would put {outside} nonzeros where the mask says pruned"
                )
        w.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, matrix: arch.Matrix) -> None:
        """Undo `merge` (up to float rounding, as PEFT does): W - delta, or W / BA."""
        if not self.merged:
            raise UsageError(f"adapter on {matrix.key} is not merged")
        w = matrix.weight()
        w.copy_(self.variant.unmerge(self, w, matrix.key).to(w.dtype))
        self.merged = False


_CHUNK = 1 << 20  # elements per slice of the merge's masking and finite checks


def _all_finite(t: torch.Tensor) -> bool:
    """`shards.all_finite` in 1M-element slices (`isfinite` of a whole 5632 x 2048 float32
    matrix allocates 77 MiB, more than the merged matrix itself)."""
    return all_finite(t, _CHUNK)


# ----------------------------------------------------------------------------- lm_head


def attach_lm_head(model: nn.Module, rank: int, alpha: float) -> tuple[Adapter, Any]:
    """A dense LoRA on the output projection (`--train lm_head-lora`, PERP's default
    trainable set): lm_head is never pruned, so the update needs no mask. Returns the
    adapter and the hook handle (remove it when training ends)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise UsageError(f"--train lm_head-lora: {type(model).__name__} has no linear output projection")
    adapter = Adapter("lora", head.out_features, head.in_features, rank, alpha, device=head.weight.device)

    def add_update(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + adapter.lowrank(args[0]).to(output.dtype)

    return adapter, head.register_forward_hook(add_update)


@torch.no_grad()
def merge_lm_head(model: nn.Module, adapter: Adapter) -> bool:
    """Fold the lm_head LoRA into lm_head densely. A tied lm_head is untied first (its
    own copy, `tie_word_embeddings=False`), so the input embeddings stay as they were;
    returns whether it was untied. Checked finite before anything changes."""
    from perp_cli.trainable import lm_head_is_tied, untie_lm_head

    head = model.get_output_embeddings()
    new = head.weight.float() + adapter.variant.delta(adapter, head.weight, training=False)
    if not _all_finite(new):
        raise NumericalError("merging the lm_head LoRA gives NaN or inf; nothing was changed")
    untied = lm_head_is_tied(model) and untie_lm_head(model)
    head.weight.copy_(new.to(head.weight.dtype))
    return untied


# ----------------------------------------------------------------------------- wiring


class _Adapted:
    """One owner module's wrapped forward, with the adapters of its matrices.

    An owner may hold several adapted parameters (Mixtral's `experts` owns both
    `gate_up_proj` and `down_proj`), each possibly with one adapter per expert slice.
    """

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        self.entries: list[tuple[arch.Matrix, Adapter]] = []
        self.original = owner.forward  # bound method of the class: no recursion through the patch
        owner.forward = self.forward
        owner.__dict__[_HOOK_ATTR] = self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = [(m, a) for m, a in self.entries if not a.merged]
        if not live:
            return self.original(*args, **kwargs)
        training = self.owner.training
        (matrix, adapter), *others = live
        # W x + s·B(Ax) saves no weight-sized tensor for backward; without gradients the
        # weight is built as a merge writes it, so an attached adapter computes what its
        # merge will, bit for bit (reconstruction decides whether to keep a block so)
        lowrank = torch.is_grad_enabled() and adapter.variant.lowrank_path(adapter, training)
        if not others and matrix.expert is None and lowrank:
            out = self.original(*args, **kwargs)
            x = args[0] if args else next(iter(kwargs.values()))
            return out + adapter.lowrank(x).to(out.dtype)
        by_attr: dict[str, list[tuple[arch.Matrix, Adapter]]] = {}
        for m, a in live:
            by_attr.setdefault(m.attr, []).append((m, a))
        saved = {attr: self.owner._parameters[attr] for attr in by_attr}

        def build() -> dict[str, torch.Tensor]:
            return {attr: _effective(saved[attr], entries, training) for attr, entries in by_attr.items()}

        effective = build()
        recompute = _Recompute(build, effective) if torch.is_grad_enabled() and not _outer_saved_hooks() else None
        try:
            # a plain tensor in the parameter's slot, for this call only
            self.owner._parameters.update(effective)
            if recompute is None:
                return self.original(*args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(recompute.pack, recompute.unpack):
                return self.original(*args, **kwargs)
        finally:
            self.owner._parameters.update(saved)

    def restore(self) -> None:
        del self.owner.forward
        del self.owner.__dict__[_HOOK_ATTR]


class _Recompute:
    """Saved-tensor hooks that keep a recipe, not a copy, of the effective weights.

    The layer's backward needs its weight to compute the input gradient. Saving the
    materialised W + s·(M⊙BA) would hold a second copy of every adapted matrix until the
    backward pass (the reference implementation does): a whole model's worth of memory.
    Instead the saved tensor is replaced by (which weight, its view geometry) and
    rebuilt from W, A and B when the backward pass asks for it; they cannot change in
    between, since the optimizer steps only after the backward pass. The cost is one
    extra `BA` per matrix per backward.
    """

    def __init__(self, build: Any, effective: dict[str, torch.Tensor]) -> None:
        self.build = build
        self.storages = {t.untyped_storage().data_ptr(): attr for attr, t in effective.items()}
        self.cache: dict[str, torch.Tensor] | None = None

    def pack(self, t: torch.Tensor) -> Any:
        try:
            attr = self.storages.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without plain storage
            return t
        if attr is None:
            return t
        return attr, t.size(), t.stride(), t.storage_offset()

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        attr, size, stride, offset = packed
        if self.cache is None:
            with torch.no_grad():
                self.cache = self.build()
        return self.cache[attr].as_strided(size, stride, offset)


def _outer_saved_hooks() -> bool:
    """True inside activation checkpointing (or another saved-tensor manager).

    Checkpointing already discards and recomputes everything the block saves, the
    effective weights included; hooks of ours would take precedence inside the layer and
    keep its inputs alive, undoing checkpointing's saving.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _effective(param: torch.Tensor, entries: list[tuple[arch.Matrix, Adapter]], training: bool) -> torch.Tensor:
    """The effective parameter, in the parameter's own layout (3-D for fused experts)."""
    if entries[0][0].expert is None:
        (matrix, adapter), = entries
        effective = adapter.variant.forward(adapter, matrix.out_in(param), training)
        return matrix.to_param_layout(effective).contiguous()
    by_expert = {m.expert: (m, a) for m, a in entries}
    slices = []
    for e in range(param.shape[0]):
        if e in by_expert:
            m, a = by_expert[e]
            effective = a.variant.forward(a, m.out_in(param), training)
            slices.append(m.to_param_layout(effective))
        else:
            slices.append(param[e])
    return torch.stack(slices)


def matrix_mask(matrix: arch.Matrix, masks: MaskSet | None) -> torch.Tensor | None:
    """The `[out, in]` keep-mask of one matrix (a view of the stored mask), or None."""
    if masks is None or matrix.name not in masks:
        return None
    return matrix.out_in(masks[matrix.name])


def match_targets(model: nn.Module, targets: str | None, block: int | None = None) -> list[arch.Matrix]:
    """Prunable matrices whose key (`name` or `name[expert]`) matches the regex (all if None).

    `block` restricts them to one decoder block (layer-wise reconstruction).
    """
    if block is None:
        found = arch.matrices(model)
    else:
        n_blocks = len(arch.blocks(model))
        if not 0 <= block < n_blocks:
            raise UsageError(f"block {block} does not exist (the model has {n_blocks})")
        found = arch.block_matrices(model, block)
    if not targets:
        return found
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise UsageError(f"--adapter-targets {targets!r} is not a valid regular expression: {exc}") from exc
    chosen = [m for m in found if pattern.search(m.key)]
    if not chosen:
        raise UsageError(f"--adapter-targets {targets!r} matches no prunable matrix (names look like {found[0].key})")
    return chosen


def attached_matrices(model: nn.Module) -> dict[str, tuple[arch.Matrix, Adapter]]:
    """The adapters currently attached to `model`, with their matrices, by matrix key."""
    out: dict[str, tuple[arch.Matrix, Adapter]] = {}
    seen: set[int] = set()
    for m in arch.matrices(model):
        hook = m.owner.__dict__.get(_HOOK_ATTR)
        if hook is not None and id(hook) not in seen:
            seen.add(id(hook))
            out.update({mm.key: (mm, a) for mm, a in hook.entries})
    return out


def attached(model: nn.Module) -> dict[str, Adapter]:
    """The adapters currently attached to `model`, by matrix key."""
    return {key: a for key, (_, a) in attached_matrices(model).items()}


def _wire(pairs: list[tuple[arch.Matrix, Adapter]]) -> dict[str, Adapter]:
    """Wrap the forward of each adapted matrix's owner (once per owner) to apply its
    adapters; returns the adapters by matrix key."""
    hooks: dict[int, _Adapted] = {}
    for m, adapter in pairs:
        if id(m.owner) not in hooks:
            hooks[id(m.owner)] = _Adapted(m.owner)
        hooks[id(m.owner)].entries.append((m, adapter))
    return {m.key: adapter for m, adapter in pairs}


def attach(
    model: nn.Module,
    kind: str,
    rank: int = 16,
    alpha: float = 32.0,
    targets: str | None = None,
    masks: MaskSet | None = None,
    block: int | None = None,
) -> dict[str, Adapter]:
    """Attach a fresh adapter of `kind` to every targeted matrix; return them by key.

    `masklora` and `lora-prune` need `masks` (from `masks.safetensors`); matrices the
    masks do not cover are dense, and their update is unrestricted. Initialisation draws
    from torch's global RNG: seed it first for reproducible adapters.
    """
    kind = canonical_kind(kind)
    if VARIANTS[kind].needs_mask and (masks is None or len(masks) == 0):
        raise UsageError(f"--adapter {kind} restricts the update to the pruning mask, but the input has no masks.safetensors (use scalelora or lora for a dense model)")
    if attached(model):
        raise UsageError("the model already has adapters attached; merge or detach them first")
    pairs = [(m, Adapter(kind, *m.shape, rank, alpha, mask=matrix_mask(m, masks), device=m.parameter.device))
             for m in match_targets(model, targets, block)]
    return _wire(pairs)


def detach(model: nn.Module) -> dict[str, Adapter]:
    """Remove every adapter (merged or not) and restore the original forwards."""
    removed = attached(model)
    for m in arch.matrices(model):
        hook = m.owner.__dict__.get(_HOOK_ATTR)
        if hook is not None:
            hook.restore()
    return removed


def state_dict(adapters: dict[str, Adapter]) -> dict[str, torch.Tensor]:
    """`{key}.lora_A` / `{key}.lora_B` tensors for `adapters.safetensors` (masks live elsewhere)."""
    out = {}
    for key, a in adapters.items():
        out[f"{key}.lora_A"] = a.lora_A.detach().float().cpu().contiguous()
        out[f"{key}.lora_B"] = a.lora_B.detach().float().cpu().contiguous()
    return out


def config(adapters: dict[str, Adapter], targets: str | None) -> dict[str, Any]:
    """`adapters.json`: everything needed to re-attach them (type, rank, alpha, targets, init)."""
    first = next(iter(adapters.values()))
    return {
        "format": CONFIG_FORMAT,
        "type": first.kind,
        "rank": first.rank,
        "alpha": first.alpha,
        "scale": first.scale if first.variant.scaled else None,
        "targets": targets,
        "init": first.variant.init_doc,
        "masked": first.variant.needs_mask,
        "matrices": list(adapters),
    }


def saved_matrices(
    model: nn.Module, cfg: dict[str, Any], shape_of: Callable[[str], tuple[int, ...] | None], has_masks: bool
) -> tuple[str, int, float, dict[str, arch.Matrix]]:
    """Check a saved `adapters.json` and the shapes of its tensors (`shape_of(name)`, None
    when absent) against `model` before any adapter is built; returns the kind, rank,
    alpha and the adapted matrices by key."""
    if not isinstance(cfg, dict) or "type" not in cfg or "matrices" not in cfg:
        raise CheckpointError("adapters.json lacks 'type' or 'matrices'; it was not written by perp retrain")
    if int(cfg.get("format", 1)) > CONFIG_FORMAT:
        raise CheckpointError(f"adapters.json has format {cfg.get('format')}; this perp reads up to {CONFIG_FORMAT}")
    kind = canonical_kind(str(cfg["type"]))
    if VARIANTS[kind].needs_mask and not has_masks:
        raise CheckpointError(f"the checkpoint has {kind} adapters but no masks.safetensors to restrict them")
    rank, alpha = int(cfg["rank"]), float(cfg["alpha"])
    by_key = {m.key: m for m in arch.matrices(model)}
    chosen: dict[str, arch.Matrix] = {}
    for key in cfg["matrices"]:
        m = by_key.get(key)
        if m is None:
            raise CheckpointError(f"adapters.json names {key}, which is not a prunable matrix of this model")
        out_f, in_f = m.shape
        if shape_of(f"{key}.lora_A") != (rank, in_f) or shape_of(f"{key}.lora_B") != (out_f, rank):
            raise CheckpointError(f"adapters.safetensors lacks {key}.lora_A/B of shapes {(rank, in_f)} / {(out_f, rank)}")
        chosen[key] = m
    return kind, rank, alpha, chosen


def saved_adapter(
    kind: str, m: arch.Matrix, rank: int, alpha: float, masks: MaskSet | None, tensors: dict[str, torch.Tensor]
) -> Adapter:
    """Matrix `m`'s adapter rebuilt from its saved `{key}.lora_A/B` in `tensors`."""
    device = m.parameter.device
    adapter = Adapter(kind, *m.shape, rank, alpha, mask=matrix_mask(m, masks), device=device)
    with torch.no_grad():  # the loaded factors themselves (float32 on the device: no copy), not a second copy
        adapter.lora_A.set_(tensors[f"{m.key}.lora_A"].to(device=device, dtype=torch.float32))
        adapter.lora_B.set_(tensors[f"{m.key}.lora_B"].to(device=device, dtype=torch.float32))
    return adapter


def attach_saved(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    masks: MaskSet | None,
    share_masks: bool = False,
) -> dict[str, Adapter]:
    """Re-attach adapters written by `state_dict` + `config`, checking they fit the model.

    `share_masks`: each adapter reads its mask from `masks`' packed bits at each use
    (`Adapter.share_mask`) instead of holding a copy."""
    if attached(model):
        raise UsageError("the model already has adapters attached")

    def shape_of(name: str) -> tuple[int, ...] | None:
        return tuple(tensors[name].shape) if name in tensors else None

    kind, rank, alpha, chosen = saved_matrices(model, cfg, shape_of, masks is not None)
    pairs = []
    for m in chosen.values():
        shared = share_masks and masks is not None and m.name in masks
        adapter = saved_adapter(kind, m, rank, alpha, None if shared else masks, tensors)
        if shared:
            adapter.share_mask(_mask_reader(m, masks))
        pairs.append((m, adapter))
    return _wire(pairs)


def _mask_reader(m: arch.Matrix, masks: MaskSet) -> Callable[[], torch.Tensor]:
    """Unpacks matrix `m`'s `[out, in]` keep-mask from `masks` at each call (for an
    expert of a fused parameter, that expert's bits only)."""
    expected = tuple(m.parameter.shape)
    if tuple(masks.masks.shape(m.name)) != expected:
        raise CheckpointError(f"the mask of {m.name} has shape {tuple(masks.masks.shape(m.name))}, the weight {expected}")
    device = m.parameter.device

    def read() -> torch.Tensor:
        return m.to_param_layout(masks.masks.part(m.name, m.expert)).to(device)

    return read


def attach_from_checkpoint(ckpt: Any, share_masks: bool = False) -> dict[str, Adapter]:
    """Re-attach a checkpoint's unmerged adapters to `ckpt.model` in place (`share_masks`:
    as in `attach_saved`).

    After this the model computes exactly what `perp merge` would write (lora-prune in
    eval mode is masked). Returns the adapters (empty when the checkpoint has none).
    """
    if ckpt.adapters_config is None:
        return {}
    return attach_saved(ckpt.model, ckpt.adapters or {}, ckpt.adapters_config, ckpt.masks, share_masks)


# ----------------------------------------------------------------------------- PEFT export


def peft_files(adapters: dict[str, Adapter], model: nn.Module, base_model: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`adapter_config.json` and `adapter_model.safetensors` contents PEFT's LoRA loads.

    Only plain `lora` on 2-D layers has a PEFT equivalent; the base model must be the
    retrained checkpoint (its biases and norms may have changed too).
    """
    kinds = {a.kind for a in adapters.values() if not a.variant.peft}
    if kinds:
        raise UsageError(f"--export-peft needs --adapter lora; PEFT has no equivalent of {', '.join(sorted(kinds))}")
    by_key = {m.key: m for m in arch.matrices(model)}
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for key, a in adapters.items():
        m = by_key[key]
        if m.expert is not None:
            raise UsageError("--export-peft cannot export adapters on fused expert weights")
        module = m.name[: -len(".weight")]
        modules.append(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.lora_A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = a.lora_B.detach().float().cpu().contiguous()
    first = next(iter(adapters.values()))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": modules,
        "fan_in_fan_out": any(by_key[key].transposed for key in adapters),
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return cfg, tensors
