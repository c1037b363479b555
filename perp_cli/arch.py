"""The one architecture map: where a decoder-only causal LM keeps its blocks, prunable
matrices, norms and biases, derived from the loaded model itself.

Every step (prune, retrain, reconstruct, merge, inspect) asks this module, never the
model's class name or `hasattr` guesses. `discover(model)` walks the module tree once
(the result is cached on the model):

* **blocks**: the `nn.ModuleList` whose elements are instances of the classes named in
  `model._no_split_modules` (transformers declares each family's decoder layer there),
  else the longest ModuleList of one repeated class. Exactly one candidate, or an error.
* **prunable matrices** (in registration order): every `nn.Linear` (and subclasses),
  GPT-2 `Conv1D` and 3-D fused expert parameter inside a block. Never pruned: routers
  and gates (a linear whose output width is the number of experts, or 1), anything else
  that is not a matrix, embeddings and `lm_head` (outside the blocks).
* **norms**: every LayerNorm/RMSNorm-like module in a block (q/k norms, sandwich norms
  included) and the final norm; **biases**: those of the prunable matrices (expert
  biases such as `gate_up_proj_bias` included).
* **input groups** (matrices reading the same tensor share calibration statistics):
  found by hooks on one short forward that compare the input tensors, so fused qkv,
  parallel attention+MLP blocks and sandwich norms need no naming. Grouping only saves
  work: a matrix alone in its group gets the same statistics, so a model that cannot
  run the probe (a meta-device skeleton while streaming) falls back to one group per
  matrix with identical results.

Two layouts need care, and `Matrix.weight()` hides both behind an `[out, in]` view that
shares storage with the parameter (writes through the view land in the real weight):

* GPT-2's `Conv1D` stores its weight `[in, out]`;
* fused experts are 3-D, either `[E, out, in]` (Mixtral, Qwen3-MoE, OLMoE...) or
  `[E, in, out]` (gpt-oss, Llama 4). The orientation is read from the config's hidden
  size (the dimension that equals it is the input of the first projection and the
  output of the last), never from the family name. Each expert's slice is a separate
  matrix (`Matrix.expert`); its mask lives in one 3-D tensor under the parameter's name.

`OVERRIDES` holds the documented exceptions where discovery alone is not what perp wants.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from perp_cli.errors import ArchitectureError, UsageError

_CACHE = "_perp_arch_spec"
_GROUPS_CACHE = "_perp_arch_groups"
PROBE_TOKENS = 8
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

# Documented exceptions, by config.model_type: each entry is tested in tests/test_arch.py.
# * opt: OPTAttention registers k_proj, v_proj before q_proj; perp has always listed
#   q, k, v (matrix order decides the random method's draws and the order of reports),
#   so the attention projections keep that order.
OVERRIDES: dict[str, dict[str, tuple[str, ...]]] = {
    "opt": {"order": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
}


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model, as dotted paths.

    `matrices` and `norms` are relative to a block, in order (a block may lack some:
    hybrid models interleave dense and MoE blocks). `transposed` names the matrices
    stored `[in, out]` (per expert for 3-D ones); `fused_experts` the 3-D ones.
    `excluded` lists what a block holds that is never pruned, with the reason.
    """

    model_type: str
    model_class: str
    blocks: str
    block_classes: tuple[str, ...]
    matrices: tuple[str, ...]
    norms: tuple[str, ...]
    final_norm: str | None
    embeddings: tuple[str, ...]
    transposed: frozenset[str] = frozenset()
    fused_experts: frozenset[str] = frozenset()
    excluded: tuple[tuple[str, str], ...] = ()
    present: tuple[frozenset[str], ...] = field(default=(), repr=False)  # per block: which matrices/norms exist


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
        return self.out_in(self.parameter.data)

    def to_param_layout(self, out_in: torch.Tensor) -> torch.Tensor:
        """Turn an `[out, in]` tensor back into this slice's stored layout."""
        return out_in.t() if self.transposed else out_in

    def out_in(self, param_tensor: torch.Tensor) -> torch.Tensor:
        """The `[out, in]` view of this slice of a tensor shaped like the whole parameter
        (its mask): the expert's slice of a fused one, transposed for `[in, out]` storage."""
        t = param_tensor if self.expert is None else param_tensor[self.expert]
        return self.to_param_layout(t)

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.weight().shape
        return int(out), int(inp)


# ----------------------------------------------------------------------------- discovery


def text_config(model: nn.Module) -> object:
    """The config of the decoder (a multimodal model's text config)."""
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def expert_count(model: nn.Module) -> int | None:
    """The number of routed experts the config declares, or None for a dense model."""
    config = text_config(model)
    for key in EXPERT_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def hidden_size(model: nn.Module) -> int | None:
    value = getattr(text_config(model), "hidden_size", None)
    return value if isinstance(value, int) else None


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D`: a linear layer stored `[in, out]` (not a convolution)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the families' own RMSNorm classes, with parameters."""
    if isinstance(module, (nn.Linear, nn.Embedding)) or _is_conv1d(module):
        return False
    norm_like = isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
    return norm_like and any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.children())


def under(path: str, prefix: str) -> bool:
    """Whether dotted `path` is `prefix` or inside it."""
    return path == prefix or path.startswith(prefix + ".")


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: see the module docstring."""
    declared = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    candidates = [(p, m) for p, m in lists if declared and all(type(b).__name__ in declared for b in m)]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    how = f"a ModuleList of {', '.join(sorted(declared))} (model._no_split_modules)" if declared else "model._no_split_modules (empty)"
    if not candidates:
        uniform = [(p, m) for p, m in lists if len({type(b) for b in m}) == 1]
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        decoder_path = next((p for p, m in model.named_modules() if m is decoder), None) if decoder is not None else None
        if decoder_path:  # a multimodal model: prefer the language model's lists
            uniform = [(p, m) for p, m in uniform if under(p, decoder_path)] or uniform
        if uniform:
            longest = max(len(m) for _, m in uniform)
            candidates = [(p, m) for p, m in uniform if len(m) == longest]
        how += " or, failing that, the longest ModuleList of one repeated block class"
    decoder = model.get_decoder() if len(candidates) > 1 and hasattr(model, "get_decoder") else None
    if decoder is not None:  # a multimodal model: the language model's blocks, not the vision tower's
        decoder_path = next((p for p, m in model.named_modules() if m is decoder), None)
        if decoder_path is not None:
            candidates = [(p, m) for p, m in candidates if under(p, decoder_path) or not decoder_path] or candidates
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(p for p, _ in candidates)
        raise ArchitectureError(f"cannot find the decoder blocks of {type(model).__name__} (model_type={model_type!r}): looked for {how}; found {found}")
    return candidates[0]


def _expert_orientation(owner: nn.Module, params: dict[str, torch.Tensor], hidden: int | None) -> bool | None:
    """True when the owner's 3-D experts are stored `[E, in, out]`, from the hidden size.

    The first projection (registered first) reads the hidden state and the last writes
    it: stored `[E, out, in]`, the first has the hidden size last and the last has it in
    the middle (`gate_up [E, 2I, H]`, `down [E, H, I]`); stored `[E, in, out]` it is the
    other way round (`[E, H, 2I]`, `[E, I, H]`). When the sizes cannot tell (one
    parameter, or every size equal), transformers' `is_transposed` attribute decides.
    """
    shapes = [tuple(int(d) for d in p.shape) for p in params.values()]
    if hidden is not None and len(shapes) >= 2:
        first, last = shapes[0], shapes[-1]
        out_in = first[2] == hidden and last[1] == hidden
        in_out = first[1] == hidden and last[2] == hidden
        if out_in != in_out:
            return in_out
    flag = getattr(owner, "is_transposed", None)
    return bool(flag) if isinstance(flag, bool) else None


def discover(model: nn.Module) -> ArchSpec:
    """Derive the map from `model`'s module tree (no forward pass; works on meta)."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", None) or type(model).__name__)
    blocks_path, block_list = _find_blocks(model)
    n_experts = expert_count(model)
    hidden = hidden_size(model)
    matrices: list[str] = []
    norms: list[str] = []
    transposed: set[str] = set()
    fused: set[str] = set()
    excluded: dict[str, str] = {}
    present: list[frozenset[str]] = []
    covered_params: set[str] = set()

    def add(seq: list[str], local: str) -> None:
        if local not in seq:
            seq.append(local)

    for block in block_list:
        here: set[str] = set()
        for path, module in block.named_modules():
            if not path:
                continue
            if isinstance(module, nn.Linear) or _is_conv1d(module):
                out_features = module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0]
                covered_params.update(f"{path}.{n}" for n, _ in module.named_parameters(recurse=False))
                if out_features == 1 or (n_experts is not None and out_features == n_experts):
                    why = "gate (output width 1)" if out_features == 1 else f"router (output width = {n_experts} experts)"
                    excluded.setdefault(f"{path}.weight", why)
                    continue
                add(matrices, path)
                here.add(path)
                if _is_conv1d(module):
                    transposed.add(path)
                continue
            if _is_norm(module):
                add(norms, path)
                here.add(path)
                covered_params.update(f"{path}.{n}" for n, _ in module.named_parameters(recurse=False))
                continue
            own = dict(module.named_parameters(recurse=False))
            three_d = {
                n: p for n, p in own.items()
                if p.dim() == 3 and min(p.shape) > 1 and not isinstance(module, nn.modules.conv._ConvNd)
                and n_experts is not None and p.shape[0] == n_experts
            }
            if three_d:
                is_t = _expert_orientation(module, three_d, hidden)
                if is_t is None:
                    raise ArchitectureError(
                        f"cannot tell how {type(model).__name__}'s experts {path} ({type(module).__name__}) store their "
                        f"weights: neither dimension of {', '.join(three_d)} is uniquely the hidden size {hidden}"
                    )
                for n in three_d:
                    local = f"{path}.{n}"
                    add(matrices, local)
                    here.add(local)
                    fused.add(local)
                    if is_t:
                        transposed.add(local)
                    covered_params.add(local)
                    if f"{n}_bias" in own:
                        covered_params.add(f"{local}_bias")
        present.append(frozenset(here))
        for name, p in block.named_parameters():
            if name not in covered_params and name not in excluded:
                is_router = n_experts is not None and p.dim() == 2 and sorted(p.shape) == sorted((n_experts, hidden or -1))
                what = "router" if is_router else "not a linear, Conv1D or expert matrix"
                excluded[name] = f"{what} ({'x'.join(map(str, p.shape))})"
    order = OVERRIDES.get(model_type, {}).get("order")
    if order:
        first = [m for m in order if m in matrices]
        at = min(matrices.index(m) for m in first) if first else 0
        rest = [m for m in matrices if m not in first]
        matrices = rest[:at] + first + rest[at:]
    if not matrices:
        raise ArchitectureError(
            f"{type(model).__name__} has no prunable matrix in its blocks {blocks_path}: looked for nn.Linear, "
            "GPT-2 Conv1D and 3-D fused expert weights"
        )
    outside = [(p, m) for p, m in model.named_modules() if p and not under(p, blocks_path)]
    embeddings = tuple(p for p, m in outside if isinstance(m, nn.Embedding))
    base = blocks_path.rpartition(".")[0]  # the base model that runs the blocks also runs the final norm
    outside_norms = [p for p, m in outside if _is_norm(m) and (not base or under(p, base))]
    for p, m in outside:
        if isinstance(m, nn.Embedding):
            excluded.setdefault(f"{p}.weight", "embedding")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head_path = next((p for p, m in outside if m is head), "lm_head")
        excluded.setdefault(f"{head_path}.weight", "output projection (lm_head)")
    return ArchSpec(
        model_type=model_type,
        model_class=type(model).__name__,
        blocks=blocks_path,
        block_classes=tuple(dict.fromkeys(type(b).__name__ for b in block_list)),
        matrices=tuple(matrices),
        norms=tuple(norms),
        final_norm=outside_norms[-1] if outside_norms else None,
        embeddings=embeddings,
        transposed=frozenset(transposed),
        fused_experts=frozenset(fused),
        excluded=tuple(excluded.items()),
        present=tuple(present),
    )


def spec_for(model: nn.Module) -> ArchSpec:
    """The map of `model` (discovered once, then cached on the model)."""
    cached = model.__dict__.get(_CACHE)
    if isinstance(cached, ArchSpec):
        return cached
    spec = discover(model)
    model.__dict__[_CACHE] = spec
    return spec


def blocks(model: nn.Module) -> nn.ModuleList:
    """The ordered decoder blocks."""
    return model.get_submodule(spec_for(model).blocks)


def block_prefix(model: nn.Module, index: int | None = None) -> str:
    """The name prefix of block `index`'s tensors (`model.layers.3.`), or of every
    block's (`model.layers.`) when `index` is None."""
    blocks_path = spec_for(model).blocks
    return f"{blocks_path}." if index is None else f"{blocks_path}.{index}."


def block_names(model: nn.Module, names: Iterable[str], index: int | None = None) -> list[str]:
    """Those of `names` inside block `index` (inside any block when None), in order."""
    prefix = block_prefix(model, index)
    return [n for n in names if n.startswith(prefix)]


def outside_blocks(model: nn.Module, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Those of `names` outside the blocks, split as a forward runs them: what runs
    before block 0 (embeddings, positions) and what runs after the last block (the
    final norm and an untied head; a tied head is the embedding)."""
    spec = spec_for(model)
    tail = set() if spec.final_norm is None else {f"{spec.final_norm}.{n}" for n, _ in model.get_submodule(spec.final_norm).named_parameters()}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embedding.weight:
        tail |= {n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight}
    prefix = block_prefix(model)
    outside = [n for n in names if not n.startswith(prefix)]
    return [n for n in outside if n not in tail], [n for n in outside if n in tail]


def transposed_names(model: nn.Module) -> set[str]:
    """Parameter names of every prunable matrix stored with inputs along dim -2."""
    return {m.name for m in matrices(model) if m.transposed}


def _expand(spec: ArchSpec, index: int, block: nn.Module, local: str) -> list[Matrix]:
    is_t = local in spec.transposed
    if local in spec.fused_experts:
        owner_path, attr = local.rsplit(".", 1)
        owner = block.get_submodule(owner_path)
        param = getattr(owner, attr)
        name = f"{spec.blocks}.{index}.{local}"
        return [
            Matrix(name=name, block=index, local=local, owner=owner, attr=attr, expert=e, transposed=is_t)
            for e in range(param.shape[0])
        ]
    return [
        Matrix(
            name=f"{spec.blocks}.{index}.{local}.weight",
            block=index,
            local=local,
            owner=block.get_submodule(local),
            attr="weight",
            transposed=is_t,
        )
    ]


_ATTENTION = re.compile(r"(^|[._])(self_)?(attn|attention)([._]|$)")


def is_attention(matrix: Matrix) -> bool:
    """Whether a matrix belongs to the block's attention half (by its module path:
    `self_attn`, `attn`, `attention`, `self_attention`); the rest is the MLP half. Used
    where a method treats the halves differently (DSnoT's reference skips the MLP)."""
    return bool(_ATTENTION.search(matrix.local))


def block_matrices(model: nn.Module, index: int) -> list[Matrix]:
    """Prunable matrices of block `index`, in the map's order (experts expanded)."""
    spec = spec_for(model)
    block = blocks(model)[index]
    out: list[Matrix] = []
    for local in spec.matrices:
        if local in spec.present[index]:
            out.extend(_expand(spec, index, block, local))
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


# ----------------------------------------------------------------------------- input groups


def _tensor_key(t: torch.Tensor) -> tuple:
    if t.is_meta:
        return ("id", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _probe_shared_inputs(model: nn.Module) -> dict[str, tuple] | None:
    """For each non-expert matrix owner (by full module path), the key of the tensor it
    read on one short forward; None when the model cannot run (meta weights, or a failure)."""
    if any(p.is_meta for p in model.parameters()):
        return None
    spec = spec_for(model)
    owners = {}
    for i, block in enumerate(blocks(model)):
        for local in spec.matrices:
            if local in spec.present[i] and local not in spec.fused_experts:
                owners[f"{spec.blocks}.{i}.{local}"] = block.get_submodule(local)
    seen: dict[str, tuple] = {}
    alive: list[torch.Tensor] = []  # keep inputs alive so no storage address is reused mid-probe

    def hook_for(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if isinstance(x, torch.Tensor) and path not in seen:
                alive.append(x)
                seen[path] = _tensor_key(x)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(p), with_kwargs=True) for p, m in owners.items()]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = embedding.weight.device if embedding is not None else next(model.parameters()).device
    vocab = embedding.weight.shape[0] if embedding is not None else 2
    ids = (torch.arange(PROBE_TOKENS, device=device) % max(vocab - 1, 1) + 1).unsqueeze(0)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception:  # the probe is an optimisation; singleton groups are always correct
        return None
    finally:
        for h in handles:
            h.remove()
    return seen


def input_groups(model: nn.Module, index: int) -> list[list[Matrix]]:
    """Matrices of block `index` grouped by shared input (one group per expert slice).

    Groups are ordered by their first matrix, members in matrix order; fused experts
    form one group per parameter and expert.
    """
    cached = model.__dict__.get(_GROUPS_CACHE)
    if cached is None:
        cached = model.__dict__[_GROUPS_CACHE] = {"keys": _probe_shared_inputs(model)}
    keys = cached["keys"]
    groups: dict[tuple, list[Matrix]] = {}  # by what the group shares, in order of first matrix
    for m in block_matrices(model, index):
        if m.expert is not None:
            key = ("expert", m.local, m.expert)
        else:  # a matrix whose input was not probed is a group of its own
            key = (keys or {}).get(m.name[: -len(".weight")], ("alone", m.name))
        groups.setdefault(key, []).append(m)
    return list(groups.values())


def groups_probed(model: nn.Module) -> bool:
    """Whether `input_groups` came from a probe forward (False: one group per matrix)."""
    input_groups(model, 0)
    return model.__dict__[_GROUPS_CACHE]["keys"] is not None


# ----------------------------------------------------------------------------- norms, biases, embeddings


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every LayerNorm/RMSNorm, by module path (blocks first, then the final norm)."""
    spec = spec_for(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks(model)):
        for local in spec.norms:
            if local in spec.present[i]:
                out[f"{spec.blocks}.{i}.{local}"] = block.get_submodule(local)
    if spec.final_norm is not None:
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
    """Biases of the prunable matrices (norm biases are counted as norms); a fused
    expert weight's bias is its owner's `<name>_bias` (`[E, out]`)."""
    out: dict[str, nn.Parameter] = {}
    for m in matrices(model):
        if m.expert is not None:
            bias = getattr(m.owner, f"{m.attr}_bias", None)
            if isinstance(bias, nn.Parameter):
                out[f"{m.name}_bias"] = bias
            continue
        bias = getattr(m.owner, "bias", None)
        if isinstance(bias, nn.Parameter):
            out[m.name[: -len("weight")] + "bias"] = bias
    return out


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    spec = spec_for(model)
    return {f"{path}.weight": model.get_submodule(path).weight for path in spec.embeddings}


def bias_flags(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Config flags that turn on biases of prunable matrices, and which ones (block-local).

    Found by building the model on the meta device (no memory) with each boolean
    `*bias*` flag that is off turned on, and seeing which matrices gain a bias.
    """
    config = getattr(model, "config", None)
    if config is None:
        return {}
    spec = spec_for(model)
    flags = [k for k, v in vars(config).items() if isinstance(v, bool) and not v and "bias" in k.lower()]
    found: dict[str, tuple[str, ...]] = {}
    for flag in flags:
        trial = copy.deepcopy(config)
        setattr(trial, flag, True)
        try:
            with torch.device("meta"):
                probe = type(model)(trial)
        except Exception:
            continue
        try:
            probe_blocks = probe.get_submodule(spec.blocks)
        except AttributeError:
            continue
        gained = []
        for local in spec.matrices:
            if local in spec.fused_experts or local not in spec.present[0]:
                continue
            try:
                now = probe_blocks[0].get_submodule(local)
            except AttributeError:
                continue
            before = blocks(model)[0].get_submodule(local)
            if getattr(before, "bias", None) is None and isinstance(getattr(now, "bias", None), torch.Tensor):
                gained.append(local)
        if gained:
            found[flag] = tuple(gained)
    return found


# ----------------------------------------------------------------------------- reports


def _layout(model: nn.Module, local: str) -> str:
    spec = spec_for(model)
    if local in spec.fused_experts:
        return "experts [E, in, out]" if local in spec.transposed else "experts [E, out, in]"
    return "[in, out] (Conv1D)" if local in spec.transposed else "[out, in]"


def map_report(model: nn.Module) -> dict[str, object]:
    """The whole discovered map, JSON-able, for `perp inspect --arch`: what will be
    pruned (block 0's matrices with shapes and layout; every block listed by what it
    holds), the input groups, norms, and what is left alone and why."""
    spec = spec_for(model)
    n_blocks = len(blocks(model))
    shapes: dict[str, object] = {}
    for i in range(n_blocks):
        for m in block_matrices(model, i):
            if m.local not in shapes:
                shapes[m.local] = {"shape": list(m.parameter.shape), "out_in": list(m.shape), "layout": _layout(model, m.local),
                                   "experts": m.parameter.shape[0] if m.expert is not None else None}
    layouts: dict[tuple[str, ...], list[int]] = {}
    for i in range(n_blocks):
        layouts.setdefault(tuple(sorted(spec.present[i])), []).append(i)
    group_lines: dict[int, list[list[str]]] = {}
    for i in sorted({ids[0] for ids in layouts.values()}):
        group_lines[i] = [[m.key.split(f".{i}.", 1)[1].replace(".weight", "") for m in g] for g in input_groups(model, i)]
    ms = matrices(model)
    return {
        "model_type": spec.model_type,
        "class": spec.model_class,
        "blocks": {"path": spec.blocks, "count": n_blocks, "classes": list(spec.block_classes)},
        "matrices": shapes,
        "block_layouts": [{"blocks": ids, "matrices": [m for m in spec.matrices if m in spec.present[ids[0]]]} for ids in layouts.values()],
        "input_groups": group_lines,
        "groups_from": "probe forward" if groups_probed(model) else "none (model not runnable here): one group per matrix",
        "norms": list(spec.norms),
        "final_norm": spec.final_norm,
        "excluded": {name: why for name, why in spec.excluded},
        "prunable_matrices": len(ms),
        "prunable_parameters": sum(m.shape[0] * m.shape[1] for m in ms),
        "overrides": OVERRIDES.get(spec.model_type, {}),
    }
