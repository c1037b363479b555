"""The memory this process may use, read from a fake /proc + cgroup tree (never by
constraining the machine the tests run on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from perp_cli import memory, streaming
from perp_cli.errors import MemoryLimitError

GIB = 2**30


def fake_tree(root: Path, available: int, cgroup: str = "0::/\n", files: dict[str, str] | None = None) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemTotal: 999999999 kB\nMemAvailable: {available // 1024} kB\n")
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/self/status").write_text("VmSize:\t1048576 kB\nVmData:\t524288 kB\n")
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_meminfo_alone(tmp_path: Path) -> None:
    limit = memory.process_limit(fake_tree(tmp_path, 64 * GIB))
    assert limit == 64 * GIB and limit.source == "MemAvailable"


def test_cgroup_v2_limit_below_host_memory_decides(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, 1000 * GIB, "0::/kubepods/pod1\n", {
        "sys/fs/cgroup/cgroup.controllers": "memory\n",
        "sys/fs/cgroup/kubepods/pod1/memory.max": f"{32 * GIB}\n",
        "sys/fs/cgroup/kubepods/pod1/memory.current": f"{2 * GIB}\n",
    })
    limit = memory.process_limit(root)
    assert limit == 30 * GIB and limit.source == "cgroup v2 memory.max"


def test_cgroup_v2_parent_limit_and_unlimited_leaf(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, 1000 * GIB, "0::/slurm/job7/step0\n", {
        "sys/fs/cgroup/cgroup.controllers": "memory\n",
        "sys/fs/cgroup/slurm/job7/step0/memory.max": "max\n",
        "sys/fs/cgroup/slurm/job7/step0/memory.current": f"{GIB}\n",
        "sys/fs/cgroup/slurm/job7/memory.max": f"{16 * GIB}\n",
        "sys/fs/cgroup/slurm/job7/memory.current": f"{4 * GIB}\n",
    })
    assert memory.process_limit(root) == 12 * GIB


def test_cgroup_v2_namespace_path_not_mounted_uses_the_mount(tmp_path: Path) -> None:
    # inside a container /proc/self/cgroup may name the host's path; the mount is ours
    root = fake_tree(tmp_path, 1000 * GIB, "0::/system.slice/docker-abc.scope\n", {
        "sys/fs/cgroup/cgroup.controllers": "memory\n",
        "sys/fs/cgroup/memory.max": f"{8 * GIB}\n",
        "sys/fs/cgroup/memory.current": f"{GIB}\n",
    })
    assert memory.process_limit(root) == 7 * GIB


def test_cgroup_v1_limit_and_unlimited_value(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, 500 * GIB, "4:memory:/docker/abc\n", {
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{10 * GIB}\n",
        "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": f"{3 * GIB}\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
    })
    limit = memory.process_limit(root)
    assert limit == 7 * GIB and limit.source == "cgroup v1 memory.limit_in_bytes"


def test_rlimit_as_minus_current_size(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, 500 * GIB)
    limit = memory.process_limit(root, rlimits={"RLIMIT_AS": 5 * GIB})
    assert limit == 4 * GIB and limit.source == "RLIMIT_AS"  # VmSize is 1 GiB
    assert memory.process_limit(root, rlimits={"RLIMIT_DATA": GIB}).source == "RLIMIT_DATA"


def test_unreadable_files_are_ignored(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, 4 * GIB, "0::/x\n", {"sys/fs/cgroup/x/memory.max": "garbage\n",
                                                   "sys/fs/cgroup/x/memory.current": "\n"})
    assert memory.process_limit(root).source == "MemAvailable"
    assert memory.process_limit(tmp_path / "nothing-here") is None


def test_require_names_the_limit(tmp_path: Path) -> None:
    limit = memory.MemoryLimit(GIB, "cgroup v2 memory.max")
    memory.require(GIB // 2, "loading x", limit=limit)
    with pytest.raises(MemoryLimitError, match=r"needs about 2.00 GiB.*1.00 GiB \(cgroup v2 memory.max\)"):
        memory.require(2 * GIB, "loading x", limit=limit)


def test_streaming_auto_honours_a_cgroup_limit(tmp_path: Path, tiny_dir: Path, monkeypatch) -> None:
    size = streaming.weights_bytes(tiny_dir, "auto")
    big = fake_tree(tmp_path / "big", 1000 * GIB)
    monkeypatch.setenv(memory.ROOT_ENV, str(big))
    assert not streaming.decide("auto", tiny_dir).stream
    small = fake_tree(tmp_path / "small", 1000 * GIB, "0::/pod\n", {
        "sys/fs/cgroup/cgroup.controllers": "memory\n",
        "sys/fs/cgroup/pod/memory.max": str(size),
        "sys/fs/cgroup/pod/memory.current": "0",
    })
    monkeypatch.setenv(memory.ROOT_ENV, str(small))
    decision = streaming.decide("auto", tiny_dir)
    assert decision.stream and "cgroup v2 memory.max" in decision.reason
