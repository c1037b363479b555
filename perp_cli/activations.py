"""Where the calibration activations live: on the compute device, on the host, or on disk.

Block-by-block calibration keeps every calibration window's hidden states between two
blocks: 128 windows of 2048 tokens of a 4096-wide model are 4 GiB in float32, more than
one block of weights, and reconstruction keeps two or three such copies (inputs, dense
targets, outputs). Wherever they do not fit, they go one level down:

* on the device while `device_budget` bytes last (`--max-memory`; no limit by default);
* then on the host (`--offload-activations` is a budget of 0), or, with `offload_dir`
  (`--offload-dir`), in files there, one file per micro-batch, read back one micro-batch
  at a time. On a CPU-only machine the host *is* the device, so disk is the only level
  that saves memory there.

The budget is shared by every store of one run (`ActivationStore.empty_like` shares it)
and counts live bytes: replacing or dropping a micro-batch gives its bytes back. Files
are deleted when their micro-batch is replaced or its store is garbage-collected; the
run's directory (`perp-activations-<pid>-...`) when the last store goes. A directory left
by a killed process is removed by the next run that offloads to the same place.

The numbers never change with placement: a micro-batch read back from the host or disk
is bit-identical to the one stored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from perp_cli.checkpoint import pid_alive
from perp_cli.errors import PerpError, UsageError

SPILL_PREFIX = "perp-activations-"


@dataclass(frozen=True)
class Placement:
    """Where one run keeps its activations: `device` (the compute device), at most
    `device_budget` bytes there (None: no limit), the rest on the host or, with
    `offload_dir`, in files."""

    device: torch.device
    device_budget: int | None = None
    offload_dir: Path | None = None

    @classmethod
    def of(cls, device: torch.device | str, offload: "bool | Placement" = False) -> "Placement":
        """The engine's `offload` argument as a placement: True keeps everything on the
        host (the old `--offload-activations`), a `Placement` is taken as given."""
        if isinstance(offload, Placement):
            return offload
        return cls(torch.device(device), 0 if offload else None)

    @property
    def ineffective(self) -> bool:
        """A device cap with nowhere else to go: on the CPU the host is the device, so
        without `offload_dir` every activation stays in the same memory. Allowed (a GPU
        job's command line still runs on a CPU box), and reported."""
        return self.device.type == "cpu" and self.device_budget is not None and self.offload_dir is None

    def describe(self) -> str:
        budget = "no limit" if self.device_budget is None else _size(self.device_budget)
        rest = f"files in {self.offload_dir}" if self.offload_dir else "host memory"
        return f"activations on {self.device} ({budget}), the rest in {rest}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def placement_for(
    device: torch.device,
    offload_activations: bool = False,
    max_memory: str | int | None = None,
    offload_dir: str | Path | None = None,
) -> Placement:
    """The placement the command-line options ask for (`--offload-activations`,
    `--max-memory`, `--offload-dir`), or a UsageError that says what to change."""
    from perp_cli.shards import parse_size  # sizes are spelled as for --max-shard-size

    budget = None if max_memory is None else parse_size(max_memory, option="--max-memory", minimum=0)
    if offload_activations and budget is not None:
        raise UsageError("--offload-activations keeps no activations on the device, --max-memory keeps some: give one of them")
    if offload_activations:
        budget = 0
    where = None
    if offload_dir is not None:
        where = Path(offload_dir).expanduser()
        if where.exists() and not where.is_dir():
            raise UsageError(f"--offload-dir {offload_dir} exists and is not a directory")
        if budget is None:
            budget = 0  # asked for disk, and no device share: everything goes there
    return Placement(device, budget, where)


def check_offload_dir(offload_dir: str | Path | None, output: str | Path, inputs: list[str | Path]) -> None:
    """--offload-dir may not be inside the output (which must not exist until the step
    succeeds) nor inside an input (inputs are never written to)."""
    if offload_dir is None:
        return
    where = Path(offload_dir).expanduser().resolve()
    for kind, path in [("output", output)] + [("input", i) for i in inputs]:
        path = Path(path).expanduser().resolve()
        if where == path or path in where.parents:
            raise UsageError(f"--offload-dir {offload_dir} is inside the {kind} {path}; choose a scratch directory elsewhere")


class _Ledger:
    """State shared by all stores of a run: device bytes in use, and the spill directory."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.device_bytes = 0
        self.peak_device_bytes = 0
        self._dir: Path | None = None
        self._counter = 0

    def take(self, nbytes: int) -> bool:
        """Reserve `nbytes` on the device if the budget allows."""
        budget = self.placement.device_budget
        if budget is not None and self.device_bytes + nbytes > budget:
            return False
        self.device_bytes += nbytes
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        return True

    def give_back(self, nbytes: int) -> None:
        self.device_bytes -= nbytes

    def new_file(self) -> Path:
        if self._dir is None:
            root = Path(self.placement.offload_dir).expanduser()
            root.mkdir(parents=True, exist_ok=True)
            clean_stale_spills(root)
            self._dir = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=root))
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._counter += 1
        return self._dir / f"{self._counter:08d}.bin"


def clean_stale_spills(root: Path) -> list[Path]:
    """Remove activation directories under `root` whose process is gone (SIGKILL)."""
    removed = []
    for candidate in root.glob(f"{SPILL_PREFIX}*"):
        try:
            pid = int(candidate.name[len(SPILL_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@dataclass
class _OnDisk:
    path: Path
    shape: torch.Size
    dtype: torch.dtype


def _write(path: Path, t: torch.Tensor) -> None:
    data = t.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    try:
        with open(path, "wb") as f:
            f.write(memoryview(data))
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise PerpError(f"cannot offload activations to {path.parent.parent}: {exc.strerror or exc}; free space there or choose another --offload-dir") from exc


def _read(item: _OnDisk) -> torch.Tensor:
    return torch.from_file(str(item.path), shared=False, size=item.shape.numel(), dtype=item.dtype).view(item.shape)


def _release(ledger: _Ledger, item: object) -> None:
    if isinstance(item, _OnDisk):
        item.path.unlink(missing_ok=True)
    elif isinstance(item, torch.Tensor) and item.device == ledger.placement.device:
        ledger.give_back(item.numel() * item.element_size())


def _release_all(ledger: _Ledger, items: list) -> None:
    for item in items:
        _release(ledger, item)
    items.clear()


class ActivationStore:
    """A sequence of micro-batches `[b, seqlen, hidden]`, each placed by the run's
    `Placement`. `store[k]` is micro-batch k as a tensor (read back from disk if it went
    there; move it to the device yourself); `store[k] = t` replaces it in place."""

    def __init__(self, placement: Placement, ledger: _Ledger | None = None) -> None:
        self.placement = placement
        self._ledger = ledger if ledger is not None else _Ledger(placement)
        self._items: list[torch.Tensor | _OnDisk] = []
        weakref.finalize(self, _release_all, self._ledger, self._items)

    @classmethod
    def of(cls, tensors: "list[torch.Tensor] | ActivationStore", like: "ActivationStore") -> "ActivationStore":
        """`tensors` as a store of the same run as `like` (a store is returned as is)."""
        if isinstance(tensors, ActivationStore):
            return tensors
        out = like.empty_like()
        for t in tensors:
            out.append(t)
        return out

    def empty_like(self) -> "ActivationStore":
        """A new, empty store of the same run (same placement, shared budget and directory)."""
        return ActivationStore(self.placement, self._ledger)

    def _place(self, t: torch.Tensor) -> torch.Tensor | _OnDisk:
        t = t.detach()
        device = self.placement.device
        if self._ledger.take(t.numel() * t.element_size()):
            return t.to(device)
        if self.placement.offload_dir is not None:
            item = _OnDisk(self._ledger.new_file(), t.shape, t.dtype)
            _write(item.path, t)
            return item
        host = t.to("cpu")
        if host.device == device:  # the host is the device: count it after all
            self._ledger.device_bytes += t.numel() * t.element_size()
        return host

    def append(self, t: torch.Tensor) -> None:
        self._items.append(self._place(t))

    def __setitem__(self, k: int, t: torch.Tensor) -> None:
        _release(self._ledger, self._items[k])
        self._items[k] = self._place(t)

    def __getitem__(self, k: int) -> torch.Tensor:
        item = self._items[k]
        return _read(item) if isinstance(item, _OnDisk) else item

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for k in range(len(self._items)):
            yield self[k]

    def shape(self, k: int) -> torch.Size:
        """Micro-batch k's shape, without reading it back."""
        return self._items[k].shape

    def levels(self) -> dict[str, int]:
        """How many micro-batches sit on the device, on the host, on disk."""
        counts = {"device": 0, "host": 0, "disk": 0}
        for item in self._items:
            if isinstance(item, _OnDisk):
                counts["disk"] += 1
            else:
                counts["device" if item.device == self.placement.device else "host"] += 1
        return counts

    @property
    def peak_device_bytes(self) -> int:
        """The most activation bytes this run held on the device at once."""
        return self._ledger.peak_device_bytes
