"""`perp_cli.plotting` and `perp eval --plot`: real PNGs, early usage errors, and a one-line
error naming the extra when matplotlib is missing."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from conftest import run_cli, save_tiny
from perp_cli import plotting


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (an independent check that a real PNG was written)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _rows() -> list[dict]:
    rows = []
    for method, base in (("magnitude", 150.0), ("wanda", 160.0)):
        for i, setting in enumerate(("50%", "70%", "2:4")):
            for recovery, factor, share in (("none", 1.0, 0.0), ("biases+norms", 0.9, 0.003), ("masklora", 0.85, 0.07)):
                rows.append({"method": method, "setting": setting, "recovery": recovery,
                             "perplexity": base * (1 + i) * factor, "trainable_share": share})
    return rows


def test_study_plots_are_small_pngs(tmp_path: Path) -> None:
    a = plotting.sparsity_curves(_rows(), tmp_path / "curves.png", title="t", dense=137.4,
                                 settings=["50%", "70%", "2:4"], recoveries=["none", "biases+norms", "masklora"])
    b = plotting.share_scatter(_rows(), tmp_path / "share.png", dense=137.4)
    for path, panels in ((a, 2), (b, 3)):
        width, height = _png_size(path)
        assert path.stat().st_size < 200_000
        assert width > height and width >= 300 * panels  # one panel per method / per setting


def test_eval_bars_values_and_missing_results(tmp_path: Path) -> None:
    results = [
        {"model": "/runs/dense", "sparsity": 0.0, "perplexity": {"wiki": {"ppl": 137.4}}, "zeroshot": None},
        {"model": "/other/pruned", "sparsity": 0.5, "perplexity": {"wiki": {"ppl": 144.8}, "c4": {"ppl": 111.3}}, "zeroshot": None},
    ]
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep text as text, to read it back
        path = plotting.eval_bars(results, tmp_path / "bars.svg")
    svg = path.read_text()
    # every value is written on its bar; the dense model has no c4 number
    for text in ("137.4", "144.8", "111.3", "50.0", "n/a", "dense", "pruned"):
        assert text in svg


def test_missing_matplotlib_is_one_clear_error(monkeypatch, tmp_path: Path) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plotting.MissingMatplotlib, match=r"pip install 'perp\[plot\]'") as info:
        plotting.eval_bars([], tmp_path / "x.png")
    assert info.value.exit_code == 1 and "\n" not in str(info.value)


@pytest.fixture
def two_checkpoints(tmp_path: Path, calib_file: Path) -> tuple[Path, Path]:
    dense = save_tiny(tmp_path / "dense", "opt")
    pruned = tmp_path / "mag50"
    result = run_cli("prune", dense, "-o", pruned, "--method", "magnitude", "--sparsity", "0.5", "--quiet")
    assert result.exit_code == 0, result.stderr
    return dense, pruned


def test_eval_plot_end_to_end(two_checkpoints, calib_file: Path, tmp_path: Path) -> None:
    dense, pruned = two_checkpoints
    plot = tmp_path / "cmp.png"
    result = run_cli("eval", dense, pruned, "-d", calib_file, "--seqlen", "32", "--max-windows", "4", "--plot", plot, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    width, height = _png_size(plot)
    assert width > height and plot.stat().st_size < 200_000
    assert [r["model"] for r in result.json()["results"]] == [str(dense), str(pruned)]


def test_eval_plot_bad_paths_fail_before_loading(two_checkpoints, calib_file: Path, tmp_path: Path, monkeypatch) -> None:
    dense, pruned = two_checkpoints
    for bad, message in (
        (tmp_path / "cmp.jpg", "give a file ending in .png"),
        (tmp_path / "nowhere" / "cmp.png", "does not exist"),
        (pruned / "cmp.png", "inside the checkpoint"),
        (tmp_path, "is a directory"),
    ):
        result = run_cli("eval", dense, pruned, "-d", calib_file, "--plot", bad)
        assert result.exit_code == 2, (bad, result.stderr)
        assert message in result.stderr and "--plot" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("cmp.*"))

    # without matplotlib: exit 1 with the install hint, before any model is loaded
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = run_cli("eval", dense, "-d", calib_file, "--plot", tmp_path / "x.png")
    assert result.exit_code == 1 and "pip install 'perp[plot]'" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_baseline_deltas_one_bar_per_row_and_recovery(tmp_path: Path) -> None:
    entries = [{"label": f"owl-wanda {s} vs wanda", "recovery": r, "delta": d}
               for s, r, d in (("60%", "none", -2.5), ("60%", "masklora", 0.75), ("70%", "none", -11.0))]
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        path = plotting.baseline_deltas(entries, tmp_path / "deltas.svg", title="t", recoveries=["none", "masklora"])
    svg = path.read_text()
    for text in ("owl-wanda 60% vs wanda", "owl-wanda 70% vs wanda", "none", "masklora", "negative = better"):
        assert text in svg
    assert svg.count("<path") > 3  # three bars, an axis, a zero line
