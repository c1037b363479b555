"""Read and write safetensors checkpoints a few tensors at a time (the IO of streaming).

`ShardReader` reads the tensors of a single-file or sharded (`model.safetensors.index.json`)
checkpoint by *model* parameter name, a block at a time. It parses each file's
safetensors header itself and reads every tensor with plain positioned reads straight
into a freshly allocated tensor. `safe_open` would memory-map the file: every page a read
touches then counts in the RSS while the file is open (a tensor counts twice while it is
copied out, and a handle kept open over a run ends up holding the whole model).

`ShardWriter` writes a standard sharded HF checkpoint whose tensors arrive in any order.
All names, shapes and dtypes are known before the first tensor is computed (from the
meta-device skeleton), so each shard's safetensors header is written up front and each
tensor goes straight to its byte offset the moment it is finished: nothing is buffered,
and a shard never has to fit in memory.

Names on disk are not always the model's: transformers 5 fuses Mixtral's per-expert
`w1/w2/w3` into `experts.gate_up_proj/down_proj` when loading and splits them back when
saving, and old GPT-2/OPT checkpoints omit the `transformer.`/`model.` prefix. Both
directions go through transformers' own conversion mapping (`to_model_names`,
`to_checkpoint_names`), so a streamed output has exactly the names `save_pretrained`
writes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

from perp_cli.errors import CheckpointError, NumericalError, UsageError
from perp_cli.manifest import (
    ADAPTERS_CONFIG_NAME,
    ADAPTERS_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MASKS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    sha256_file,
    sha256_tensor,
)
from perp_cli.mask import MaskSet, PackedMasks, Pattern

# safetensors dtype codes (the header's "dtype" field)
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """`--dtype` as a torch dtype, or "auto"."""
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or inf in `t`, checked a slice of `chunk` elements at a time: `torch.isfinite`
    of a whole matrix allocates several temporaries of its size (an `abs` copy among them),
    more than one block of a large model, or the merged matrix itself."""
    if not t.is_floating_point():
        return True
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_tensor_finite(name: str, t: torch.Tensor, where: str, chunk: int = 1 << 22) -> None:
    """`all_finite`, as a one-line error naming the parameter."""
    if not all_finite(t, chunk):
        raise NumericalError(f"{where}: parameter {name} contains NaN or inf")


def parse_size(text: str | int, option: str = "--max-shard-size", minimum: int = 1) -> int:
    """`5GB` (10^9, as Hugging Face counts), `500MiB` (2^20) or a number of bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not match or match.group(2) not in _UNITS:
            raise UsageError(f"{option} {text!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size < minimum:
        raise UsageError(f"{option} must be at least {minimum} bytes, got {text!r}")
    return size


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- names


def _conversions(model: nn.Module) -> tuple[list, list]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def model_name_of(model: nn.Module, key: str, meta_names: dict, renamings: list, converters: list) -> tuple[str, str | None]:
    """The model name a checkpoint key loads into, and the converter pattern it matched."""
    from transformers.core_model_loading import rename_source_key

    return rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None), meta_names)


def to_model_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> model tensors, as `from_pretrained` converts them (renames,
    prefix fixes, Mixtral's expert fusion). Identity for checkpoints in the model's names."""
    from transformers.core_model_loading import WeightRenaming, dot_natural_key

    renamings, converters = _conversions(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_names = dict.fromkeys(model.state_dict(keep_vars=True), True)
    pending: dict[str, object] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        name, pattern = model_name_of(model, key, meta_names, renamings, converters)
        if pattern is None:
            transform = pending.setdefault(name, WeightRenaming(key, name))
            pattern = key
        else:
            transform = pending.setdefault(name, copy.deepcopy(by_pattern[pattern]))
        transform.add_tensor(name, key, pattern, tensor)
    out = {}
    for name, transform in pending.items():
        for target, value in transform.convert(name, model=model, config=model.config).items():
            out[target] = value[0] if isinstance(value, list) else value
    return out


def to_checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model tensors -> the names and layout `save_pretrained` writes (works on meta
    tensors too, which is how the output layout is planned)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class StoredTensor:
    key: str  # name in the checkpoint
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset of the data in the file
    nbytes: int = 0


def _raw_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header length and parsed JSON header (no data is read)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header larger than 100 MB")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file: its header is not a JSON object")
    return length, header


def _entry(path: Path, key: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    """dtype code, shape and data offsets of one header entry, checked for form."""
    try:
        code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end)):
            raise ValueError
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the header entry of tensor {key} is malformed (dtype, shape, data_offsets)") from exc
    return code, shape, begin, end


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its header only (no data is read).

    Every declared shape is checked against the bytes the file really has, so a header
    that claims more than the file holds fails here, before anything is allocated."""
    length, header = _raw_header(path)
    try:
        data_bytes = path.stat().st_size - 8 - length
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if data_bytes < 0:
        raise CheckpointError(f"{path} ends inside its own header (truncated file)")
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise CheckpointError(f"{path}: __metadata__ must map names to strings")
            continue
        code, shape, begin, end = _entry(path, key, info)
        if code not in CODE_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {code}, which perp cannot read")
        dtype = CODE_DTYPES[code]
        if end - begin != nbytes(dtype, shape):
            raise CheckpointError(f"{path}: tensor {key} has {end - begin} bytes for {code} {list(shape)}")
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: tensor {key} ({code} {list(shape)}) ends at byte {end} of the data, "
                f"but the file holds {data_bytes} (truncated, or a header that lies)"
            )
        out[key] = StoredTensor(key, path.name, dtype, shape, 8 + length + begin, end - begin)
    return out


def read_tensor(f, t: StoredTensor) -> torch.Tensor:
    """One stored tensor, read from the open binary file `f` into new memory."""
    out = torch.empty(t.shape, dtype=t.dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    f.seek(t.start)
    done = 0
    while done < t.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{t.file} ends inside tensor {t.key} (truncated file)")
        done += n
    return out


def read_tensors(file: Path, tensors: Iterable[StoredTensor]) -> dict[str, torch.Tensor]:
    """`tensors`, all stored in `file`, read into new memory by key (`read_tensor`)."""
    try:
        with open(file, "rb", buffering=0) as f:
            return {t.key: read_tensor(f, t) for t in tensors}
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from exc


def index_files(directory: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` lists, checked to be plain file
    names inside `directory` (an index is data from the checkpoint, not a path to follow)."""
    index = directory / WEIGHTS_INDEX_NAME
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in files):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
    for name in files:
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index} names {name!r}, which is not a file of {directory}")
    return files


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of a single-file or sharded checkpoint, from the headers."""
    if (directory / WEIGHTS_INDEX_NAME).is_file():
        files = index_files(directory)
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}; streaming reads safetensors only")
    stored: dict[str, StoredTensor] = {}
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is missing shard(s) listed in its index: {name}")
        for key, t in read_header(directory / name).items():
            if key in stored:
                raise CheckpointError(f"{directory}: tensor {key} is stored twice ({stored[key].file} and {name})")
            stored[key] = t
    return stored


def first_of(names: list[str]) -> str:
    """`a`, or `a (and 2 more)`: the first of the names an error is about."""
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


class ShardReader:
    """The tensors of a local safetensors checkpoint, read on demand by model name.

    At construction only headers are read: every checkpoint key is mapped to the model
    name it loads into (keys the model does not have, such as an old `attn.masked_bias`,
    are ignored as `from_pretrained` ignores them), and model tensors no key provides are
    reported at once, before any work.
    """

    def __init__(
        self, directory: str | Path, model: nn.Module, expected: Iterable[str], stored: dict[str, StoredTensor] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.model = model
        self.stored = stored if stored is not None else stored_tensors(self.directory)
        renamings, converters = _conversions(model)
        state = model.state_dict(keep_vars=True)
        meta_names = dict.fromkeys(state, True)
        self.expected = set(expected)
        self.groups: dict[str, list[str]] = {}  # model name -> checkpoint keys converted into it
        self.converted: set[str] = set()  # model names a converter (not a plain rename) builds
        unexpected, mismatched = [], []
        for key in self.stored:
            name, pattern = model_name_of(model, key, meta_names, renamings, converters)
            if name in self.expected:
                self.groups.setdefault(name, []).append(key)
                if pattern is not None:
                    self.converted.add(name)
                if pattern is None and tuple(self.stored[key].shape) != tuple(state[name].shape):
                    mismatched.append(f"{key} is {list(self.stored[key].shape)}, the config makes it {list(state[name].shape)}")
            elif name not in meta_names and not ignored_unexpected(model, name):
                unexpected.append(key)
        missing = sorted(self.expected - set(self.groups))
        if missing:
            hint = " (is config.json of another model?)" if unexpected else ""
            raise CheckpointError(f"{self.directory}: tensor {first_of(missing)} is not in the checkpoint's shards{hint}")
        if mismatched:
            raise CheckpointError(f"{self.directory}: the weights do not fit config.json: {first_of(sorted(mismatched))}")
        if unexpected:
            raise CheckpointError(
                f"{self.directory}: tensor {first_of(sorted(unexpected))} in the weights is not part of a "
                f"{type(model).__name__} (is config.json of another model?)"
            )

    def read(self, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """The model tensors whose names satisfy `wanted`, converted to model names (in
        the checkpoint's dtype). Files are opened for this call only."""
        keys = [k for name, ks in self.groups.items() if wanted(name) for k in ks]
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.stored[key].file, []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            tensors.update(read_tensors(self.directory / file, [self.stored[k] for k in file_keys]))
        return to_model_names(self.model, tensors)

    def rows_readable(self, name: str) -> bool:
        """Whether model tensor `name` is one stored tensor in the model's own layout, so
        `read_rows` can read it a slice of rows at a time."""
        keys = self.groups.get(name, [])
        return len(keys) == 1 and name not in self.converted and len(self.stored[keys[0]].shape) >= 1

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` (first dimension) of model tensor `name`, in the checkpoint's
        dtype, read from its file without the rest (see `rows_readable`)."""
        t = self.stored[self.groups[name][0]]
        row_bytes = nbytes(t.dtype, t.shape[1:])
        part = StoredTensor(t.key, t.file, t.dtype, (stop - start, *t.shape[1:]), t.start + start * row_bytes, (stop - start) * row_bytes)
        return read_tensors(self.directory / t.file, [part])[t.key]


def ignored_unexpected(model: nn.Module, key: str) -> bool:
    """Checkpoint keys that are no error although the model has no parameter for them:
    those its class declares it ignores, and buffers it computes itself (an old
    `attn.masked_bias`, a stored rotary `inv_freq`)."""
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    buffers = {n for n, _ in model.named_buffers()}
    return any(re.search(p, key) for p in patterns) or any(key == b or key.endswith("." + b) or b.endswith("." + key) for b in buffers)


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Slot:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def plan_shards(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_size: int) -> list[list[str]]:
    """Greedy split in layout order, as huggingface_hub's `split_torch_state_dict_into_shards`:
    a new shard when the next tensor would overflow this one; a tensor larger than the
    limit gets a shard of its own (closing the current one, so shards stay in order)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, (dtype, shape) in layout.items():
        size_t = nbytes(dtype, shape)
        if current and (size_t > max_shard_size or size + size_t > max_shard_size):
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += size_t
    if current:
        shards.append(current)
    return shards


def _header_bytes(entries: dict[str, dict], metadata: dict[str, str]) -> bytes:
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # pad so the data starts 8-byte aligned


class ShardWriter:
    """Write `layout` (checkpoint names -> dtype, shape) as `model.safetensors`, or as
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when it exceeds
    `max_shard_size`. Files and headers are created at construction; `write` puts one
    tensor at its offset; `close` checks every tensor arrived and writes the index.
    `metadata` and `single_name` serve other single files (a streamed `masks.safetensors`)."""

    def __init__(
        self, directory: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_size: int,
        total_parameters: int | None = None, metadata: dict[str, str] | None = None, single_name: str = WEIGHTS_NAME,
    ) -> None:
        self.directory = Path(directory)
        self.layout = layout
        self.total_parameters = total_parameters
        shards = plan_shards(layout, max_shard_size) or [[]]
        n = len(shards)
        self.files = [single_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.slots: dict[str, Slot] = {}
        for file, names in zip(self.files, shards):
            # widest dtypes first, so every tensor starts aligned to its element size; then by
            # name, as safetensors orders them (a single-file output is then byte for byte
            # what save_pretrained writes)
            names = sorted(names, key=lambda k: (-torch.empty((), dtype=layout[k][0]).element_size(), k))
            entries, offset = {}, 0
            for name in names:
                dtype, shape = layout[name]
                size_t = nbytes(dtype, shape)
                entries[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size_t]}
                offset += size_t
            header = _header_bytes(entries, metadata or {"format": "pt"})
            data_start = 8 + len(header)
            with open(self.directory / file, "wb") as f:
                f.write(struct.pack("<Q", len(header)))
                f.write(header)
                f.truncate(data_start + offset)  # sparse until the tensors arrive
            for name, entry in entries.items():
                begin, end = entry["data_offsets"]
                self.slots[name] = Slot(file, layout[name][0], tuple(layout[name][1]), data_start + begin, end - begin)
        self.written: set[str] = set()

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.slots.values())

    def _slot(self, name: str) -> Slot:
        """Where tensor `name` goes; it must be planned and not yet written."""
        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError(f"internal: {name} is not part of the planned output")
        if name in self.written:
            raise CheckpointError(f"internal: {name} written twice")
        return slot

    def _put(self, file: str, offset: int, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            with open(self.directory / file, "r+b") as f:
                f.seek(offset)
                f.write(memoryview(data.numpy()))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put one tensor (checkpoint name) into its place on disk."""
        slot = self._slot(name)
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise CheckpointError(
                f"internal: {name} is {tensor.dtype} {tuple(tensor.shape)}, planned {slot.dtype} {slot.shape}"
            )
        self._put(slot.file, slot.start, tensor)
        self.written.add(name)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Put rows `start:start+len(rows)` of tensor `name` (checkpoint name) into its
        place on disk; the tensor counts as written once its last row arrives (rows in
        order, so a tensor larger than memory is copied a slice at a time)."""
        slot = self._slot(name)
        if rows.dtype != slot.dtype or tuple(rows.shape[1:]) != slot.shape[1:] or start + rows.shape[0] > slot.shape[0]:
            raise CheckpointError(
                f"internal: rows {start}:{start + rows.shape[0]} of {name} are {rows.dtype} {tuple(rows.shape)}, planned {slot.dtype} {slot.shape}"
            )
        self._put(slot.file, slot.start + start * nbytes(slot.dtype, slot.shape[1:]), rows)
        if start + rows.shape[0] == slot.shape[0]:
            self.written.add(name)

    def close(self) -> dict[str, str]:
        """Check that every planned tensor was written, write the index (sharded output)
        and re-read every header; returns the weight map."""
        missing = sorted(set(self.slots) - self.written)
        if missing:
            raise CheckpointError(f"internal: {len(missing)} planned tensors were never written (first: {missing[0]})")
        weight_map = {name: self.slots[name].file for name in self.layout}
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            if self.total_parameters is not None:
                index["metadata"]["total_parameters"] = self.total_parameters
            (self.directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for file in self.files:
            with safe_open(str(self.directory / file), framework="pt") as f:
                keys = set(f.keys())
            if keys != {n for n, s in self.slots.items() if s.file == file}:
                raise CheckpointError(f"{file} does not read back with the planned tensors")
        return weight_map


# ----------------------------------------------------------------------------- masks


def write_masks(directory: Path, shapes: dict[str, list[int]], pattern: Pattern, permutations: dict[str, torch.Tensor],
                packed: Callable[[str], torch.Tensor]) -> str:
    """Write `masks.safetensors` (docs/format.md) and return its sha256: the bit-packed
    mask of each name of `shapes`, `packed(name)`, asked for one at a time in name order
    (masks held in memory, or a streamed run's spool). perp's own writer, not `save_file`,
    which orders the metadata differently in every process: the same masks always give
    the same bytes, and the same hash."""
    metadata = {"format_version": str(FORMAT_VERSION), "pattern": str(pattern), "shapes": json.dumps(shapes, sort_keys=True)}
    orders = {n: [int(i) for i in o] for n, o in permutations.items() if n in shapes}
    if orders:  # some masks' N:M groups run in a permuted input order (`perp prune --permute`)
        metadata["input_permutations"] = json.dumps(orders, sort_keys=True)
    layout = {n: (torch.uint8, ((math.prod(shapes[n]) + 7) // 8,)) for n in sorted(shapes)}
    writer = ShardWriter(directory, layout, 1 << 62, metadata=metadata, single_name=MASKS_NAME)
    for name in layout:
        writer.write(name, packed(name))
    writer.close()
    return sha256_file(directory / MASKS_NAME)


def verify_masks(directory: Path, sha256: str, digests: dict[str, str]) -> None:
    """Re-read a written `masks.safetensors`, one mask at a time: the hash the manifest
    records, and the same masks byte for byte (`digests`: each one's `sha256_tensor`)."""
    file = directory / MASKS_NAME
    if sha256_file(file) != sha256:
        raise CheckpointError("written masks do not match their recorded hash")
    stored = read_header(file)
    if set(stored) != set(digests):
        raise CheckpointError("written masks do not read back identically")
    with open(file, "rb", buffering=0) as f:
        for name, t in stored.items():
            if sha256_tensor(read_tensor(f, t)) != digests[name]:
                raise CheckpointError(f"written mask {name} does not read back identically")


class MaskReader:
    """`masks.safetensors` read a few masks at a time.

    `checkpoint.open` reads them all through it (`mask_set`). A streamed step keeps every input
    mask; unpacked to bool they would take a quarter of a float32 model, so it reads (and
    unpacks) each block's masks only while the block is in memory. The file's hash is
    checked against the manifest once, when it is opened; the header must give every
    mask a shape and the right number of bytes.
    """

    def __init__(self, file: Path, stored: dict[str, StoredTensor], shapes: dict[str, list[int]], pattern: Pattern,
                 permutations: dict[str, torch.Tensor] | None = None) -> None:
        self.file = file
        self.stored = stored
        self.shapes = shapes
        self.pattern = pattern
        self.permutations = permutations or {}  # --permute: input order of some masks' N:M groups

    @classmethod
    def open(cls, directory: Path, manifest: dict[str, Any] | None, verify: bool = True) -> MaskReader | None:
        """The reader of `directory`'s masks, None when it has none. `verify`: check what
        the manifest records about them (sha256, total sparsity); `--trust-inputs` skips it."""
        file = directory / MASKS_NAME
        if not file.is_file():
            if manifest and manifest.get("masks_sha256"):
                raise CheckpointError(f"{directory} lists a mask hash in {MANIFEST_NAME} but {MASKS_NAME} is missing")
            return None
        stored, meta = read_header(file), _raw_header(file)[1].get("__metadata__") or {}
        try:
            version = int(meta.get("format_version", "0"))
        except ValueError as exc:
            raise CheckpointError(f"{file} has format version {meta.get('format_version')!r}, not a number") from exc
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{file} has a newer format version {meta.get('format_version')}; upgrade perp")
        try:
            shapes = {str(n): [int(d) for d in s] for n, s in json.loads(meta.get("shapes", "{}")).items()}
            if any(d < 0 for s in shapes.values() for d in s):
                raise ValueError("negative dimension")
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{file} cannot be read: bad shapes metadata ({exc})") from exc
        for name, t in stored.items():
            if t.dtype != torch.uint8 or name not in shapes or t.nbytes != (nbytes(torch.bool, shapes[name]) + 7) // 8:
                raise CheckpointError(f"{file} cannot be read: mask {name} has no shape or the wrong number of bytes")
        try:
            pattern = Pattern.parse(meta.get("pattern", "unstructured"))
        except UsageError as exc:
            raise CheckpointError(f"{file} records a bad pattern: {exc}") from exc
        try:
            orders = json.loads(meta.get("input_permutations", "{}"))
            permutations = {str(n): torch.tensor([int(i) for i in order], dtype=torch.long) for n, order in orders.items()}
            for n, order in permutations.items():
                if n not in shapes or sorted(order.tolist()) != list(range(order.numel())):
                    raise ValueError(f"{n} has no mask or its order is not a permutation")
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{file} cannot be read: bad input_permutations metadata ({exc})") from exc
        reader = cls(file, stored, shapes, pattern, permutations)
        if verify and manifest:
            reader.verify(manifest)
        return reader

    def verify(self, manifest: dict[str, Any]) -> None:
        """The file against the manifest: its sha256, and its total sparsity against the
        recorded one (a mask file swapped for another sparsity, hash updated, would turn a
        70% history into a 50% model). One pass over the file does both."""
        expected = manifest.get("masks_sha256")
        if not expected and "sparsity" not in manifest:
            return
        digest, kept = _hash_and_count_bits(self.file, min((t.start for t in self.stored.values()), default=0))
        if expected and digest != expected:
            raise CheckpointError(f"{self.file} does not match the sha256 recorded in {MANIFEST_NAME} (corrupt or replaced)")
        recorded = manifest.get("sparsity", {}).get("total")
        total = sum(math.prod(self.shapes[n]) for n in self.stored)
        if recorded is not None and total:
            actual = 1.0 - kept / total
            if abs(actual - recorded) > 1e-5:
                raise CheckpointError(
                    f"{self.file} has sparsity {actual:.4f}, but {MANIFEST_NAME} records {recorded:.4f} (masks replaced?)"
                )

    def shape_problems(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Masks that name no parameter of `shapes` (name -> shape) or have another shape:
        checked from the header, before a single mask is unpacked."""
        problems = []
        for name in sorted(self.stored):
            if name not in shapes:
                problems.append(f"mask {name} names no parameter of this model")
            elif tuple(self.shapes[name]) != tuple(shapes[name]):
                problems.append(f"mask {name} has shape {tuple(self.shapes[name])}, the weight {tuple(shapes[name])}")
        return problems

    def fitting(self, shapes: dict[str, tuple[int, ...]] | None) -> list[str]:
        """The masks (names sorted) that have their parameter's shape in `shapes`; all without it."""
        return [n for n in sorted(self.stored) if shapes is None or tuple(self.shapes[n]) == tuple(shapes.get(n, ()))]

    def mask_set(self, names: list[str] | None = None) -> MaskSet:
        """The named masks (default: all), held packed, with their pattern and permutations."""
        names = sorted(self.stored) if names is None else names
        return MaskSet(self.read_packed(names), self.pattern, {n: o for n, o in self.permutations.items() if n in names})

    def placeholders(self) -> MaskSet:
        """Every mask as a meta-device bool tensor of its shape (names sorted)."""
        return MaskSet({n: torch.empty(self.shapes[n], dtype=torch.bool, device="meta") for n in sorted(self.stored)}, self.pattern, dict(self.permutations))

    def read_packed(self, names: list[str]) -> PackedMasks:
        """The named masks as stored: bit-packed, never unpacked here (`mask.PackedMasks`)."""
        out = PackedMasks()
        for name, packed in read_tensors(self.file, [self.stored[n] for n in names]).items():
            out.set_packed(name, packed, self.shapes[name])
        return out

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named masks, unpacked (bool, in the parameters' layout)."""
        return dict(self.read_packed(names))


def _hash_and_count_bits(file: Path, data_start: int, chunk: int = 1 << 22) -> tuple[str, int]:
    """sha256 of the whole file and the number of set bits after `data_start` (the kept
    weights of bit-packed masks: padding bits are zero), in one read."""
    import numpy as np

    digest, kept, offset = hashlib.sha256(), 0, 0
    try:
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
                data = block[max(data_start - offset, 0):]
                if data:  # whole words at ~1 GB/s; a chunk's last few bytes one by one
                    words = len(data) // 8
                    kept += int(np.bitwise_count(np.frombuffer(data, np.uint64, count=words)).sum(dtype=np.uint64))
                    kept += sum(bin(byte).count("1") for byte in data[words * 8 :])
                offset += len(block)
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from exc
    return digest.hexdigest(), kept


# ----------------------------------------------------------------------------- adapters


def adapters_config_problem(config: Any) -> str | None:
    """What is wrong with an `adapters.json`, or None (the fields every reader uses)."""
    if not isinstance(config, dict):
        return "is not a JSON object"
    for key, kinds, what in (("type", (str,), "a string"), ("rank", (int,), "a positive integer"),
                             ("alpha", (int, float), "a number"), ("matrices", (list,), "a list of matrix names")):
        value = config.get(key)
        if key not in config or isinstance(value, bool) or not isinstance(value, kinds):
            return f"lacks '{key}' ({what})" if key not in config else f"has '{key}' = {json.dumps(value)[:40]}, not {what}"
    if config["rank"] < 1 or not math.isfinite(config["alpha"]) or not all(isinstance(m, str) for m in config["matrices"]):
        return "has a rank below 1, a non-finite alpha or a matrix name that is not a string"
    return None


class AdapterReader:
    """`adapters.safetensors` read a few adapters at a time; `adapters.json` at open.

    `checkpoint.open` reads every adapter through it at once; a streamed merge holds only
    block i's. Opening reads the header alone (names, dtypes, shapes), which is enough to check
    every adapter against the model before any work.
    """

    def __init__(self, file: Path, stored: dict[str, StoredTensor], config: Any) -> None:
        self.file = file
        self.stored = stored
        self.config = config

    @classmethod
    def open(cls, directory: Path, manifest: dict[str, Any] | None = None, verify: bool = True) -> AdapterReader | None:
        """The reader of `directory`'s adapters, None when it has none. `adapters.json` is
        validated here (every command reads it through this); `verify`: the file's sha256
        against the one `perp.json` records."""
        tensors_file, config_file = directory / ADAPTERS_NAME, directory / ADAPTERS_CONFIG_NAME
        if not tensors_file.is_file() and not config_file.is_file():
            return None
        if not (tensors_file.is_file() and config_file.is_file()):
            raise CheckpointError(f"{directory} has only one of {ADAPTERS_NAME} and {ADAPTERS_CONFIG_NAME}")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read adapters in {directory}: {exc}") from exc
        problem = adapters_config_problem(config)
        if problem:
            raise CheckpointError(f"{config_file} {problem}; it was not written by perp retrain")
        expected = ((manifest or {}).get("adapters") or {}).get("sha256")
        if verify and expected and sha256_file(tensors_file) != expected:
            raise CheckpointError(f"{tensors_file} does not match the sha256 recorded in {MANIFEST_NAME} (corrupt or replaced)")
        return cls(tensors_file, read_header(tensors_file), config)

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self.stored.get(name)
        return None if t is None else t.shape

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named adapter tensors, as stored (float32 when perp wrote them)."""
        return read_tensors(self.file, [self.stored[n] for n in names])
