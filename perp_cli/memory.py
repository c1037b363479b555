"""How much memory this process may still use: the one reader every memory decision
goes through (`--streaming auto`, the preflight of every load and step).

`/proc/meminfo`'s MemAvailable is the *host's* memory. In a container (Docker,
Kubernetes, Slurm with cgroups) the kernel kills the process long before that is used,
so the limit is the smallest of:

* MemAvailable (`/proc/meminfo`),
* cgroup v2: `memory.max - memory.current` of this process's cgroup and of each of its
  ancestors (a pod's limit may sit one level up),
* cgroup v1: `memory.limit_in_bytes - memory.usage_in_bytes` of the memory controller,
* `RLIMIT_AS` / `RLIMIT_DATA` minus the current virtual / data size, when set.

The answer says which of these decided (`MemoryLimit.source`). Tests point the reader at
a fake tree (`root=`, or the `PERP_MEMORY_ROOT` environment variable) holding
`proc/meminfo`, `proc/self/cgroup`, `proc/self/status` and `sys/fs/cgroup/...`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
from pathlib import Path

from perp_cli.errors import MemoryLimitError

ROOT_ENV = "PERP_MEMORY_ROOT"
UNLIMITED = 1 << 60  # cgroup v1 writes ~2^63 for "no limit"


class MemoryLimit(int):
    """Bytes this process may still allocate (an int), and which limit said so."""

    source: str

    def __new__(cls, value: int, source: str) -> MemoryLimit:
        obj = super().__new__(cls, max(int(value), 0))
        obj.source = source
        return obj

    def describe(self) -> str:
        return f"{self / 2**30:.2f} GiB ({self.source})"


def _read(path: Path) -> str | None:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text()
    return None


def _int(text: str | None) -> int | None:
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return int(str(text).split()[0])
    return None


def _meminfo(root: Path) -> MemoryLimit | None:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            value = _int(line.split(":", 1)[1])
            if value is not None:
                return MemoryLimit(value * 1024, "MemAvailable")
    if root == Path("/"):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return MemoryLimit(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages")
    return None


def _cgroup_paths(root: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and cgroup v1 memory-controller path."""
    v2 = v1 = None
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _ancestors(base: Path, relative: str) -> list[Path]:
    """`base/relative` and each directory above it up to `base` (those that exist).
    Inside a container the path often names the host's hierarchy, which is not mounted:
    then the mount point itself is the container's cgroup."""
    here = base / relative.strip("/")
    dirs = []
    while True:
        if here.is_dir():
            dirs.append(here)
        if here == base or base not in here.parents:
            break
        here = here.parent
    return dirs or ([base] if base.is_dir() else [])


def _cgroup(dirs: list[Path], limit_file: str, used_file: str, source: str) -> MemoryLimit | None:
    """The least memory left under the limits of the cgroups `dirs` (a limit of `max`,
    none, or ~2^63 is no limit)."""
    left = []
    for d in dirs:
        limit, used = _int(_read(d / limit_file)), _int(_read(d / used_file))
        if limit is not None and limit < UNLIMITED:
            left.append(MemoryLimit(limit - (used or 0), source))
    return min(left, default=None)


def _rlimits(root: Path, rlimits: dict[str, int] | None) -> list[MemoryLimit]:
    if rlimits is None:
        rlimits = {}
        for name in ("RLIMIT_AS", "RLIMIT_DATA"):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                soft = resource.getrlimit(getattr(resource, name))[0]
                if soft != resource.RLIM_INFINITY:
                    rlimits[name] = soft
    status = {}
    for line in (_read(root / "proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        status[key] = _int(value)
    used_by = {"RLIMIT_AS": "VmSize", "RLIMIT_DATA": "VmData"}
    out = []
    for name, soft in rlimits.items():
        if soft is None or soft < 0:
            continue
        used = (status.get(used_by[name]) or 0) * 1024
        out.append(MemoryLimit(soft - used, name))
    return out


def process_limit(root: str | Path | None = None, rlimits: dict[str, int] | None = None) -> MemoryLimit | None:
    """The bytes this process may still allocate, or None where nothing can be read.

    `root`: where `proc/` and `sys/` are (default: $PERP_MEMORY_ROOT, else `/`);
    `rlimits`: {"RLIMIT_AS": bytes, ...} instead of this process's own (tests)."""
    base = Path(root if root is not None else os.environ.get(ROOT_ENV) or "/")
    v2, v1 = _cgroup_paths(base)
    candidates = [_meminfo(base)]
    if v2 is not None:
        cgroups = base / "sys/fs/cgroup"
        if not (cgroups / "cgroup.controllers").is_file() and (cgroups / "unified").is_dir():
            cgroups = cgroups / "unified"  # hybrid hierarchy: v1 controllers, v2 mounted beside them
        candidates.append(_cgroup(_ancestors(cgroups, v2), "memory.max", "memory.current", "cgroup v2 memory.max"))
    if v1 is not None:
        dirs = _ancestors(base / "sys/fs/cgroup/memory", v1)
        candidates.append(_cgroup(dirs, "memory.limit_in_bytes", "memory.usage_in_bytes", "cgroup v1 memory.limit_in_bytes"))
    if root is None and not os.environ.get(ROOT_ENV) or rlimits is not None:
        candidates.extend(_rlimits(base, rlimits))
    found = [c for c in candidates if c is not None]
    return min(found) if found else None


def require(needed: int, what: str, hint: str = "", limit: MemoryLimit | None = None) -> None:
    """Fail with one line, before anything is allocated, when `what` needs more than the
    process may use (`limit`, default `process_limit()`; unknown limits pass)."""
    limit = process_limit() if limit is None else limit
    if limit is None or needed <= limit:
        return
    raise MemoryLimitError(
        f"{what} needs about {needed / 2**30:.2f} GiB, but this process may use only {limit.describe()}; "
        f"nothing was started{f' ({hint})' if hint else ''}"
    )


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of `threshold` bytes and more with mmap, so freeing
    them returns the memory to the OS at once.

    A step allocates and frees block-sized tensors (weights, scores, masks, micro-batch
    temporaries) over and over, streamed or in memory. glibc's default threshold adapts
    upward to the sizes it sees freed, after which such tensors come from the heap, which
    fragments and never shrinks: on a 1.1B model the streamed RSS crept up by ~40 MB per
    block and doubled the peak. Call it before any large allocation
    (`checkpoint.open` does, in either residency, before building the model):
    chunks carved out under the old threshold stay in the heap.
    Process-wide and permanent (there is no way to read the old setting back); a no-op
    where the C library has no `mallopt` (macOS; musl ignores it).
    """
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    return False
