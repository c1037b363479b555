"""Plots of evaluation results: `perp eval --plot` and the study in `bench/reproduce.py`.

matplotlib is optional (`pip install 'perp[plot]'`) and imported only when a plot is
drawn. Figures are built with `matplotlib.figure.Figure` (no pyplot), so nothing touches
global state or needs a display, and a PNG of the sizes used here stays well under
200 KB.

Rows for the study plots are plain dicts with the keys `method`, `setting` (a label such
as "50%" or "2:4"), `recovery`, `perplexity` and `trainable_share` (a fraction, 0 for no
training): the columns of `results.csv`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perp_cli.errors import PerpError, UsageError

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
INSTALL_HINT = "pip install 'perp[plot]'"


class MissingMatplotlib(PerpError):
    """The `plot` extra is not installed (a runtime failure, exit 1, like a missing lm-eval)."""

    exit_code = 1


def require_matplotlib() -> Any:
    """`matplotlib.figure.Figure`, or a one-line error saying how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingMatplotlib(f"plots need matplotlib, which is not installed ({exc}); run: {INSTALL_HINT}") from exc
    return Figure


def check_plot_path(path: str | Path) -> Path:
    """Validate a plot destination before any work: a known image suffix, an existing
    directory, matplotlib importable. Usage errors exit 2; a missing extra exits 1."""
    target = Path(path).expanduser()
    if target.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {path}: give a file ending in {', '.join(PLOT_SUFFIXES)}")
    if target.is_dir():
        raise UsageError(f"--plot {path} is a directory; give a file name")
    if not target.resolve().parent.is_dir():
        raise UsageError(f"--plot {path}: directory {target.resolve().parent} does not exist")
    require_matplotlib()
    return target


def _labels(models: list[str]) -> list[str]:
    """Short names for bars: a directory's name, its full path when two names clash."""
    names = [Path(m).name or m for m in models]
    return [n if names.count(n) == 1 else m for n, m in zip(names, models)]


def _save(fig: Any, path: str | Path) -> Path:
    target = Path(path).expanduser()
    fig.savefig(target, dpi=100)
    return target


def eval_bars(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Bar chart of `perp eval` results: perplexity per checkpoint (one panel per
    dataset), sparsity per checkpoint, and mean zero-shot accuracy when tasks ran."""
    Figure = require_matplotlib()
    labels = _labels([r["model"] for r in results])
    datasets = list(dict.fromkeys(d for r in results for d in r["perplexity"]))
    has_acc = any(r.get("zeroshot") and r["zeroshot"].get("mean_acc") is not None for r in results)
    panels: list[tuple[str, list[float | None], str]] = [
        (f"perplexity · {d}", [r["perplexity"][d]["ppl"] if d in r["perplexity"] else None for r in results], "{:.1f}")
        for d in datasets
    ]
    panels.append(("sparsity (%)", [100 * r["sparsity"] for r in results], "{:.1f}"))
    if has_acc:
        panels.append(("mean zero-shot acc", [(r.get("zeroshot") or {}).get("mean_acc") for r in results], "{:.3f}"))

    width = max(3.2, 0.55 * len(results) + 1.6)
    fig = Figure(figsize=(width * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(results))]
    for ax, (title, values, fmt) in zip(axes, panels):
        xs = list(range(len(results)))
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, color=colors)
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(xs, labels, rotation=30 if len(results) > 2 else 0, ha="right" if len(results) > 2 else "center", fontsize=8)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _order(values: list[str], preferred: list[str] | None) -> list[str]:
    seen = list(dict.fromkeys(values))
    if not preferred:
        return seen
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _style(recoveries: list[str]) -> dict[str, dict[str, Any]]:
    markers = "os^vDP*Xh<>"
    return {r: {"color": f"C{i % 10}", "marker": markers[i % len(markers)]} for i, r in enumerate(recoveries)}


def _perplexity_axis(ax: Any, values: list[float]) -> None:
    """Log scale only when the values span more than 3x (collapsed models next to good
    ones); plain numbers on the ticks either way."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    if values and max(values) / max(min(values), 1e-9) > 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def sparsity_curves(
    rows: list[dict[str, Any]],
    path: str | Path,
    title: str = "",
    dense: float | None = None,
    methods: list[str] | None = None,
    settings: list[str] | None = None,
    recoveries: list[str] | None = None,
) -> Path:
    """Perplexity against sparsity, one line per recovery, one panel per pruning method
    (PERP's Figure 1 layout). Settings are categorical (unstructured levels, then N:M);
    the dense model is a dashed line. Log-scale y when high-sparsity failures span decades."""
    Figure = require_matplotlib()
    rows = [r for r in rows if r.get("perplexity") is not None]
    methods = _order([r["method"] for r in rows], methods)
    settings = _order([r["setting"] for r in rows], settings)
    recoveries = _order([r["recovery"] for r in rows], recoveries)
    style = _style(recoveries)
    fig = Figure(figsize=(4.2 * max(len(methods), 1), 3.9), layout="constrained")
    axes = fig.subplots(1, max(len(methods), 1), squeeze=False, sharey=True)[0]
    for ax, method in zip(axes, methods):
        for recovery in recoveries:
            points = {r["setting"]: r["perplexity"] for r in rows if r["method"] == method and r["recovery"] == recovery}
            # unstructured levels form a line; N:M patterns are separate points, not a continuation
            lines = [i for i, s in enumerate(settings) if s in points and ":" not in s]
            dots = [i for i, s in enumerate(settings) if s in points and ":" in s]
            if lines:
                ax.plot(lines, [points[settings[i]] for i in lines], label=recovery, linewidth=1.4, markersize=5, **style[recovery])
            if dots:
                ax.plot(dots, [points[settings[i]] for i in dots], linestyle="", markersize=6,
                        label=None if lines else recovery, **style[recovery])
        if dense is not None:
            ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense model")
        first_nm = next((i for i, s in enumerate(settings) if ":" in s), None)
        if first_nm:
            ax.axvline(first_nm - 0.5, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(method, fontsize=11)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    _perplexity_axis(axes[0], [r["perplexity"] for r in rows] + ([dense] if dense else []))
    axes[0].set_ylabel("WikiText-2 perplexity")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def share_scatter(
    rows: list[dict[str, Any]],
    path: str | Path,
    title: str = "",
    dense: float | None = None,
    settings: list[str] | None = None,
    methods: list[str] | None = None,
    recoveries: list[str] | None = None,
) -> Path:
    """Perplexity against the share of trainable parameters, one panel per sparsity
    setting (three to a row), colour = recovery, marker = pruning method. No training
    (share 0) sits at the left edge, on a tick labelled 0, since a log axis has no zero.
    Recoveries with (nearly) the same share, such as MaskLoRA and ScaleLoRA, are spread
    slightly sideways so that neither hides the other."""
    import math

    Figure = require_matplotlib()
    rows = [r for r in rows if r.get("perplexity") is not None]
    settings = _order([r["setting"] for r in rows], settings)
    methods = _order([r["method"] for r in rows], methods)
    recoveries = _order([r["recovery"] for r in rows], recoveries)
    colors = _style(recoveries)
    markers = {m: "os^Dv"[i % 5] for i, m in enumerate(methods)}
    shares = [float(r["trainable_share"] or 0) for r in rows if float(r["trainable_share"] or 0) > 0]
    floor = min(shares) / 10 if shares else 1e-5

    def x_of(share: float) -> float:
        return max(share, floor)

    # recoveries whose shares round to the same tenth of a decade share a slot, spread around it
    slots: dict[float, list[str]] = {}
    for r in recoveries:
        mine = [x_of(float(x["trainable_share"] or 0)) for x in rows if x["recovery"] == r]
        if mine:
            slots.setdefault(round(math.log10(sum(mine) / len(mine)), 1), []).append(r)
    offset = {r: 10 ** (0.09 * (i - (len(group) - 1) / 2)) for group in slots.values() for i, r in enumerate(group)}

    cols = min(3, max(len(settings), 1))
    nrows = math.ceil(max(len(settings), 1) / cols)
    fig = Figure(figsize=(3.7 * cols + 1.3, 3.1 * nrows + 0.4), layout="constrained")
    grid = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(settings):]:
        ax.set_visible(False)
    for ax, setting in zip(axes, settings):
        for r in rows:
            if r["setting"] != setting:
                continue
            ax.scatter(x_of(float(r["trainable_share"] or 0)) * offset[r["recovery"]], r["perplexity"],
                       color=colors[r["recovery"]]["color"], marker=markers[r["method"]], s=28, edgecolors="black", linewidths=0.4)
        if dense is not None:
            ax.axhline(dense, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ticks = [floor] + [t for t in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) if t > floor * 3]
        ax.set_xticks(ticks, ["0"] + [f"{t:.0%}" if t >= 0.01 else f"{t:.2%}" for t in ticks[1:]])
        ax.set_xlim(floor / 2.5, 2.5)
        ax.set_xlabel("trainable parameters (share)", fontsize=9)
        ax.set_title(setting, fontsize=11)
        ax.grid(alpha=0.3, which="major")
    _perplexity_axis(axes[0], [r["perplexity"] for r in rows] + ([dense] if dense else []))
    for row in grid:
        row[0].set_ylabel("WikiText-2 perplexity")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker="o", color=colors[r]["color"], label=r) for r in recoveries]
    handles += [Line2D([], [], linestyle="", marker=markers[m], color="gray", label=m) for m in methods]
    if dense is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", label="dense model"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def baseline_deltas(
    entries: list[dict[str, Any]],
    path: str | Path,
    title: str = "",
    recoveries: list[str] | None = None,
) -> Path:
    """Horizontal bars: each row's perplexity minus its baseline's (negative: the method
    helps), one bar per recovery. `entries`: dicts with `label` (row, e.g. "owl-wanda 70%
    vs wanda"), `recovery` and `delta`."""
    Figure = require_matplotlib()
    labels = _order([e["label"] for e in entries], None)
    recoveries = _order([e["recovery"] for e in entries], recoveries)
    style = _style(recoveries)
    height = 0.8 / max(len(recoveries), 1)
    fig = Figure(figsize=(7.5, 1.2 + 0.32 * len(labels) * max(len(recoveries), 1) ** 0.5), layout="constrained")
    ax = fig.subplots()
    for j, recovery in enumerate(recoveries):
        values = {e["label"]: e["delta"] for e in entries if e["recovery"] == recovery}
        ys = [i + (j - (len(recoveries) - 1) / 2) * height for i, lab in enumerate(labels) if lab in values]
        ax.barh(ys, [values[lab] for lab in labels if lab in values], height=height, color=style[recovery]["color"], label=recovery)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity minus the baseline's (negative = better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
