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

import contextlib
import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from perp_cli import arch
from perp_cli.errors import CheckpointError, NumericalError, UsageError, raise_if_signalled
from perp_cli.manifest import FORMAT_VERSION, MANIFEST_NAME, StepRecord, empty_manifest, sha256_file
from perp_cli.mask import MaskSet, Pattern, nm_violations, nonzeros_outside, pack_bits

MASKS_NAME = "masks.safetensors"
ADAPTERS_NAME = "adapters.safetensors"
ADAPTERS_CONFIG_NAME = "adapters.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TMP_MARKER = ".perp-tmp-"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# vLLM refuses directories that carry these; perp never writes them.
FORBIDDEN_CONFIG_KEYS = ("sparsity_config", "quantization_config")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Checkpoint:
    """A loaded checkpoint: model, tokenizer (may be None), masks, manifest, adapters."""

    model: nn.Module
    tokenizer: Any
    masks: MaskSet | None
    manifest: dict[str, Any]
    source: str
    adapters: dict[str, torch.Tensor] | None = None
    adapters_config: dict[str, Any] | None = None
    local_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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


def resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_local(source: str) -> bool:
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
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointError(f"{path} is missing shard(s) listed in its index: {', '.join(missing)}")


def read_manifest(path: Path) -> dict[str, Any] | None:
    file = path / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format version {version!r}; this perp reads up to {FORMAT_VERSION} (upgrade perp)"
        )
    return manifest


def read_masks(path: Path, manifest: dict[str, Any] | None) -> MaskSet | None:
    """Read and unpack `masks.safetensors`, checking its hash against the manifest (the
    same reader a streamed step uses a block at a time)."""
    from perp_cli.shards import MaskReader  # shards imports this module

    reader = MaskReader.open(path, manifest)
    if reader is None:
        return None
    return MaskSet(reader.read(sorted(reader.stored)), reader.pattern)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def load(
    source: str | Path,
    dtype: str = "auto",
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    need_tokenizer: bool = False,
    verify: bool = True,
    device_map: str | dict[str, Any] | None = None,
    offload_dir: str | Path | None = None,
) -> Checkpoint:
    """Load a local directory (perp's or any HF one) or a hub id, with masks and manifest.

    Consistency is checked here, once, for every command: mask hash, mask names and
    shapes against the model, masked weights exactly zero, all weights finite. Only
    `inspect` passes `verify=False`, because reporting disagreement is its job.

    `device_map="auto"` (or a dict, as in `from_pretrained`) lets Accelerate spread the
    blocks over every visible GPU, then CPU RAM, then `offload_dir` on disk, instead of
    putting the model on `device`; with no GPU everything lands on the CPU. Offloaded
    weights sit on the meta device between forward passes; the checks bring them to the
    CPU one module at a time (`resident`).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = str(source)
    path = Path(source).expanduser()
    local = path.exists() or _looks_local(source)
    if local:
        if not path.exists():
            raise CheckpointError(f"{source}: no such directory")
        _check_local_dir(path, allow_pickle)
    manifest = read_manifest(path) if local else None
    placement = device_map_kwargs(device_map, offload_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path) if local else source,
            dtype=resolve_dtype(dtype),
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
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
    model.eval()
    if device_map is None:
        model.to(resolve_device(device))
    arch.spec_for(model)  # fail early and clearly for an unmapped architecture
    tokenizer = _load_tokenizer(str(path) if local else source, trust_remote_code, need_tokenizer)
    masks = read_masks(path, manifest) if local else None
    adapters, adapters_config = _read_adapters(path) if local else (None, None)
    ckpt = Checkpoint(
        model=model,
        tokenizer=tokenizer,
        masks=masks,
        manifest=manifest or empty_manifest(source if not local else str(path.resolve())),
        source=source,
        adapters=adapters,
        adapters_config=adapters_config,
        local_dir=path.resolve() if local else None,
    )
    if not verify:
        return ckpt
    check_finite(model, source)
    if masks is not None:
        problems = mask_problems(model, masks)
        if problems:
            raise CheckpointError(f"{source}: weights and masks disagree: {problems[0]} (run `perp inspect` for all)")
    return ckpt


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


@contextlib.contextmanager
def resident(model: nn.Module, name: str, param: torch.Tensor) -> Iterator[torch.Tensor]:
    """The values of parameter `name`: `param` itself, or, for a weight a device map
    offloaded, its module's weights brought to the CPU for the duration (one module at a
    time, so checking a model larger than memory stays possible)."""
    if not param.is_meta:
        yield param
        return
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    from accelerate.utils import align_module_device, has_offloaded_params

    if not has_offloaded_params(owner):
        raise CheckpointError(f"parameter {name} has no values (meta device) and no offload to read them from")
    with align_module_device(owner, torch.device("cpu")):
        yield getattr(owner, attr)


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


def _read_adapters(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    from perp_cli.shards import AdapterReader  # shards imports this module

    reader = AdapterReader.open(path)
    if reader is None:
        return None, None
    return reader.read(sorted(reader.stored)), reader.config


def check_finite(model: nn.Module, where: str) -> None:
    for name, p in model.named_parameters():
        with resident(model, name, p) as values:
            if not torch.isfinite(values).all():
                raise NumericalError(f"{where}: parameter {name} contains NaN or inf")


def mask_problems(model: nn.Module, masks: MaskSet) -> list[str]:
    """Everything wrong between a model and its masks, as readable lines."""
    params = dict(model.named_parameters())
    transposed = arch.transposed_names(model)
    problems = []
    for name, keep in masks.masks.items():
        if name not in params:
            problems.append(f"mask {name} names no parameter of this model")
            continue
        p = params[name]
        if tuple(p.shape) != tuple(keep.shape):
            problems.append(f"mask {name} has shape {tuple(keep.shape)}, the weight {tuple(p.shape)}")
            continue
        with resident(model, name, p) as values:
            outside = nonzeros_outside(values.detach(), keep)
        if outside:
            problems.append(f"{name} has {outside} nonzero weights where the mask says pruned")
        bad = nm_violations(keep, masks.pattern, transposed=name in transposed)
        if bad:
            problems.append(f"{name} breaks the {masks.pattern} pattern in {bad if bad > 0 else 'all'} groups")
    return problems


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


# ----------------------------------------------------------------------------- writing


def check_output(out: str | Path, inputs: list[str | Path], overwrite: bool) -> Path:
    """Validate an output path before any work starts (fail fast, lose nothing)."""
    out_path = Path(out).expanduser()
    if out_path.is_symlink():
        raise UsageError(f"output {out} is a symlink; perp writes only to real directories")
    resolved = out_path.resolve()
    for inp in inputs:
        inp_path = Path(inp).expanduser()
        if not inp_path.exists():
            continue
        inp_resolved = inp_path.resolve()
        if resolved == inp_resolved or inp_resolved in resolved.parents:
            raise UsageError(f"output {out} is, or is inside, the input {inp}; choose another -o")
    if resolved.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")
    if resolved.exists() and not resolved.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
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


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove temporaries of `out` left by a killed process (its pid no longer lives)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for candidate in out.parent.glob(f".{out.name}{TMP_MARKER}*"):
        try:
            pid = int(candidate.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def staging(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; rename it into place on success.

    On any exception (including KeyboardInterrupt and perp's SIGTERM handler) the
    temporary directory is removed and `out` is untouched.
    """
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    tmp = out.parent / f".{out.name}{TMP_MARKER}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        raise_if_signalled()
        if out.exists():
            if not overwrite:
                raise UsageError(f"output {out} appeared while this step ran; pass --overwrite to replace it")
            trash = out.parent / f".{out.name}.perp-old-{os.getpid()}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_masks(path: Path, masks: MaskSet) -> str:
    """Write `masks.safetensors` and return its sha256."""
    # sorted names: the same masks always give the same bytes (and the same sha256)
    packed = {name: pack_bits(masks.masks[name]) for name in sorted(masks.masks)}
    return write_packed_masks(path, packed, {name: list(keep.shape) for name, keep in masks.masks.items()}, masks.pattern)


def write_packed_masks(path: Path, packed: dict[str, torch.Tensor], shapes: dict[str, list[int]], pattern: Pattern) -> str:
    """Write already bit-packed masks (`mask.pack_bits`) as `masks.safetensors`; return its
    sha256. (Streaming spools packed masks to disk instead and writes the same header,
    `masks_metadata`, around them.)"""
    # perp's own safetensors writer, not `save_file`: safetensors writes the metadata in a
    # per-process random order, which made the same masks hash differently on every run
    from perp_cli.shards import ShardWriter  # shards imports this module

    names = sorted(packed)
    layout = {n: (torch.uint8, tuple(packed[n].shape)) for n in names}
    writer = ShardWriter(path, layout, 1 << 62, metadata=masks_metadata(pattern, shapes), single_name=MASKS_NAME)
    for n in names:
        writer.write(n, packed[n])
    writer.close()
    return sha256_file(path / MASKS_NAME)


def masks_metadata(pattern: Pattern, shapes: dict[str, list[int]]) -> dict[str, str]:
    """The `__metadata__` of `masks.safetensors` (docs/format.md): also the header of the
    masks a streamed run spools to disk block by block."""
    return {
        "format_version": str(FORMAT_VERSION),
        "pattern": str(pattern),
        "shapes": json.dumps(shapes, sort_keys=True),
    }


def _strip_forbidden_config(path: Path) -> None:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    if any(k in config for k in FORBIDDEN_CONFIG_KEYS):
        for key in FORBIDDEN_CONFIG_KEYS:
            config.pop(key, None)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def next_manifest(manifest_in: dict[str, Any], step: StepRecord) -> dict[str, Any]:
    """The input's manifest with `step` appended to its history, and without the fields
    that describe the input's masks/adapters (the writer sets them for the output)."""
    manifest = {k: v for k, v in manifest_in.items() if k not in ("sparsity", "masks_sha256", "pattern", "adapters")}
    manifest["format_version"] = FORMAT_VERSION
    manifest.setdefault("source_model", step.input)
    manifest["history"] = list(manifest_in.get("history", [])) + [step.finish()]
    return manifest


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
    """Write a checkpoint atomically and return its manifest.

    Before the rename, the invariants are verified on the model being written: masked
    weights exactly zero, N:M groups valid, all weights finite. A violation aborts the
    write and leaves nothing behind.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_finite(model, "refusing to write")
    if masks is not None:
        problems = mask_problems(model, masks)
        if problems:
            raise CheckpointError(f"refusing to write: {problems[0]}")
    if adapters is not None:
        for name, t in adapters.items():
            if not torch.isfinite(t).all():
                raise NumericalError(f"refusing to write: adapter tensor {name} contains NaN or inf")

    manifest = next_manifest(manifest_in, step)

    try:
        with staging(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            _strip_forbidden_config(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if masks is not None:
                manifest["masks_sha256"] = write_masks(tmp, masks)
                manifest["pattern"] = str(masks.pattern)
                manifest["sparsity"] = {
                    "total": round(masks.total_sparsity(), 6),
                    "per_tensor": {n: round(s, 6) for n, s in masks.sparsity().items()},
                }
            if adapters is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(tmp / ADAPTERS_NAME))
                (tmp / ADAPTERS_CONFIG_NAME).write_text(json.dumps(adapters_config or {}, indent=2) + "\n")
                manifest["adapters"] = {"sha256": sha256_file(tmp / ADAPTERS_NAME), **(adapters_config or {})}
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
            _verify_written(tmp, masks)
    except OSError as exc:
        raise CheckpointError(_write_failure(out, exc)) from exc
    return manifest


def _write_failure(out: str | Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"out of disk space while writing {out}; nothing was written (free space and rerun)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {out}: {exc.strerror}; nothing was written"
    return f"writing {out} failed: {exc.strerror or exc}; nothing was written"


def _verify_written(path: Path, masks: MaskSet | None) -> None:
    """Re-read what was written: masks round-trip and the manifest hash agrees."""
    manifest = read_manifest(path)
    if masks is not None:
        again = read_masks(path, manifest)
        if again is None or set(again.masks) != set(masks.masks):
            raise CheckpointError("written masks do not read back identically")
        for name, keep in masks.masks.items():
            if not torch.equal(again.masks[name], keep.cpu().bool()):
                raise CheckpointError(f"written mask {name} does not read back identically")


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
    target = path / MANIFEST_NAME
    tmp = path / f".{MANIFEST_NAME}{TMP_MARKER}{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointError(f"cannot record the evaluation in {target}: {exc.strerror or exc}") from exc
    return manifest
