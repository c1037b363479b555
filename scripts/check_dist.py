"""Check that the wheel and the sdist carry the embedded demo (model, tokenizer, texts, cards).

    python scripts/check_dist.py             # build both from the files git would commit, list what is missing
    python scripts/check_dist.py --run-demo  # also install the wheel into a throwaway venv and run `perp demo`

Builds with setuptools directly (no build isolation, no network) in a temporary copy of
the files git tracks or would track, so stale build/ output cannot hide a missing file and
the result is what a clean clone gives. Exit 1 when a file is missing or the demo fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_FILES = (
    "perp_cli/demo/README.md",
    "perp_cli/demo/corpus.txt",
    "perp_cli/demo/calibration.jsonl",
    "perp_cli/demo/heldout.jsonl",
    "perp_cli/demo/model/MODEL_CARD.md",
    "perp_cli/demo/model/config.json",
    "perp_cli/demo/model/generation_config.json",
    "perp_cli/demo/model/model.safetensors",
    "perp_cli/demo/model/tokenizer.json",
    "perp_cli/demo/model/tokenizer_config.json",
)


def project_copy(dest: Path) -> Path:
    """The files of a clean clone (tracked, or untracked and not ignored), copied to dest."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def build(src: Path, out: Path) -> tuple[Path, Path]:
    """sdist and wheel of the project in src, built by setuptools in a child process."""
    code = (
        "import sys; from setuptools import build_meta as b; out = sys.argv[1]; "  # setuptools rewrites sys.argv
        "print('BUILT', b.build_sdist(out)); print('BUILT', b.build_wheel(out))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"build failed:\n{done.stderr[-3000:]}")
    sdist_name, wheel_name = (line.split()[1] for line in done.stdout.splitlines() if line.startswith("BUILT "))
    return out / sdist_name, out / wheel_name


def missing(names: list[str], strip_prefix: bool) -> list[str]:
    present = {n.split("/", 1)[1] if strip_prefix else n for n in names if "/" in n}
    return [f for f in DEMO_FILES if f not in present]


def run_demo(wheel: Path, work: Path) -> None:
    """Install the wheel (no dependencies: they come from this interpreter) and run `perp demo` elsewhere."""
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # torch, transformers, ... from this interpreter's site-packages, after the venv's own; a plain
    # path in a .pth file does not run that directory's .pth files, so an editable perp there stays out
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    parent = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    Path(site_dir, "parent_site.pth").write_text("".join(p + "\n" for p in parent))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    perp = env_dir / "bin" / "perp"
    where = subprocess.run([str(python), "-c", "import perp_cli; print(perp_cli.__file__)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(env_dir)):
        sys.exit(f"perp_cli was imported from {where}, not from the installed wheel")
    done = subprocess.run([str(perp), "demo", "-o", "demo-out", "--quiet"], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    tail = "\n".join(done.stderr.splitlines()[-8:])
    print(tail)
    if done.returncode != 0:
        sys.exit(f"`perp demo` from the installed wheel exited with {done.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-demo", action="store_true", help="also install the wheel in a throwaway venv and run `perp demo`")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="perp-dist-") as tmp:
        work = Path(tmp)
        src = project_copy(work / "src")
        (work / "dist").mkdir()
        sdist, wheel = build(src, work / "dist")
        with zipfile.ZipFile(wheel) as zf:
            lost_wheel = missing(zf.namelist(), strip_prefix=False)
        with tarfile.open(sdist) as tf:
            lost_sdist = missing(tf.getnames(), strip_prefix=True)
        for kind, path, lost in (("wheel", wheel, lost_wheel), ("sdist", sdist, lost_sdist)):
            print(f"{kind} {path.name} ({path.stat().st_size / 1e6:.1f} MB): "
                  + ("all demo files present" if not lost else "MISSING " + ", ".join(lost)))
        if lost_wheel or lost_sdist:
            sys.exit(1)
        if args.run_demo:
            run_demo(wheel, work)


if __name__ == "__main__":
    main()
