"""The one checkpoint reader/writer (the contract is specified in docs/format.md).

A perp checkpoint is a standard Hugging Face model directory plus:

* `masks.safetensors`: bit-packed keep-masks by parameter name,
* `perp.json`: the manifest (history of steps, sparsity, mask hash),
* optionally `adapters.safetensors` + `adapters.json`: unmerged adapters.

Writes are atomic: everything goes into a temporary sibling directory, is verified, and
only then renamed into place. A failure or interrupt removes the temporary directory;
one left behind by SIGKILL is cleaned up by the next write to the same target.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from perp_cli import arch, memory, shards
from perp_cli.streaming import MaskSpool, StreamedBlocks, build_skeleton, output_names
from perp_cli.errors import CheckpointError, NumericalError, UsageError, raise_if_signalled
from perp_cli.manifest import (
    ADAPTERS_CONFIG_NAME,
    ADAPTERS_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MASKS_NAME,
    PICKLE_NAMES,
    SHARD_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ManifestError,
    StepRecord,
    empty_manifest,
    sha256_file,
    sha256_tensor,
    validate,
    weights_sha256,
)
from perp_cli.mask import MaskSet, mask_problems, resident, sparsity_summary
from perp_cli.shards import check_tensor_finite, resolve_dtype

TMP_MARKER = ".perp-tmp-"
OLD_MARKER = ".perp-old-"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# what a checkpoint directory perp wrote may hold (older manifests list no "files");
# --overwrite replaces nothing else without --overwrite-foreign
PERP_FILES = {
    "config.json", "generation_config.json", WEIGHTS_NAME, WEIGHTS_INDEX_NAME, MASKS_NAME, MANIFEST_NAME,
    ADAPTERS_NAME, ADAPTERS_CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "vocab.txt", "spiece.model",
}
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}  # what --export-peft writes
# vLLM refuses directories that carry these; perp never writes them.
FORBIDDEN_CONFIG_KEYS = ("sparsity_config", "quantization_config")

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Checkpoint:
    """An opened checkpoint (`open`): model, tokenizer (may be None), masks, manifest,
    adapters, and its residency, chosen at open time.

    In memory (`streamed=False`), `model` holds every weight. Streamed, `model` is a
    meta-device skeleton whose blocks come and go through `streaming.StreamedBlocks`:
    `weights` reads them from the shards; `mask_reader` (lazy masks: `masks` holds
    placeholders, block i's real masks are read for block i's step) and `adapter_reader`
    (lazy adapters: `adapters` is None) do the same for masks and adapters.
    """

    model: nn.Module
    tokenizer: Any
    masks: MaskSet | None
    manifest: dict[str, Any]
    source: str
    adapters: dict[str, torch.Tensor] | None = None
    adapters_config: dict[str, Any] | None = None
    local_dir: Path | None = None
    streamed: bool = False
    weights: shards.ShardReader | None = None
    mask_reader: shards.MaskReader | None = None
    adapter_reader: shards.AdapterReader | None = None
    created: list[str] = field(default_factory=list)  # tensors a step put in the skeleton (--add-biases), not in the shards
    problems: list[str] = field(default_factory=list)  # `open(verify=False)` (inspect): what was not loaded, and why

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise CheckpointError(f"{self.source} has no tokenizer files; this step needs one (copy them from the base model)")
        return self.tokenizer


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for CUDA, but no CUDA device is available")
    return dev


def looks_local(source: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _check_local_dir(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
    has_safetensors = (path / WEIGHTS_NAME).is_file() or (path / WEIGHTS_INDEX_NAME).is_file()
    if not has_safetensors:
        if any((path / n).is_file() for n in PICKLE_NAMES):
            if not allow_pickle:
                raise CheckpointError(
                    f"{path} has only pickled weights (pytorch_model.bin), which can run arbitrary code; "
                    "pass --allow-pickle if you trust it"
                )
        else:
            raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")
    if (path / WEIGHTS_INDEX_NAME).is_file():
        missing = sorted(s for s in shards.index_files(path) if not (path / s).is_file())
        if missing:
            raise CheckpointError(f"{path} is missing shard(s) listed in its index: {', '.join(missing)}")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """`perp.json` of `path`, validated (its documented shape, docs/format.md), or None."""
    file = path / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {_first_line(exc)}") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format version {version!r}; this perp reads up to {FORMAT_VERSION} (upgrade perp)"
        )
    try:
        return validate(manifest)
    except ManifestError as exc:
        raise CheckpointError(f"{file} is malformed: {exc}") from exc


def _open_masks(path: Path, manifest: dict[str, Any] | None, shapes: dict[str, tuple[int, ...]] | None,
                verify: bool, trust_inputs: bool, problems: list[str]) -> shards.MaskReader | None:
    """The reader of `path`'s masks, checked in the order that costs least: the header
    (names, shapes, bytes) against the model's parameter `shapes`, then the whole file
    against the manifest (sha256, sparsity; skipped with `trust_inputs`). A mask that
    does not fit is an error, or, with `verify=False` (inspect), described in `problems`."""
    reader = shards.MaskReader.open(path, manifest, verify=False)
    if reader is None:
        return None
    wrong = reader.shape_problems(shapes) if shapes is not None else []
    if wrong and verify:
        raise CheckpointError(f"{path}: weights and masks disagree: {wrong[0]} (run `perp inspect` for all)")
    problems.extend(wrong)
    if not trust_inputs and manifest and not wrong:
        reader.verify(manifest)
    return reader


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------- skeleton


def read_config(path: Path, trust_remote_code: bool = False) -> Any:
    """The `config.json` of a local directory (one line on failure)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise CheckpointError(f"cannot read the config of {path}: {_first_line(exc)}") from exc


def resolve_load_dtype(config: Any, dtype: str, stored_dtype: torch.dtype | None) -> torch.dtype:
    """`--dtype auto` as `from_pretrained` resolves it: the config's dtype, else the
    checkpoint's first floating tensor, else float32."""
    resolved = resolve_dtype(dtype)
    if resolved != "auto":
        return resolved
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype):
        return declared
    return stored_dtype or torch.float32


def _check_declared_layers(config: Any, stored: dict[str, shards.StoredTensor], path: Path) -> None:
    """A config that declares more decoder layers than the weights hold fails before
    the model is even built (a million declared layers would take minutes to build)."""
    declared = getattr(config, "num_hidden_layers", None)
    indices = {int(m.group(1)) for key in stored if (m := re.search(r"\.(\d+)\.", key))}
    if isinstance(declared, int) and indices and declared > max(indices) + 1:
        raise CheckpointError(f"{path}: config.json declares {declared} layers, but the weights hold {max(indices) + 1}")


def plan_local(path: Path, dtype: str = "auto", trust_remote_code: bool = False) -> shards.ShardReader:
    """Check a local safetensors checkpoint from its headers and config, allocating
    nothing: every declared shape against the file's bytes (`shards.read_header`) and
    against the model its config builds (on the meta device); no tensor missing, none
    unexpected (a config.json of another family), none mis-shaped (tied weights, as the
    config declares them, are stored once). The one check every reader goes through.
    Returns the reader of the weights; its `model` is that meta-device skeleton."""
    config = read_config(path, trust_remote_code)
    stored = shards.stored_tensors(path)
    _check_declared_layers(config, stored, path)
    first_float = next((t.dtype for t in stored.values() if t.dtype.is_floating_point), None)
    skeleton = build_skeleton(config, resolve_load_dtype(config, dtype, first_float), trust_remote_code)
    arch.spec_for(skeleton)  # fail early and clearly for an unmapped architecture
    return shards.ShardReader(path, skeleton, output_names(skeleton), stored)


def _hub_unreachable(source: str) -> str | None:
    """Why a hub id cannot be fetched right now (offline and not cached, or no route to
    the hub), or None: said at once instead of after half a minute of retries."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return None  # cached: from_pretrained works offline
        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set and it is not in the local cache"
        host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    except Exception:  # an id the hub client rejects: let from_pretrained say why
        return None
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
    except OSError as exc:
        return f"cannot reach {host}: {exc.strerror or exc}"
    return None


def open(  # noqa: A001  (the checkpoint module's opener; `checkpoint.open`)
    source: str | Path,
    dtype: str = "auto",
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    need_tokenizer: bool = False,
    verify: bool = True,
    device_map: str | dict[str, Any] | None = None,
    offload_dir: str | Path | None = None,
    trust_inputs: bool = False,
    streamed: bool = False,
    lazy_masks: bool = False,
    lazy_adapters: bool = False,
) -> Checkpoint:
    """Open a local directory (perp's or any HF one) or a hub id, with masks and manifest,
    in memory or `streamed` (the residency; `streaming.decide` chooses it).

    Everything is checked here, once, for every command. Before any weight is read:
    the manifest's shape, every header against its file and the config (`plan_local`),
    the masks' names and shapes, `adapters.json`, and (in memory) the memory it all
    needs against what the process may use (`memory.process_limit`). In memory, after:
    nothing missing, unexpected or mis-shaped in transformers' own loading report, all
    weights finite, masked weights exactly zero. Unless `trust_inputs`: the hashes and
    sparsity the manifest records. Only `inspect` passes `verify=False`, because
    reporting disagreement is its job (`ckpt.problems` then lists what it did not load).

    Streamed: a local safetensors directory only; the model is a meta-device skeleton and
    its weights are checked as each block is read (`streaming.StreamedBlocks`).
    `lazy_masks`: the masks are placeholders too, block i's read for its step (steps that
    keep every input mask: unpacked, they would take a quarter of a float32 model);
    `lazy_adapters`: `adapters.safetensors` is read a block at a time (a streamed merge).

    `device_map="auto"` (or a dict, as in `from_pretrained`) lets Accelerate spread the
    blocks over every visible GPU, then CPU RAM, then `offload_dir` on disk, instead of
    putting the model on `device`; with no GPU everything lands on the CPU. Offloaded
    weights sit on the meta device between forward passes; the checks bring them to the
    CPU one module at a time (`resident`).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    memory.return_freed_memory()  # block-sized temporaries freed later go back to the OS (the peak stays ~1x the weights)
    source = str(source)
    path = Path(source).expanduser()
    local = os.path.lexists(path) or looks_local(source)
    safetensors = (path / WEIGHTS_NAME).is_file() or (path / WEIGHTS_INDEX_NAME).is_file()
    if streamed and not path.is_dir():
        raise UsageError(f"streaming reads a local directory; {source} is not one (download hub models first)")
    if streamed and not safetensors:
        raise UsageError(f"{source} has no safetensors weights; streaming reads model.safetensors or its sharded index only")
    if local:
        if not path.exists():
            kind = "a broken symlink or a symlink loop" if os.path.lexists(path) else "no such directory"
            raise CheckpointError(f"{source}: {kind}")
        _check_local_dir(path, allow_pickle)
    else:
        reason = _hub_unreachable(source)
        if reason:
            raise CheckpointError(f"{source}: no such directory, and the hub is unreachable ({reason})")
    manifest = read_manifest(path) if local else None
    placement = device_map_kwargs(device_map, offload_dir)
    problems: list[str] = []
    masks = weights = mask_reader = adapter_reader = None
    if local:
        weights = plan_local(path, dtype, trust_remote_code) if safetensors else None
        shapes = {n: tuple(p.shape) for n, p in weights.model.named_parameters()} if weights else None
        mask_reader = _open_masks(path, manifest, shapes, verify, trust_inputs, problems)
        adapter_reader = shards.AdapterReader.open(path, manifest, verify=not trust_inputs)
        # the masks that fit the model (with verify=False the others are problems, never read)
        names = mask_reader.fitting(shapes) if mask_reader else []
        if weights is not None and device_map is None and not streamed:
            skeleton = weights.model  # the weights once loaded in the working dtype, then the masks unpacked
            needed = sum(shards.nbytes(skeleton.dtype if t.is_floating_point() else t.dtype, t.shape)
                         for t in output_names(skeleton).values())
            needed += sum(shards.nbytes(torch.bool, mask_reader.shapes[n]) for n in names)
            if adapter_reader is not None:
                needed += sum(t.nbytes for t in adapter_reader.stored.values())
            memory.require(needed, f"loading {source}", "a step that streams needs one block: --streaming on, where offered")
        if mask_reader is not None and lazy_masks and streamed:
            masks = mask_reader.placeholders()
        elif mask_reader is not None:
            masks, mask_reader = mask_reader.mask_set(names), None
    if streamed:
        model = weights.model
        if (path / "generation_config.json").is_file():
            with contextlib.suppress(Exception):
                model.generation_config = GenerationConfig.from_pretrained(str(path))
        # names and shapes are checked (`_open_masks`); streaming also needs every mask inside the blocks
        outside = sorted(set(masks.masks) - set(arch.block_names(model, masks.masks))) if masks is not None else []
        if outside:
            raise UsageError(f"{source} has a mask on {outside[0]}, outside the decoder blocks; "
                             "streaming handles block masks only (use --streaming off)")
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, path, local, dtype, allow_pickle, trust_remote_code, placement)
        if device_map is None:
            model.to(resolve_device(device))
        arch.spec_for(model)  # fail early and clearly for an unmapped architecture
    tokenizer = _load_tokenizer(str(path) if local else source, trust_remote_code, need_tokenizer)
    if not streamed:
        _check_vocabulary(source, model, tokenizer)
    adapters, adapters_config = None, adapter_reader.config if adapter_reader is not None else None
    if adapter_reader is not None and not (lazy_adapters and streamed):
        adapters, adapter_reader = adapter_reader.read(sorted(adapter_reader.stored)), None
    ckpt = Checkpoint(
        model=model,
        tokenizer=tokenizer,
        masks=masks,
        manifest=manifest or empty_manifest(source if not local else str(path.resolve())),
        source=source,
        adapters=adapters,
        adapters_config=adapters_config,
        local_dir=path.resolve() if local else None,
        streamed=streamed,
        weights=weights if streamed else None,
        mask_reader=mask_reader,
        adapter_reader=adapter_reader,
        problems=problems,
    )
    if verify and not streamed:
        check_finite(model, source)
        if masks is not None:
            wrong = mask_problems(model, masks)
            if wrong:
                raise CheckpointError(f"{source}: weights and masks disagree: {wrong[0]} (run `perp inspect` for all)")
    if local and manifest and not trust_inputs:
        recorded = manifest.get("weights_sha256")
        if recorded and weights_sha256(path) != recorded:
            message = (f"the weights of {source} do not match the weights_sha256 recorded in {MANIFEST_NAME} "
                       "(edited or replaced since perp wrote them; --trust-inputs to use them anyway)")
            if verify:
                raise CheckpointError(message)
            problems.append(message)
    return ckpt


def _from_pretrained(auto: Any, source: str, path: Path, local: bool, dtype: str, allow_pickle: bool,
                     trust_remote_code: bool, placement: dict[str, Any]) -> nn.Module:
    """`from_pretrained`, its failures as one line, its loading report checked."""
    try:
        model, info = auto.from_pretrained(
            str(path) if local else source,
            dtype=resolve_dtype(dtype),
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **placement,
        )
    except (UsageError, CheckpointError):
        raise
    except Exception as exc:
        if local:
            raise CheckpointError(f"cannot load a causal LM from {source}: {_first_line(exc)}") from exc
        raise CheckpointError(
            f"{source} is not a local directory, and loading it as a hub id failed "
            f"(hub ids need network access): {_first_line(exc)}"
        ) from exc
    _check_loading_info(source, model, info)
    return model.eval()


def check_source_weights(ckpt: Checkpoint, dense: str | Path) -> None:
    """The dense reference of a reconstruction must be the model the history started
    from: its weights' hash against the `source_weights_sha256` recorded at pruning."""
    recorded = ckpt.manifest.get("source_weights_sha256")
    path = Path(dense).expanduser()
    if not recorded or not path.is_dir():
        return
    if weights_sha256(path) != recorded:
        raise CheckpointError(
            f"the weights of {dense} are not those {ckpt.source} was pruned from (sha256 differs from "
            f"source_weights_sha256 in {MANIFEST_NAME}: replaced since?); --trust-inputs to use them anyway"
        )


def _check_loading_info(source: str, model: nn.Module, info: dict[str, Any]) -> None:
    """transformers' own report of the load: a tensor the weights lack is randomly
    initialised and one they have too many is dropped, both silently. Either is an error
    here (tied weights, as the config declares them, are not reported missing)."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not shards.ignored_unexpected(model, k))
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or [])
    hint = " (is config.json of another model?)" if unexpected else ""
    if missing:
        raise CheckpointError(f"{source}: tensor {shards.first_of(missing)} is not in the weights{hint}")
    if mismatched:
        raise CheckpointError(f"{source}: tensor {shards.first_of(mismatched)} has another shape than config.json makes it")
    if unexpected:
        raise CheckpointError(
            f"{source}: tensor {shards.first_of(unexpected)} in the weights is not part of a {type(model).__name__} "
            "(is config.json of another model?)"
        )


def _check_vocabulary(source: str, model: nn.Module, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the model embeds would feed it ids past the
    embedding matrix (an index error deep in a forward pass, or worse on a GPU)."""
    if tokenizer is None:
        return
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    size = None
    with contextlib.suppress(Exception):
        size = len(tokenizer)
    if rows is not None and size is not None and size > rows:
        raise CheckpointError(
            f"{source}: the tokenizer has {size} tokens, but the model embeds only {rows} "
            "(a tokenizer of another model?)"
        )


def device_map_kwargs(device_map: str | dict[str, Any] | None, offload_dir: str | Path | None = None) -> dict[str, Any]:
    """`from_pretrained` keywords for a device map; commands call it first to fail fast
    (an unknown map or missing Accelerate is a usage error)."""
    if device_map is None:
        if offload_dir is not None:
            raise UsageError("--offload-dir only applies with --device-map")
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    try:
        import accelerate  # noqa: F401  (transformers dispatches through it)
    except ImportError as exc:
        raise UsageError("--device-map needs Accelerate: pip install 'perp[dist]'") from exc
    placement: dict[str, Any] = {"device_map": device_map}
    if offload_dir is not None:
        placement["offload_folder"] = str(Path(offload_dir).expanduser())
    return placement


def offloaded_parameters(model: nn.Module) -> list[str]:
    """Parameters a device map offloaded (CPU or disk): they are on the meta device
    between forward passes, so nothing can train or re-point them."""
    return [name for name, p in model.named_parameters() if p.is_meta]


def _load_tokenizer(where: str, trust_remote_code: bool, required: bool) -> Any:
    from transformers import AutoTokenizer

    path = Path(where)
    if path.is_dir() and not any((path / n).is_file() for n in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer here instead of failing
        if required:
            raise CheckpointError(f"{where} has no tokenizer files; this step needs one (copy them from the base model)")
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if required:
            raise CheckpointError(f"cannot load a tokenizer from {where}: {_first_line(exc)}") from exc
        return None
    return tokenizer


def check_finite(model: nn.Module, where: str) -> None:
    for name, p in model.named_parameters():
        with resident(model, name, p) as values:
            check_tensor_finite(name, values, where)


# ----------------------------------------------------------------------------- writing


def _input_paths(inputs: list[str | Path | None]) -> list[tuple[str, Path]]:
    """Every existing input as (as given, resolved), plus where the top-level symlinks of
    an input directory lead (a Hugging Face cache snapshot links to its blobs)."""
    out = []
    for inp in inputs:
        if inp is None:
            continue
        path = Path(inp).expanduser()
        if not path.exists():
            continue
        out.append((str(inp), path.resolve()))
        if path.is_dir():
            with contextlib.suppress(OSError):
                for entry in path.iterdir():
                    if entry.is_symlink() and entry.exists():
                        out.append((str(inp), entry.resolve()))
    return out


def foreign_content(target: Path) -> str | None:
    """Why the existing directory `target` is not a checkpoint perp wrote (so --overwrite
    must not delete it), or None: it is empty, or it has a valid `perp.json` and holds
    only the files perp writes (those the manifest lists, or the known names), or it is
    a PEFT directory perp exported."""
    try:
        entries = list(target.iterdir())
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror or exc})"
    if not entries:
        return None
    names = {e.name for e in entries}
    for e in entries:
        if e.is_symlink() or not e.is_file():
            return f"it holds {e.name}, which perp never writes"
    if names <= PEFT_FILES:
        return None
    if MANIFEST_NAME not in names:
        return f"it has no {MANIFEST_NAME}"
    try:
        manifest = validate(json.loads((target / MANIFEST_NAME).read_text()))
    except (OSError, ValueError) as exc:
        return f"its {MANIFEST_NAME} is not one perp wrote ({_first_line(exc)})"
    if not manifest.get("files") and not manifest.get("history"):
        return f"its {MANIFEST_NAME} records no step perp wrote it with"
    listed = set(manifest.get("files") or []) | {MANIFEST_NAME}
    allowed = listed if manifest.get("files") else PERP_FILES
    for name in sorted(names):
        if name not in allowed and not (not manifest.get("files") and SHARD_NAME.fullmatch(name)):
            return f"it holds {name}, which perp did not write there"
    return None


def check_output(
    out: str | Path, inputs: list[str | Path | None], overwrite: bool, overwrite_foreign: bool = False
) -> Path:
    """Validate an output path before any work starts (fail fast, lose nothing).

    `inputs`: everything the step reads (checkpoints, --dense, data files, --offload-dir).
    The output may be neither one of them, nor inside one, nor contain one (the rename at
    the end would delete it). An existing output is replaced only with `overwrite`, and
    only if perp wrote it (`foreign_content`), unless `overwrite_foreign`."""
    overwrite = overwrite or overwrite_foreign
    text = str(out)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"output path {text!r} contains a newline or another control character; choose another -o")
    out_path = Path(out).expanduser()
    if out_path.is_symlink():
        raise UsageError(f"output {out} is a symlink; perp writes only to real directories")
    resolved = out_path.resolve()
    for given, inp_resolved in _input_paths(inputs):
        if resolved == inp_resolved or inp_resolved in resolved.parents:
            raise UsageError(f"output {out} is, or is inside, the input {given}; choose another -o")
        if resolved in inp_resolved.parents:
            raise UsageError(f"output {out} contains the input {given}; replacing it would delete the input: choose another -o")
    if resolved.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")
    if resolved.exists() and not resolved.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if resolved.exists() and not overwrite_foreign:
        reason = foreign_content(resolved)
        if reason:
            raise UsageError(
                f"output {out} is not a checkpoint perp wrote ({reason}); --overwrite will not delete it: "
                "choose another -o, or pass --overwrite-foreign to replace it and everything in it"
            )
    parent = resolved.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write to {parent}: {probe} is not a directory")
    if not os.access(probe, os.W_OK):
        raise UsageError(f"cannot write to {parent} (permission denied)")
    return resolved


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a scratch file named after it is then in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> str:
    """When process `pid` started, as a token (clock ticks since boot, from /proc), or ""
    where that cannot be read: with the pid it names one process, never a later one that
    reuses the pid."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return stat_line.rsplit(")", 1)[1].split()[19]
    return ""


_TOKEN = secrets.token_hex(4)  # where no start time can be read: unique to this process


def scratch_suffix() -> str:
    """`<pid>-<start>` for the names of this process's temporaries (`owner_alive`)."""
    return f"{os.getpid()}-{process_start(os.getpid()) or _TOKEN}"


def owner_alive(name: str) -> bool | None:
    """Whether the process that made temporary `name` (`...-<pid>[-<start>]`) still runs:
    its pid lives and, where the name records it, with the same start time. None when
    the name carries no pid."""
    tail = name.rsplit(TMP_MARKER, 1)[-1] if TMP_MARKER in name else name.rsplit(OLD_MARKER, 1)[-1]
    parts = tail.split("-")
    try:
        pid = int(parts[0])
    except ValueError:
        return None
    if not pid_alive(pid):
        return False
    if len(parts) > 1 and parts[1].isdigit():
        start = process_start(pid)
        return not start or start == parts[1]
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove temporaries of `out` left by a killed process (its pid no longer runs, or
    now belongs to a process started later)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    mine = scratch_suffix()
    for marker in (TMP_MARKER, OLD_MARKER):
        for candidate in out.parent.glob(f".{out.name}{marker}*"):
            if candidate.name.endswith(mine) or owner_alive(candidate.name) is not False:
                continue
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (an OSError, or a library's wrapper of one) means the disk is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def staging(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; rename it into place on success.

    On any exception (including KeyboardInterrupt and perp's SIGTERM handler) the
    temporary directory is removed and `out` is untouched. A full disk, however the
    library that hit it words it, becomes the one documented line (exit 1).
    """
    out = Path(out).expanduser().resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(_write_failure(out, exc)) from exc
    clean_stale_temporaries(out)
    tmp = out.parent / f".{out.name}{TMP_MARKER}{scratch_suffix()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(_write_failure(out, exc)) from exc
    try:
        yield tmp
        raise_if_signalled()
        if out.exists():
            if not overwrite:
                raise UsageError(f"output {out} appeared while this step ran; pass --overwrite to replace it")
            trash = out.parent / f".{out.name}{OLD_MARKER}{scratch_suffix()}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, OSError) and isinstance(exc, Exception) and disk_full(exc):
            raise CheckpointError(_write_failure(out, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))) from exc
        raise


def _strip_forbidden_config(path: Path) -> None:
    """Drop what an output config must not carry: keys vLLM refuses, and an `auto_map`
    pointing at code the directory does not hold (perp never copies code; such a config
    would fail to load with --trust-remote-code, or fetch code from elsewhere)."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    changed = False
    if any(k in config for k in FORBIDDEN_CONFIG_KEYS):
        for key in FORBIDDEN_CONFIG_KEYS:
            config.pop(key, None)
        changed = True
    auto_map = config.get("auto_map")
    if auto_map is not None:
        refs = [r for v in (auto_map.values() if isinstance(auto_map, dict) else []) for r in (v if isinstance(v, list) else [v])]
        modules = {str(r).split("--")[-1].rsplit(".", 1)[0] for r in refs if r}
        if not isinstance(auto_map, dict) or any("--" in str(r) for r in refs) or not all((path / f"{m}.py").is_file() for m in modules):
            config.pop("auto_map")
            changed = True
    if changed:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def next_manifest(manifest_in: dict[str, Any], step: StepRecord) -> dict[str, Any]:
    """The input's manifest with `step` appended to its history, and without the fields
    that describe the input's files (the writer sets them for the output). The first
    step from a plain model records that model's weights hash (`source_weights_sha256`),
    which `reconstruct` checks its dense reference against."""
    per_output = ("sparsity", "masks_sha256", "pattern", "adapters", "weights_sha256", "files")
    manifest = {k: v for k, v in manifest_in.items() if k not in per_output}
    manifest["format_version"] = FORMAT_VERSION
    manifest.setdefault("source_model", step.input)
    if "source_weights_sha256" not in manifest and not manifest_in.get("history") and step.input:
        source = Path(step.input).expanduser()
        digest = weights_sha256(source) if source.is_dir() else None
        if digest:
            manifest["source_weights_sha256"] = digest
    manifest["history"] = list(manifest_in.get("history", [])) + [step.finish()]
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `perp.json` last, recording what the step wrote: the hash of the weights
    (`weights_sha256`, checked at every read) and every file of the directory (`files`:
    --overwrite replaces only a directory that holds nothing else)."""
    manifest["weights_sha256"] = weights_sha256(directory)
    manifest["files"] = sorted({p.name for p in directory.iterdir()} | {MANIFEST_NAME})
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class Output:
    """The one sink of a step (`writing`): the output checkpoint being staged.

    In memory, `finish` writes the model at the end. Streamed, `blocks` is the
    `streaming.StreamedBlocks` to hand the engine as its residency: each block is
    written as it is released, and `finish` copies the tensors outside the blocks.
    `spool` (`streaming.MaskSpool`) takes the output's masks block by block as a step
    chooses them (the streamed blocks' masks, an in-memory prune's); a step that holds its
    masks in memory passes them to `finish` instead. Everything else (config, tokenizer,
    masks with their hash and sparsity, adapters, the manifest, the read-back check) is
    the same sequence for both residencies.
    """

    def __init__(self, ckpt: Checkpoint, directory: Path, step: StepRecord, max_shard_size: int,
                 writer: shards.ShardWriter | None) -> None:
        self.ckpt, self.directory, self.step, self.max_shard_size = ckpt, directory, step, max_shard_size
        self.writer = writer
        self.spool = MaskSpool(directory)
        self.blocks: StreamedBlocks | None = StreamedBlocks(ckpt, writer, self.spool) if writer is not None else None
        self.manifest: dict[str, Any] | None = None

    def finish(self, masks: MaskSet | None = None, adapters: dict[str, torch.Tensor] | None = None,
               adapters_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write everything but what the blocks already wrote; return the manifest.

        `masks`: the masks to write when the step held them in memory (in-memory
        reconstruct, merge). None, and always when streamed: the spooled masks, if any (a
        streamed step's, an in-memory prune's). Before anything of the model is written in
        memory, the invariants are verified: all weights finite; masked weights exactly zero
        and N:M groups valid (spooled masks: by the step as it spooled each block, as a
        streamed block is verified when it is released)."""
        if self.blocks is not None:
            masks = None  # the blocks were released with their masks (spooled)
        if masks is not None and self.spool.stored:
            raise ValueError("internal: masks both spooled and passed to finish")
        model, tmp, step = self.ckpt.model, self.directory, self.step
        if self.blocks is None:
            check_finite(model, "refusing to write")
            problems = mask_problems(model, masks) if masks is not None else []
            if problems:
                raise CheckpointError(f"refusing to write: {problems[0]}")
            for name, t in (adapters or {}).items():
                if not torch.isfinite(t).all():
                    raise NumericalError(f"refusing to write: adapter tensor {name} contains NaN or inf")
            model.save_pretrained(tmp, max_shard_size=self.max_shard_size)
        else:
            self.blocks.copy_tail()
            self.writer.close()
            step.results["streaming"] = {"max_shard_size": self.max_shard_size, "shards": len(self.writer.files),
                                         "bytes_written": self.writer.total_size}
            _write_config(model, tmp)
        _strip_forbidden_config(tmp)
        if self.ckpt.tokenizer is not None:
            self.ckpt.tokenizer.save_pretrained(tmp)
        manifest = next_manifest(self.ckpt.manifest, step)
        digests = None  # each written mask's sha256, to verify the file once the manifest is written
        if masks is not None:
            self.spool.discard()
            shapes = {name: list(masks.masks.shape(name)) for name in masks.masks}
            manifest["masks_sha256"] = shards.write_masks(tmp, shapes, masks.pattern, masks.permutations, masks.masks.packed)
            manifest["pattern"], stats = str(masks.pattern), masks.stats()
            digests = {name: sha256_tensor(masks.masks.packed(name)) for name in masks.masks}
        elif self.spool.stored:
            manifest["masks_sha256"] = self.spool.finish()
            manifest["pattern"], stats, digests = str(self.spool.pattern), self.spool.stats, self.spool.digests
        else:
            self.spool.discard()
        if digests is not None:
            manifest["sparsity"] = sparsity_summary(stats)
        if adapters is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(tmp / ADAPTERS_NAME))
            (tmp / ADAPTERS_CONFIG_NAME).write_text(json.dumps(adapters_config or {}, indent=2) + "\n")
            manifest["adapters"] = {"sha256": sha256_file(tmp / ADAPTERS_NAME), **(adapters_config or {})}
        write_manifest(tmp, manifest)
        if digests is not None:
            shards.verify_masks(tmp, manifest["masks_sha256"], digests)
        self.manifest = manifest
        return manifest


@contextlib.contextmanager
def writing(ckpt: Checkpoint, out: str | Path, step: StepRecord, overwrite: bool = False,
            max_shard_size: str | int = "5GB") -> Iterator[Output]:
    """Write a step's output checkpoint atomically, whatever `ckpt`'s residency.

    Yields the `Output`: the caller runs its step (streamed: with `output.blocks` as the
    engine's residency), then calls `output.finish(...)`. All of it happens inside
    `staging`: any exception or interrupt, or no `finish`, leaves no output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    limit = shards.parse_size(max_shard_size)
    out_path = Path(out).expanduser().resolve()
    layout = None
    if ckpt.streamed:
        memory.return_freed_memory()
        layout = _output_layout(ckpt.model)
        _check_space(out_path, sum(shards.nbytes(d, s) for d, s in layout.values()))
    try:
        with staging(out_path, overwrite=overwrite) as tmp:
            writer = shards.ShardWriter(tmp, layout, limit, total_parameters=ckpt.model.num_parameters()) if layout else None
            output = Output(ckpt, tmp, step, limit, writer)
            yield output
            if output.manifest is None:
                raise CheckpointError(f"internal: the step ended without finishing {out}")
    except OSError as exc:
        raise CheckpointError(_write_failure(out, exc)) from exc


def save(
    out: str | Path,
    model: nn.Module,
    tokenizer: Any,
    masks: MaskSet | None,
    manifest_in: dict[str, Any],
    step: StepRecord,
    overwrite: bool = False,
    adapters: dict[str, torch.Tensor] | None = None,
    adapters_config: dict[str, Any] | None = None,
    max_shard_size: str | int = "5GB",
) -> dict[str, Any]:
    """Write an in-memory model atomically (`writing` + `Output.finish`); return its manifest."""
    ckpt = Checkpoint(model=model, tokenizer=tokenizer, masks=None, manifest=manifest_in, source=str(out))
    with writing(ckpt, out, step, overwrite=overwrite, max_shard_size=max_shard_size) as output:
        output.finish(masks, adapters, adapters_config)
    return output.manifest


def _output_layout(model: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name, dtype and shape of every tensor `save_pretrained` would write for `model`."""
    metas = {n: torch.empty_like(t, device="meta") for n, t in output_names(model).items()}
    return {n: (t.dtype, tuple(t.shape)) for n, t in shards.to_checkpoint_names(model, metas).items()}


def _write_config(model: nn.Module, tmp: Path) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)


def _check_space(out: Path, needed: int) -> None:
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise CheckpointError(f"writing {out} needs about {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB is free; nothing was written")


def _write_failure(out: str | Path, exc: OSError) -> str:
    if disk_full(exc):
        return f"out of disk space while writing {out}; nothing was written (free space and rerun)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {out}: {exc.strerror}; nothing was written"
    return f"writing {out} failed: {exc.strerror or exc}; nothing was written"


def record_eval(path: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append an evaluation `entry` to the directory's `perp.json` (`evaluations` list).

    The only change `perp eval --record` makes to a checkpoint: weights, masks and the
    step history are untouched (an evaluation is not a step that produced the weights).
    A plain HF directory gets a fresh manifest. The file is rewritten atomically (temp
    sibling + os.replace), so a crash leaves the old or the new manifest, never half.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; cannot record an evaluation in it")
    manifest = read_manifest(path) or empty_manifest(str(path.resolve()))
    manifest["evaluations"] = list(manifest.get("evaluations", [])) + [entry]
    write_json_file(path / MANIFEST_NAME, manifest)
    return manifest


def write_json_file(target: str | Path, value: Any) -> None:
    """Write one JSON file atomically (a temporary sibling, fsynced, renamed into place):
    a crash leaves the old file or the new one; any failure removes the temporary, and a
    full disk is the documented one-line error."""
    target = Path(target).expanduser()
    tmp = target.with_name(f".{target.name}{TMP_MARKER}{scratch_suffix()}")
    try:
        with builtins.open(tmp, "w", encoding="utf-8") as f:  # `open` here is the checkpoint opener
            f.write(json.dumps(value, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise CheckpointError(_write_failure(target, exc)) from exc
        raise
