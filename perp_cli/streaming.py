"""Prune a model larger than memory: weights stream from the input shards, one decoder
block at a time, through the engine, and straight into the output shards.

The model is built as a skeleton on the meta device (parameters have shapes but no
storage; buffers such as rotary tables are real, computed from the config as
`from_pretrained` computes them). Then:

* the weights outside the blocks that embed the tokens (embeddings, positions) are read
  for the one pass that catches block 0's inputs, and freed;
* the engine reads block i from the shards just before its turn (`ShardReader`, one
  shard handle per read), prunes it, propagates the calibration inputs through it, and
  this module applies the final masks, verifies every tensor (finite; masked weights
  exactly zero; N:M groups valid), writes it at its place in the output shards
  (`ShardWriter`) and puts the block back on the meta device;
* the final norm and the head are copied tensor by tensor at the end.

Peak host memory is the Python/torch baseline + one block + the calibration activations
(one copy: the engine propagates in place) + the temporaries of pruning one matrix. The
bit-packed masks go to a scratch file as each block finishes (`MaskSpool`; they are 1/32
of a float32 model, ~9 GB for 70B) and are assembled into `masks.safetensors` at the end.
glibc is asked to return freed block-sized buffers at once (`return_freed_memory`).

Everything is written into `checkpoint.staging`, so an interrupt or a failed check leaves
no output, exactly as the in-memory path. The output has the same tensors, bit for bit,
and the same masks as `perp prune` without streaming.

Limits: local safetensors directories only (no hub ids, no pickles); `--scope global`
cannot stream (it ranks the whole model at once); input masks must name block weights.

Reuse (a streamed reconstruct or merge): `open_checkpoint` gives the skeleton, and
`streamed_output(ckpt, out, step, pattern)` yields the `BlockStream` to hand to the
engine as `engine.Residency(load=stream.load, release=lambda i, b: stream.release(i, b,
keep_masks_of_block_i), outside=stream.outside)`; everything else is written on exit.
`reconstruct` (its own section below) is the streamed `perp reconstruct`: two skeletons,
the input masks read per block (`MaskReader`), the dense model only read (`ReferenceBlocks`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from perp_cli import arch, checkpoint, engine, mask, memory, pruner, shards
from perp_cli.checkpoint import Checkpoint
from perp_cli.errors import CheckpointError, NumericalError, UsageError
from perp_cli.manifest import MANIFEST_NAME, StepRecord, empty_manifest, sha256_file, weights_sha256
from perp_cli.mask import MaskSet, Pattern, pack_bits
from perp_cli.shards import (
    AdapterReader,
    MaskReader,
    ShardReader,
    ShardWriter,
    StoredTensor,
    parse_size,
    read_header,
    read_tensor,
    stored_tensors,
    to_checkpoint_names,
)

STREAMING_MODES = ("auto", "on", "off")
AUTO_FRACTION = 0.5  # auto mode streams when the weights would take more than this share of available memory


# ----------------------------------------------------------------------------- memory


return_freed_memory = memory.return_freed_memory


# ----------------------------------------------------------------------------- skeleton


# the skeleton is built where every reader builds it (checkpoint.plan_local); these names stay for callers
parameters_on_meta = checkpoint.parameters_on_meta
build_skeleton = checkpoint.build_skeleton
output_names = checkpoint.output_names


# ----------------------------------------------------------------------------- opening


def open_checkpoint(
    source: str | Path, dtype: str = "auto", trust_remote_code: bool = False, need_tokenizer: bool = False,
    lazy_masks: bool = False, lazy_adapters: bool = False, trust_inputs: bool = False,
) -> Checkpoint:
    """A `Checkpoint` whose model is a meta-device skeleton; `ckpt.extra["reader"]` is the
    `ShardReader` its weights come from. Checks what `checkpoint.load` checks that does
    not need the weights (mask hash, names and shapes); the weights themselves are
    checked as each is read (finite, zero where the input's masks say pruned).

    `lazy_masks`: the masks are meta-device placeholders too (`ckpt.extra["masks"]` is
    the `MaskReader` to read a block's masks with), for steps that keep every input mask
    (reconstruct): unpacked, they would take a quarter of a float32 model.

    `lazy_adapters`: `adapters.safetensors` is not read (`ckpt.adapters` is None,
    `ckpt.adapters_config` is read); `ckpt.extra["adapters"]` is the `AdapterReader` to
    read a block's adapters with (a streamed merge)."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return_freed_memory()  # before the skeleton: building it allocates and frees every parameter once
    path = Path(source).expanduser()
    if not path.is_dir():
        raise UsageError(f"streaming reads a local directory; {source} is not one (download hub models first)")
    if not ((path / checkpoint.WEIGHTS_NAME).is_file() or (path / checkpoint.WEIGHTS_INDEX_NAME).is_file()):
        raise UsageError(f"{source} has no safetensors weights; streaming reads model.safetensors or its sharded index only")
    checkpoint._check_local_dir(path, allow_pickle=False)
    manifest = checkpoint.read_manifest(path)
    layout = checkpoint.plan_local(path, dtype, trust_remote_code)
    model, reader = layout.skeleton, layout.reader
    if (path / "generation_config.json").is_file():
        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(str(path))
    # names and shapes from the header, before a single mask is unpacked; then the hashes
    mask_reader = checkpoint.open_masks(path, manifest, layout.parameter_shapes(), trust_inputs=trust_inputs)
    if lazy_masks:
        masks = mask_reader.placeholders() if mask_reader is not None else None
    else:
        masks = MaskSet(mask_reader.read_packed(sorted(mask_reader.stored)), mask_reader.pattern, dict(mask_reader.permutations)) if mask_reader else None
        mask_reader = None
    if masks is not None:
        _check_input_masks(model, masks, source)
    adapter_reader = AdapterReader.open(path, manifest, verify=not trust_inputs)
    adapters_config = adapter_reader.config if adapter_reader is not None else None
    adapters = None
    if not lazy_adapters and adapter_reader is not None:
        adapters, adapter_reader = adapter_reader.read(sorted(adapter_reader.stored)), None
    recorded = (manifest or {}).get("weights_sha256")
    if recorded and not trust_inputs and weights_sha256(path) != recorded:
        raise CheckpointError(f"the weights of {source} do not match the weights_sha256 recorded in {MANIFEST_NAME} "
                              "(edited or replaced since perp wrote them; --trust-inputs to use them anyway)")
    return Checkpoint(
        model=model,
        tokenizer=checkpoint._load_tokenizer(str(path), trust_remote_code, need_tokenizer),
        masks=masks,
        manifest=manifest or empty_manifest(str(path.resolve())),
        source=str(source),
        adapters=adapters,
        adapters_config=adapters_config,
        local_dir=path.resolve(),
        extra={"reader": reader, "masks": mask_reader, "adapters": adapter_reader},
    )


def _check_input_masks(model: nn.Module, masks: MaskSet, source: str | Path) -> None:
    params = dict(model.named_parameters())
    prefix = arch.spec_for(model).blocks + "."
    for name, keep in masks.masks.items():
        if name not in params:
            raise CheckpointError(f"{source}: weights and masks disagree: mask {name} names no parameter of this model")
        if tuple(params[name].shape) != tuple(keep.shape):
            raise CheckpointError(
                f"{source}: weights and masks disagree: mask {name} has shape {tuple(keep.shape)}, the weight {tuple(params[name].shape)}"
            )
        if not name.startswith(prefix):
            raise UsageError(f"{source} has a mask on {name}, outside the decoder blocks; streaming handles block masks only (use --streaming off)")


# ----------------------------------------------------------------------------- the stream


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


_check_finite = checkpoint.check_tensor_finite


class MaskSpool:
    """Bit-packed keep-masks appended to a scratch file in the staging directory as each
    block is released, assembled into `masks.safetensors` (the header of
    `checkpoint.masks_metadata`, names sorted, as `checkpoint.write_masks`) at the end. Each mask's sha256 is kept to verify the
    assembled file without holding any mask in memory."""

    NAME = ".masks.spool"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / self.NAME
        self.path.write_bytes(b"")
        self.entries: dict[str, tuple[int, int, list[int], str]] = {}  # name -> offset, bytes, shape, sha256
        self.size = 0

    def add(self, name: str, keep: torch.Tensor) -> None:
        data = memoryview(pack_bits(keep).numpy())
        with open(self.path, "ab") as f:
            f.write(data)
        self.entries[name] = (self.size, data.nbytes, list(keep.shape), hashlib.sha256(data).hexdigest())
        self.size += data.nbytes

    def finish(self, pattern: Pattern, permutations: dict[str, torch.Tensor] | None = None) -> str:
        """Write `masks.safetensors` (names sorted), drop the spool; return the file's sha256.
        `permutations`: the input masks' N:M input orders, carried over."""
        names = sorted(self.entries)
        layout = {n: (torch.uint8, (self.entries[n][1],)) for n in names}
        kept = {n: o for n, o in (permutations or {}).items() if n in self.entries}
        metadata = checkpoint.masks_metadata(pattern, {n: self.entries[n][2] for n in names}, kept)
        writer = ShardWriter(self.directory, layout, 1 << 62, metadata=metadata, single_name=checkpoint.MASKS_NAME)
        with open(self.path, "rb", buffering=0) as f:
            for n in names:
                offset, size, _, _ = self.entries[n]
                writer.write(n, read_tensor(f, StoredTensor(n, self.NAME, torch.uint8, (size,), offset, size)))
        writer.close()
        self.path.unlink()
        return sha256_file(self.directory / checkpoint.MASKS_NAME)

    def verify(self, sha: str) -> None:
        """Re-read the written masks: same names, same bytes, hash as the manifest says."""
        file = self.directory / checkpoint.MASKS_NAME
        if sha256_file(file) != sha:
            raise CheckpointError("written masks do not match their recorded hash")
        stored = read_header(file)
        if set(stored) != set(self.entries):
            raise CheckpointError("written masks do not read back identically")
        with open(file, "rb", buffering=0) as f:
            for name, t in stored.items():
                if hashlib.sha256(memoryview(read_tensor(f, t).numpy())).hexdigest() != self.entries[name][3]:
                    raise CheckpointError(f"written mask {name} does not read back identically")


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
        _check_finite(name, part, source)
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
        _check_finite(name, rows, source)
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


class BlockStream:
    """The `pruner.WeightStream` of one streamed run: reads blocks from `reader`,
    writes finished ones to `writer`, spools their masks and keeps their statistics."""

    def __init__(self, ckpt: Checkpoint, writer: ShardWriter, pattern: Pattern) -> None:
        self.model = ckpt.model
        self.reader: ShardReader = ckpt.extra["reader"]
        self.writer = writer
        self.pattern = pattern
        self.old = ckpt.masks
        self.source = ckpt.source
        self.names = output_names(self.model)
        spec = arch.spec_for(self.model)
        self.prefix = spec.blocks + "."
        self.dtypes = {n: t.dtype for n, t in self.names.items()}
        tail = _final_norm_names(self.model)
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is not None and head.weight is not embedding.weight:  # an untied head runs after the blocks
            tail |= {n for n, p in self.model.named_parameters(remove_duplicate=False) if p is head.weight}
        outside = [n for n in self.names if not n.startswith(self.prefix)]
        self.embedding_names = [n for n in outside if n not in tail]  # what catching block 0's inputs runs
        self.tail_names = [n for n in outside if n in tail]
        self.spool = MaskSpool(writer.directory)
        self.stats: dict[str, tuple[float, int, int]] = {}

    # --- reading

    def _read(self, names: set[str]) -> dict[str, torch.Tensor]:
        tensors = self.reader.read(names.__contains__)
        missing = names - set(tensors)
        if missing:
            raise CheckpointError(f"{self.source}: {sorted(missing)[0]} did not come out of the checkpoint's shards")
        out = {}
        for name in names:
            t = tensors.pop(name).to(self.dtypes[name])
            _check_finite(name, t, self.source)
            out[name] = t
        return out

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Embeddings (and positions) present while block 0's inputs are caught; the token
        embedding holds only the rows of the tokens each forward looks up (`gathered_rows`)."""
        with gathered_rows(self.model, self.reader, self.dtypes, self.source, set(getattr(self, "created", ()))) as gathered:
            for name, t in self._read(set(self.embedding_names) - gathered).items():
                _set_tensor(self.model, name, t)
            try:
                yield
            finally:
                for name in self.embedding_names:
                    _set_tensor(self.model, name, self.names[name])  # the skeleton's meta tensor again

    def block_names(self, index: int) -> list[str]:
        prefix = f"{self.prefix}{index}."
        return [n for n in self.names if n.startswith(prefix)]

    def load(self, index: int, block: nn.Module) -> None:
        """Read block `index` onto the host and check it as `checkpoint.load` would."""
        for name, t in self._read(set(self.block_names(index))).items():
            _set_tensor(self.model, name, t)
        if self.old is not None:
            own = self.old.masks.select([n for n in self.old.masks if n.startswith(f"{self.prefix}{index}.")])
            problems = checkpoint.mask_problems(self.model, MaskSet(own, self.old.pattern)) if own else []
            if problems:
                raise CheckpointError(f"{self.source}: weights and masks disagree: {problems[0]} (run `perp inspect` for all)")

    # --- writing

    def release(self, index: int, block: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        """Apply the block's final masks, verify, write its tensors, free it."""
        names = self.block_names(index)
        masks = MaskSet(keep, self.pattern)
        mask.apply(self.model, masks)
        problems = checkpoint.mask_problems(self.model, masks)
        if problems:
            raise CheckpointError(f"refusing to write: {problems[0]}")
        state = {n: _get_tensor(self.model, n) for n in names}
        for name, t in state.items():
            _check_finite(name, t, "refusing to write")
        for name, k in keep.items():
            self.spool.add(name, k)
            self.stats[name] = pruner.keep_stats(k)
        self._write({n: t.detach() for n, t in state.items()})
        del state
        for name in names:
            _set_tensor(self.model, name, self.names[name])

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in to_checkpoint_names(self.model, tensors).items():
            self.writer.write(name, t)

    def copy_tail(self) -> None:
        """Every tensor outside the blocks: the embeddings (only gathered rows were read for
        the embedding pass), the final norm, an untied head. Each is copied a slice of rows
        at a time (`copy_rows`), so a 128k-vocabulary head costs no more memory than a 32k one."""
        created = set(getattr(self, "created", ()))
        for name in self.embedding_names + self.tail_names:
            if name in created or not copy_rows(self.model, self.reader, self.writer, name, self.dtypes[name], self.source):
                self._write(self._read({name}))

    def mask_summary(self) -> dict[str, Any]:
        total = sum(v[2] for v in self.stats.values())
        kept = sum(v[1] for v in self.stats.values())
        return {
            "total": round(1.0 - kept / total if total else 0.0, 6),
            "per_tensor": {n: round(v[0], 6) for n, v in self.stats.items()},
        }


# ----------------------------------------------------------------------------- the run


def _output_layout(model: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    metas = {n: torch.empty_like(t, device="meta") for n, t in output_names(model).items()}
    return {n: (t.dtype, tuple(t.shape)) for n, t in to_checkpoint_names(model, metas).items()}


def _write_config(model: nn.Module, dtype: torch.dtype, tmp: Path) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them."""
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    checkpoint._strip_forbidden_config(tmp)


def _check_space(out: Path, needed: int) -> None:
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise CheckpointError(f"writing {out} needs about {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB is free; nothing was written")


@contextlib.contextmanager
def streamed_output(
    ckpt: Checkpoint,
    out: str | Path,
    step: StepRecord,
    pattern: Pattern,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    stream_type: type[BlockStream] = BlockStream,
    write_masks: bool = True,
) -> Iterator[BlockStream]:
    """Write a streamed step's output checkpoint atomically; yields the `BlockStream`.

    The caller runs the engine with the stream as its residency (`load`, `release` with
    each block's final keep-masks, `outside`) and fills `step.data`/`step.results`
    before the block ends. On a normal exit this copies the tensors outside the blocks,
    closes the shards (+ index), and writes config, generation config, tokenizer, masks
    (pattern `pattern`) and the manifest with `step` appended, then verifies the masks,
    all inside `checkpoint.staging`: any exception or interrupt leaves no output.
    What `checkpoint.save` does for an in-memory model, block by block. `stream_type`: a
    `BlockStream` subclass (`ReconstructStream`). `write_masks=False`: the output has no
    masks (a merge that densified; release blocks with no keep-masks then).
    """
    limit = parse_size(max_shard_size)
    return_freed_memory()
    model = ckpt.model
    dtype = model.dtype
    out_path = Path(out).expanduser().resolve()
    layout = _output_layout(model)
    _check_space(out_path, sum(shards.nbytes(d, s) for d, s in layout.values()))
    try:
        with checkpoint.staging(out_path, overwrite=overwrite) as tmp:
            writer = ShardWriter(tmp, layout, limit, total_parameters=model.num_parameters())
            stream = stream_type(ckpt, writer, pattern)
            yield stream
            stream.copy_tail()
            writer.close()
            step.results["streaming"] = {"max_shard_size": limit, "shards": len(writer.files), "bytes_written": writer.total_size}
            _write_config(model, dtype, tmp)
            if ckpt.tokenizer is not None:
                ckpt.tokenizer.save_pretrained(tmp)
            manifest = checkpoint.next_manifest(ckpt.manifest, step)
            if write_masks:
                manifest["masks_sha256"] = stream.spool.finish(pattern, ckpt.masks.permutations if ckpt.masks is not None else None)
                manifest["pattern"] = str(pattern)
                manifest["sparsity"] = stream.mask_summary()
            else:
                stream.spool.path.unlink()
            checkpoint.write_manifest(tmp, manifest)
            if write_masks:
                stream.spool.verify(manifest["masks_sha256"])
    except OSError as exc:
        raise CheckpointError(checkpoint._write_failure(out, exc)) from exc


def prune(
    ckpt: Checkpoint,
    out: str | Path,
    config: pruner.PruneConfig,
    step: StepRecord,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    tokens: torch.Tensor | None = None,
) -> pruner.PruneOutcome:
    """Prune the streamed checkpoint `ckpt` (from `open_checkpoint`) into `out`.

    `pruner.prune` with the stream of `streamed_output`: the same numbers as in memory,
    written as `checkpoint.save` would write them. Fills `step.data`/`step.results`;
    returns the outcome with `masks=None` (they are on disk, bit-packed).
    """
    p = pruner.plan(config)
    if p.scope == "global":  # before anything is opened; pruner.prune says the same
        raise UsageError("--scope global ranks every weight of the model at once, so it cannot stream; use --scope row/matrix, or --streaming off")
    with streamed_output(ckpt, out, step, p.pattern, overwrite=overwrite, max_shard_size=max_shard_size) as stream:
        outcome = pruner.prune(ckpt, config, tokens=tokens, stream=stream)
        step.data, step.results = outcome.data, outcome.results
    return outcome


# ----------------------------------------------------------------------------- streamed reconstruct
# `perp reconstruct --streaming`: the pruned model and the dense reference are both
# skeletons. Pruned block i (with its masks) and dense block i are read for block i's
# step only; the reconstructed block is written as soon as it is propagated.


class ReconstructStream(BlockStream):
    """The `BlockStream` of a streamed reconstruct (for `streamed_output(stream_type=...)`).

    Two differences from pruning: the checkpoint's masks are placeholders
    (`open_checkpoint(lazy_masks=True)`), made real for block i in `load` and written back
    unchanged in `release_block`; and the zero biases `--add-biases` put into the skeleton
    (`ckpt.extra["created"]`: in the output layout, not in the input shards) are created
    instead of read.
    """

    def __init__(self, ckpt: Checkpoint, writer: ShardWriter, pattern: Pattern) -> None:
        super().__init__(ckpt, writer, pattern)
        self.mask_reader: MaskReader | None = ckpt.extra.get("masks")
        self.created = set(ckpt.extra.get("created", ()))
        self.placeholders = dict(self.old.masks) if self.old is not None else {}

    def _read(self, names: set[str]) -> dict[str, torch.Tensor]:
        made = {n: torch.zeros(self.names[n].shape, dtype=self.dtypes[n]) for n in names & self.created}
        return {**super()._read(names - self.created), **made}

    def own_masks(self, index: int) -> list[str]:
        prefix = f"{self.prefix}{index}."
        return [n for n in self.placeholders if n.startswith(prefix)]

    def load(self, index: int, block: nn.Module) -> None:
        """Block i's masks, then its weights (checked against them by `BlockStream.load`)."""
        if self.mask_reader is not None:
            self.old.masks.update(self.mask_reader.read_packed(self.own_masks(index)))
        super().load(index, block)

    def release_block(self, index: int, block: nn.Module) -> None:
        """Write block i with its masks as they came in; both go back to placeholders."""
        own = self.own_masks(index)
        self.release(index, block, {n: self.old.masks[n] for n in own})
        for n in own:
            self.old.masks[n] = self.placeholders[n]


def _final_norm_names(model: nn.Module) -> set[str]:
    """The final norm's parameter names (none when the model has no final norm)."""
    final = arch.spec_for(model).final_norm
    return set() if final is None else {f"{final}.{n}" for n, _ in model.get_submodule(final).named_parameters()}


def _embedding_names(model: nn.Module, names: dict[str, torch.Tensor]) -> list[str]:
    """What catching block 0's inputs runs: every tensor outside the blocks except the
    final norm and an untied head (as `BlockStream` splits them)."""
    spec = arch.spec_for(model)
    tail = _final_norm_names(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embedding.weight:
        tail |= {n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight}
    return [n for n in names if not n.startswith(spec.blocks + ".") and n not in tail]


class ReferenceBlocks:
    """A streamed model that is only read: the dense reference of a streamed reconstruct.

    `load(i, block)` reads dense block i for block i's targets, `release(i, block)` puts
    it back on the meta device right after; `outside()` holds the embeddings while the
    dense stream's own inputs are caught (`--target dense-stream`). Weights are checked
    finite as they are read; nothing is written.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.model = ckpt.model
        self.reader: ShardReader = ckpt.extra["reader"]
        self.source = ckpt.source
        self.names = output_names(self.model)
        self.prefix = arch.spec_for(self.model).blocks + "."
        self.embedding_names = _embedding_names(self.model, self.names)

    def _install(self, names: list[str]) -> None:
        tensors = self.reader.read(set(names).__contains__)
        for name in names:
            if name not in tensors:
                raise CheckpointError(f"{self.source}: {name} did not come out of the checkpoint's shards")
            t = tensors.pop(name).to(self.names[name].dtype)
            _check_finite(name, t, self.source)
            _set_tensor(self.model, name, t)

    def _uninstall(self, names: list[str]) -> None:
        for name in names:
            _set_tensor(self.model, name, self.names[name])

    def block_names(self, index: int) -> list[str]:
        return [n for n in self.names if n.startswith(f"{self.prefix}{index}.")]

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        dtypes = {n: t.dtype for n, t in self.names.items()}
        with gathered_rows(self.model, self.reader, dtypes, self.source) as gathered:
            self._install([n for n in self.embedding_names if n not in gathered])
            try:
                yield
            finally:
                self._uninstall(self.embedding_names)

    def load(self, index: int, block: nn.Module) -> None:
        self._install(self.block_names(index))

    def release(self, index: int, block: nn.Module) -> None:
        self._uninstall(self.block_names(index))


def reconstruct(
    ckpt: Checkpoint,
    dense: Checkpoint,
    out: str | Path,
    config: Any,
    tokens: torch.Tensor,
    step: StepRecord,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Any:
    """Reconstruct the streamed pruned checkpoint `ckpt` (`open_checkpoint(...,
    lazy_masks=True)`) against the streamed dense `dense` into `out`.

    `reconstruction.reconstruct` with both models as residencies: the same weights,
    masks and per-block errors as in memory, written as `checkpoint.save` would write
    them. `config` is a `reconstruction.ReconstructConfig`; fills `step.results` (the
    caller fills `step.data`); returns the `ReconstructOutcome`.
    """
    # imported here: reconstruction imports training, which `perp prune` does not need
    from perp_cli import reconstruction, trainable

    config.validate()
    reconstruction.check_pruned(ckpt)
    reconstruction.check_compatible(ckpt.model, dense.model)
    # before the output layout is planned: the added biases are part of it
    ckpt.extra["created"] = trainable.add_biases(ckpt.model) if config.add_biases else []
    with streamed_output(
        ckpt, out, step, ckpt.masks.pattern, overwrite=overwrite, max_shard_size=max_shard_size, stream_type=ReconstructStream
    ) as stream:
        reference = ReferenceBlocks(dense)
        streamed = reconstruction.Streamed(
            pruned=engine.Residency(load=stream.load, release=stream.release_block, outside=stream.outside),
            dense=engine.Residency(load=reference.load, release=reference.release, outside=reference.outside),
            added_biases=list(ckpt.extra["created"]),
        )
        outcome = reconstruction.reconstruct(ckpt, dense.model, tokens, config, streamed=streamed)
        step.results = outcome.results()
    return outcome


# ----------------------------------------------------------------------------- streamed merge
# `perp merge --streaming` (the merge itself is `perp_cli.merging.merge_streamed`): block
# i's weights, masks and adapters are read for block i's step only, and the merged block
# is verified and written at once, as a streamed reconstruct writes its blocks.


class MergeStream(ReconstructStream):
    """The `BlockStream` of a streamed merge (`streamed_output(stream_type=MergeStream)`).

    Masks come and go with their block exactly as in a streamed reconstruct (lazy
    placeholders, block i's masks real while it is in memory, written back unchanged);
    with `keep_masks = False` (plain LoRA merged with --allow-densify) blocks are written
    without masks, as the in-memory merge then writes none.
    """

    keep_masks = True

    def release_block(self, index: int, block: nn.Module) -> None:
        if self.keep_masks:
            super().release_block(index, block)
            return
        own = self.own_masks(index)
        self.release(index, block, {})
        for n in own:
            self.old.masks[n] = self.placeholders[n]


# ----------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class Decision:
    stream: bool
    reason: str


def available_memory() -> int | None:
    """What this process may still allocate (`memory.process_limit`: the smallest of
    MemAvailable, the cgroup limits and the rlimits; a `MemoryLimit` names which), or None."""
    return memory.process_limit()


def weights_bytes(source: str | Path, dtype: str) -> int | None:
    """Bytes the weights take once loaded in `dtype` (headers only), or None if unknown."""
    try:
        stored = stored_tensors(Path(source).expanduser())
    except CheckpointError:
        return None
    target = checkpoint.resolve_dtype(dtype)
    return sum(
        shards.nbytes(target if target != "auto" and t.dtype.is_floating_point else t.dtype, t.shape)
        for t in stored.values()
    )


def decide(
    mode: str, source: str | Path, config: pruner.PruneConfig | None = None, dtype: str = "auto", models: int = 1
) -> Decision:
    """Whether a command streams. `on`/`off` as asked (`on` fails with a usage error
    if the input cannot stream); `auto` streams a local safetensors checkpoint whose
    weights would take more than half of the available memory. `config`: a prune's
    (`--scope global` cannot stream); `models`: how many models of this size the command
    holds in memory when it does not stream (reconstruct: the pruned and the dense one)."""
    if mode not in STREAMING_MODES:
        raise UsageError(f"--streaming {mode!r} is not one of {', '.join(STREAMING_MODES)}")
    if mode == "off":
        return Decision(False, "--streaming off")
    path = Path(source).expanduser()
    problem = None
    if not path.is_dir():
        problem = f"{source} is not a local directory (streaming reads local safetensors)"
    elif not ((path / checkpoint.WEIGHTS_NAME).is_file() or (path / checkpoint.WEIGHTS_INDEX_NAME).is_file()):
        problem = f"{source} has no safetensors weights"
    elif config is not None and pruner.plan(config).scope == "global":
        problem = "--scope global ranks the whole model at once"
    elif config is not None and (config.allocation != "uniform" or config.refine is not None or config.permute):
        problem = "--allocation owl, --refine and --permute run in memory"
    if mode == "on":
        if problem:
            raise UsageError(f"--streaming on: {problem}; use --streaming off")
        return Decision(True, "streaming (--streaming on): one block of weights in memory at a time")
    if problem:
        return Decision(False, f"not streaming: {problem}")
    size, free = weights_bytes(path, dtype), available_memory()
    size = size * models if size is not None else None
    if size is None or free is None:
        return Decision(False, "not streaming: model size or available memory unknown")
    limit = f" ({free.source})" if isinstance(free, memory.MemoryLimit) else ""
    if size > AUTO_FRACTION * free:
        return Decision(True, f"streaming, one block in memory at a time: the weights ({size / 2**30:.1f} GiB) exceed half of the {free / 2**30:.1f} GiB available{limit}")
    return Decision(False, f"in memory: weights {size / 2**30:.2f} GiB fit in the {free / 2**30:.1f} GiB available{limit}")
