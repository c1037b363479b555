"""The meta-device skeleton and the block IO of a streamed checkpoint: a model larger
than memory goes through the engine one decoder block at a time.

The model is built as a skeleton on the meta device (`build_skeleton`: parameters have
shapes but no storage; buffers such as rotary tables are real, computed from the config as
`from_pretrained` computes them). `StreamedBlocks` is the `engine.Residency` of such a
model (`checkpoint.open(..., streamed=True)` opens it, `checkpoint.writing` adds the output):
it reads block i from the input shards for block i's step, checked, and puts it back on
the meta device after it; with an output, it first writes the block there (its final
keep-masks applied and spooled, every tensor verified). The tensors outside the blocks are
read only while the embedding pass needs them, and copied a slice of rows at a time.

Peak host memory is the Python/torch baseline + one block + the calibration activations
(one copy: the engine propagates in place) + the temporaries of one step on one matrix.
The bit-packed masks go to a scratch file as each block finishes (1/32 of a float32 model,
~9 GB for 70B) and are assembled into `masks.safetensors` at the end. glibc is asked to
return freed block-sized buffers at once (`memory.return_freed_memory`).

Limits: local safetensors directories only (no hub ids, no pickles); input masks must name
block weights. This module knows nothing of the steps (prune, reconstruct, merge) that run
over it: each passes its `StreamedBlocks` to the engine as it would pass no residency.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from perp_cli import arch, memory, shards
from perp_cli.errors import CheckpointError, UsageError
from perp_cli.manifest import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, sha256_tensor
from perp_cli.mask import MaskSet, MaskStats, Pattern, apply, mask_problems, pack_bits, packed_stats
from perp_cli.shards import (
    ShardReader,
    ShardWriter,
    StoredTensor,
    check_tensor_finite,
    read_tensor,
    resolve_dtype,
    stored_tensors,
    to_checkpoint_names,
)

STREAMING_MODES = ("auto", "on", "off")
AUTO_FRACTION = 0.5  # auto mode streams when the weights would take more than this share of available memory


# ----------------------------------------------------------------------------- skeleton


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device and every buffer real.

    Parameters are moved to meta as they are registered (one uninitialised tensor at a
    time, never the whole model); buffers (rotary `inv_freq`, ...) keep the values the
    module computed from its config. A parameter registered twice (tied embeddings) stays
    the same object, so ties survive.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` with meta parameters (see `parameters_on_meta`)."""
    from transformers import AutoModelForCausalLM

    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"cannot build a causal LM from this config.json: {(str(exc).strip() or type(exc).__name__).splitlines()[0]}") from exc
    return model.eval()


def output_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `save_pretrained` writes, in model names: the persistent state without the
    tied aliases (a tied `lm_head.weight` is the embedding and is not stored twice)."""
    tied = tied_parameter_names(model)
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in tied}


def tied_parameter_names(model: nn.Module) -> dict[str, str]:
    """Parameters that share storage with an earlier one (tied lm_head), alias -> owner."""
    seen: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return tied



# ----------------------------------------------------------------------------- block IO


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of parameter/buffer `name`. A plain tensor becomes a new
    Parameter; a Parameter (the skeleton's own meta one, put back on release) is
    installed as is, so tied weights are tied again once their block is released."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if attr in module._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


class MaskSpool:
    """The output's keep-masks, bit-packed, appended to a scratch file in the staging
    directory as each block is done, then assembled into `masks.safetensors`
    (`shards.write_masks`) by `finish`. A streamed step spools each block as it is
    released; an in-memory prune spools each block as soon as it is pruned, so neither
    holds the masks of more than one block (1/32 of a float32 model, ~9 GB for 70B).
    Each mask's sha256 and statistics are kept to verify the assembled file
    (`shards.verify_masks`) and write the manifest without reading any mask back.

    `pattern` and `permutations` (N:M input orders, by name) are written with the masks;
    the step that fills the spool sets them."""

    NAME = ".masks.spool"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / self.NAME
        self.path.write_bytes(b"")
        self.stored: dict[str, StoredTensor] = {}  # where each packed mask is in the spool
        self.shapes: dict[str, list[int]] = {}
        self.digests: dict[str, str] = {}
        self.stats: MaskStats = {}
        self.pattern = Pattern()
        self.permutations: dict[str, torch.Tensor] = {}
        self.size = 0

    def add(self, name: str, keep: torch.Tensor) -> None:
        self.set_packed(name, pack_bits(keep), tuple(keep.shape))

    def set_packed(self, name: str, packed: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Append mask `name` given as `pack_bits` gives it (as `PackedMasks.set_packed`)."""
        if name in self.stored:
            raise ValueError(f"mask {name} is already spooled")
        with open(self.path, "ab") as f:
            f.write(memoryview(packed.numpy()))
        self.stored[name] = StoredTensor(name, self.NAME, torch.uint8, tuple(packed.shape), self.size, packed.numel())
        self.shapes[name], self.digests[name] = list(shape), sha256_tensor(packed)
        self.stats[name] = packed_stats(packed, shape)
        self.size += packed.numel()

    def finish(self) -> str:
        """Write `masks.safetensors`, drop the spool; return the file's sha256."""
        with open(self.path, "rb", buffering=0) as f:
            sha = shards.write_masks(self.directory, self.shapes, self.pattern, self.permutations, lambda n: read_tensor(f, self.stored[n]))
        self.path.unlink()
        return sha

    def discard(self) -> None:
        """No masks: drop the (empty) spool."""
        self.path.unlink(missing_ok=True)


TAIL_CHUNK_BYTES = 1 << 25  # rows copied at a time from an embedding or head: 32 MiB, whatever the vocabulary


def copy_rows(model: nn.Module, reader: ShardReader, writer: ShardWriter, name: str, dtype: torch.dtype,
              source: str, chunk_bytes: int | None = None) -> bool:
    """Copy model tensor `name` from the input shards to the output shards in slices of
    rows (about `chunk_bytes` each), converted to `dtype` and checked finite slice by
    slice. The bytes written are those of the whole tensor written at once. Returns False
    (nothing done) when the tensor is not stored as one plain tensor in the model's
    layout, or is written under another layout: the caller copies it whole."""
    if not reader.rows_readable(name):
        return False
    meta = torch.empty(reader.stored[reader.groups[name][0]].shape, dtype=dtype, device="meta")
    out = to_checkpoint_names(model, {name: meta})
    if len(out) != 1 or tuple(next(iter(out.values())).shape) != tuple(meta.shape):
        return False
    key = next(iter(out))
    rows = meta.shape[0]
    step = max(1, (chunk_bytes or TAIL_CHUNK_BYTES) // max(1, shards.nbytes(dtype, meta.shape[1:])))
    for start in range(0, rows, step):
        part = reader.read_rows(name, start, min(rows, start + step)).to(dtype)
        check_tensor_finite(name, part, source)
        writer.write_rows(key, start, part)
    if rows == 0:
        writer.write(key, torch.empty(meta.shape, dtype=dtype))
    return True


@contextlib.contextmanager
def gathered_rows(model: nn.Module, reader: ShardReader, dtypes: dict[str, torch.dtype], source: str,
                  skip: set[str] = frozenset()) -> Iterator[set[str]]:
    """While the embedding pass runs, give the token embedding only the rows its forward
    looks up: a pre-hook reads the rows of the unique token ids of each call from the
    input shards, installs them as the weight and renumbers the ids into them. The output
    is the same lookup; the memory is rows-in-the-batch, not vocabulary x hidden. Yields
    the names handled this way (none when the embedding is not a plain `nn.Embedding`
    stored as one tensor: the caller then reads it whole)."""
    embedding = model.get_input_embeddings()
    weight_names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding.weight] if embedding is not None else []
    readable = [n for n in weight_names if reader.rows_readable(n)]  # a tied head shares the weight: one name is stored
    if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None or not readable or skip & set(weight_names):
        yield set()
        return
    name = readable[0]
    meta = embedding.weight

    def gather(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = args[0] if args else kwargs["input"]
        unique, inverse = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
        ids_list = unique.tolist()
        parts, run_start = [], 0
        for i in range(1, len(ids_list) + 1):  # one read per run of consecutive ids
            if i == len(ids_list) or ids_list[i] != ids_list[i - 1] + 1:
                parts.append(reader.read_rows(name, ids_list[run_start], ids_list[i - 1] + 1))
                run_start = i
        rows = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(dtypes[name])
        check_tensor_finite(name, rows, source)
        module.weight = nn.Parameter(rows.to(ids.device), requires_grad=False)
        inverse = inverse.reshape(ids.shape).to(ids.device)
        return ((inverse, *args[1:]), kwargs) if args else (args, {**kwargs, "input": inverse})

    handle = embedding.register_forward_pre_hook(gather, with_kwargs=True)
    # a real (empty) weight until the first lookup: models move the ids to `weight.device` before calling
    embedding.weight = nn.Parameter(torch.empty((0, *meta.shape[1:]), dtype=dtypes[name]), requires_grad=False)
    try:
        yield set(weight_names)
    finally:
        handle.remove()
        embedding.weight = meta


class StreamedBlocks:
    """The `engine.Residency` of a streamed checkpoint (see above). Without an output
    `writer`, the model is only read (the dense reference of a streamed reconstruct).

    `masks_of(i)`: block i's final keep-masks, set by the step that chooses them (a
    prune: `pruner`'s `block_keep`); by default the input's own masks of block i, read
    for block i's step when the checkpoint holds them lazily (a reconstruct or a merge).
    `spool`: where the released masks go (the output's `MaskSpool`, with an output); its
    `pattern` is the one they are checked against and written with.
    """

    def __init__(self, ckpt: Any, writer: ShardWriter | None = None, spool: MaskSpool | None = None) -> None:
        self.model = ckpt.model
        self.reader: ShardReader = ckpt.weights
        self.writer = writer
        self.source = ckpt.source
        self.old: MaskSet | None = ckpt.masks if writer is not None else None  # the reference reads no masks
        self.mask_reader = ckpt.mask_reader if writer is not None else None
        self.placeholders = dict(self.old.masks) if self.mask_reader is not None else {}
        self.created = set(ckpt.created)  # `--add-biases`: in the output layout, not in the input shards
        self.names = output_names(self.model)
        self.dtypes = {n: t.dtype for n, t in self.names.items()}
        self.embedding_names, self.tail_names = arch.outside_blocks(self.model, self.names)
        self.masks_of: Callable[[int], dict[str, torch.Tensor]] | None = None
        if writer is not None and spool is None:
            raise ValueError("a streamed output needs the mask spool its blocks' masks go to")
        self.spool = spool
        if self.spool is not None and self.old is not None:  # the input's pattern and N:M orders, unless the step sets its own
            self.spool.pattern, self.spool.permutations = self.old.pattern, dict(self.old.permutations)

    # --- reading

    def _read(self, names: set[str]) -> dict[str, torch.Tensor]:
        out = {n: torch.zeros(self.names[n].shape, dtype=self.dtypes[n]) for n in names & self.created}
        names = names - self.created
        tensors = self.reader.read(names.__contains__)
        missing = names - set(tensors)
        if missing:
            raise CheckpointError(f"{self.source}: {sorted(missing)[0]} did not come out of the checkpoint's shards")
        for name in names:
            out[name] = tensors.pop(name).to(self.dtypes[name])
            check_tensor_finite(name, out[name], self.source)
        return out

    def _uninstall(self, names: list[str]) -> None:
        for name in names:
            _set_tensor(self.model, name, self.names[name])  # the skeleton's meta tensor again

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Embeddings (and positions) present while block 0's inputs are caught; the token
        embedding holds only the rows of the tokens each forward looks up (`gathered_rows`)."""
        with gathered_rows(self.model, self.reader, self.dtypes, self.source, self.created) as gathered:
            for name, t in self._read(set(self.embedding_names) - gathered).items():
                _set_tensor(self.model, name, t)
            try:
                yield
            finally:
                self._uninstall(self.embedding_names)

    def own_masks(self, index: int) -> list[str]:
        """The input's masks of block `index`."""
        return arch.block_names(self.model, self.old.masks if self.old is not None else (), index)

    def load(self, index: int, block: nn.Module) -> None:
        """Block `index`'s masks (when read lazily), then its weights, checked against them."""
        if self.mask_reader is not None:
            self.old.masks.update(self.mask_reader.read_packed(self.own_masks(index)))
        for name, t in self._read(set(arch.block_names(self.model, self.names, index))).items():
            _set_tensor(self.model, name, t)
        own = self.old.masks.select(self.own_masks(index)) if self.old is not None else None
        problems = mask_problems(self.model, MaskSet(own, self.old.pattern, self.old.permutations)) if own else []
        if problems:
            raise CheckpointError(f"{self.source}: weights and masks disagree: {problems[0]} (run `perp inspect` for all)")

    # --- writing

    def release(self, index: int, block: nn.Module) -> None:
        """With an output: apply the block's final masks, verify, write its tensors and
        spool its masks. Then free it (its lazy input masks go back to placeholders)."""
        names = arch.block_names(self.model, self.names, index)
        own = self.own_masks(index)
        if self.writer is not None:
            keep = self.masks_of(index) if self.masks_of is not None else {n: self.old.masks[n] for n in own}
            masks = MaskSet(keep, self.spool.pattern, self.spool.permutations)  # --permute's N:M order
            apply(self.model, masks)
            problems = mask_problems(self.model, masks)
            if problems:
                raise CheckpointError(f"refusing to write: {problems[0]}")
            state = {n: _get_tensor(self.model, n) for n in names}
            for name, t in state.items():
                check_tensor_finite(name, t, "refusing to write")
            for name, k in keep.items():
                self.spool.add(name, k)
            self._write({n: t.detach() for n, t in state.items()})
            del state
        self._uninstall(names)
        for n in own if self.placeholders else ():
            self.old.masks[n] = self.placeholders[n]

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in to_checkpoint_names(self.model, tensors).items():
            self.writer.write(name, t)

    def copy_tail(self) -> None:
        """Every tensor outside the blocks: the embeddings (only gathered rows were read for
        the embedding pass), the final norm, an untied head. Each is copied a slice of rows
        at a time (`copy_rows`), so a 128k-vocabulary head costs no more memory than a 32k one."""
        for name in self.embedding_names + self.tail_names:
            if name in self.created or not copy_rows(self.model, self.reader, self.writer, name, self.dtypes[name], self.source):
                self._write(self._read({name}))


# ----------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class Decision:
    stream: bool
    reason: str


def weights_bytes(source: str | Path, dtype: str) -> int | None:
    """Bytes the weights take once loaded in `dtype` (headers only), or None if unknown."""
    try:
        stored = stored_tensors(Path(source).expanduser())
    except CheckpointError:
        return None
    target = resolve_dtype(dtype)
    return sum(
        shards.nbytes(target if target != "auto" and t.dtype.is_floating_point else t.dtype, t.shape)
        for t in stored.values()
    )


def decide(mode: str, source: str | Path, dtype: str = "auto", models: int = 1, refusal: str | None = None) -> Decision:
    """Whether a command streams (the residency `checkpoint.open` is asked for). `on`/`off`
    as asked (`on` fails with a usage error if the input cannot stream); `auto` streams a
    local safetensors checkpoint whose weights would take more than half of the available
    memory. `refusal`: why the command's options cannot stream, if they cannot (a prune's:
    `pruner.streaming_refusal`); `models`: how many models of this size the command holds
    in memory when it does not stream (reconstruct: the pruned and the dense one)."""
    if mode not in STREAMING_MODES:
        raise UsageError(f"--streaming {mode!r} is not one of {', '.join(STREAMING_MODES)}")
    if mode == "off":
        return Decision(False, "--streaming off")
    path = Path(source).expanduser()
    problem = None
    if not path.is_dir():
        problem = f"{source} is not a local directory (streaming reads local safetensors)"
    elif not ((path / WEIGHTS_NAME).is_file() or (path / WEIGHTS_INDEX_NAME).is_file()):
        problem = f"{source} has no safetensors weights"
    elif refusal is not None:
        problem = refusal
    if mode == "on":
        if problem:
            raise UsageError(f"--streaming on: {problem}; use --streaming off")
        return Decision(True, "streaming (--streaming on): one block of weights in memory at a time")
    if problem:
        return Decision(False, f"not streaming: {problem}")
    size, free = weights_bytes(path, dtype), memory.process_limit()
    size = size * models if size is not None else None
    if size is None or free is None:
        return Decision(False, "not streaming: model size or available memory unknown")
    limit = f" ({free.source})" if isinstance(free, memory.MemoryLimit) else ""
    if size > AUTO_FRACTION * free:
        return Decision(True, f"streaming, one block in memory at a time: the weights ({size / 2**30:.1f} GiB) exceed half of the {free / 2**30:.1f} GiB available{limit}")
    return Decision(False, f"in memory: weights {size / 2**30:.2f} GiB fit in the {free / 2**30:.1f} GiB available{limit}")
