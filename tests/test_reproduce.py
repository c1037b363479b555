"""`bench/reproduce.py`: the grid machinery on a tiny model (caching, resume, CSV shape).

The real study runs on ../shared checkpoints for an hour; here every step is a few
windows of a 2-block model, so the test checks the bookkeeping, not the numbers.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import save_tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "bench" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce", None)


def _grid(reproduce, tmp_path: Path, model: Path, corpus: Path, **overrides):
    budget = reproduce.Budget(seqlen=32, nsamples=4, steps=2, batch_size=2, rec_steps=2, rec_batch=2, windows=2, eval_seqlen=32)
    kwargs = dict(
        models=[model], calib=corpus, train_data=corpus, eval_data=corpus, work=tmp_path / "work", out=tmp_path / "out",
        methods=["magnitude", "wanda"], settings=["0.5"], recoveries=["none", "biases+norms", "masklora", "reconstruct"],
        budget=budget, command="test",
    )
    kwargs.update(overrides)
    return reproduce.Grid(**kwargs)


def test_grid_caches_resumes_and_writes_outputs(reproduce, tmp_path: Path, calib_file: Path) -> None:
    model = save_tiny(tmp_path / "tiny-opt-random", "opt")
    grid = _grid(reproduce, tmp_path, model, calib_file)

    runner = reproduce.Runner()
    rows, failures = reproduce.run_grid(grid, runner, quiet=True)
    assert failures == []
    verbs = [c[0] for c in runner.commands]
    assert verbs.count("prune") == 2  # one pruned checkpoint per (method, sparsity), reused by every recovery
    # 2 methods x (biases+norms, masklora) + the dense controls of both retraining recoveries
    assert verbs.count("retrain") == 4 + 2 and verbs.count("merge") == 2 + 1 and verbs.count("reconstruct") == 2
    assert verbs.count("eval") == 1 + 2 + 2 * 4  # dense, its controls, every cell
    # on the dense control, MaskLoRA (mask of ones) is plain LoRA, merged densely on purpose
    lora = [c for c in runner.commands if c[0] == "retrain" and "lora" in c]
    assert len(lora) == 1 and str(model) == lora[0][1]
    assert sum("--allow-densify" in c for c in runner.commands) == 1

    # rows: dense + its controls + methods x settings x recoveries, the gap arithmetic as defined
    assert len(rows) == 1 + 2 + 2 * 1 * 4
    dense = rows[0]
    assert dense["method"] == "dense" and dense["trainable_share"] == 0
    controls = {r["recovery"]: r for r in rows[1:3]}
    assert set(controls) == {"biases+norms", "masklora"} and all(r["method"] == "dense" for r in controls.values())
    by = {(r["method"], r["recovery"]): r for r in rows[3:]}
    assert by[("wanda", "biases+norms")]["dense_control_perplexity"] == controls["biases+norms"]["perplexity"]
    assert by[("wanda", "reconstruct")]["dense_control_perplexity"] is None
    none, bn = by[("magnitude", "none")], by[("magnitude", "biases+norms")]
    assert none["gap_closed"] == 0
    assert bn["gap_closed"] == pytest.approx((none["perplexity"] - bn["perplexity"]) / (none["perplexity"] - dense["perplexity"]))
    assert 0 < bn["trainable_share"] < by[("magnitude", "masklora")]["trainable_share"] < 1
    assert bn["train_tokens"] == 2 * 2 * 32
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in rows[3:]) and all(r["sparsity"] == 0 for r in rows[:3])
    assert not list((grid.work).rglob("recovered/*"))  # recovered checkpoints deleted after evaluation

    written = reproduce.write_outputs(rows, grid, failures)
    with (grid.out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == reproduce.CSV_COLUMNS and len(table) == len(rows)
    assert {p.suffix for p in written} == {".csv", ".md", ".png"}
    assert all(p.stat().st_size < 200_000 for p in written)
    md = (grid.out / "results.md").read_text()
    assert "| magnitude | 50% |" in md and "| dense (control) | 0% |" in md and "reconstruction" in md

    # a rerun runs nothing and gives the same rows
    again = reproduce.Runner()
    rows2, _ = reproduce.run_grid(grid, again, quiet=True)
    assert again.commands == [] and rows2 == rows

    # an interrupted cell (its JSON missing) is the only thing recomputed; the pruned model is reused
    cell = next((grid.work).rglob("cells/wanda-0.5-masklora-*.json"))
    cell.unlink()
    resume = reproduce.Runner()
    rows3, _ = reproduce.run_grid(grid, resume, quiet=True)
    assert [c[0] for c in resume.commands] == ["retrain", "merge", "eval"]
    assert json.loads(cell.read_text())["perplexity"] == by[("wanda", "masklora")]["perplexity"]  # seeded: bit-identical

    # a changed budget is a different cell (not a stale cache hit); unchanged pruning is reused
    more = _grid(reproduce, tmp_path, model, calib_file, recoveries=["none", "biases+norms"], methods=["magnitude"],
                 budget=reproduce.replace(grid.budget, steps=3), dense_controls=False)
    changed = reproduce.Runner()
    rows4, _ = reproduce.run_grid(more, changed, quiet=True)
    assert [c[0] for c in changed.commands] == ["retrain", "eval"]
    assert rows4[-1]["train_tokens"] == 3 * 2 * 32


def test_parse_args_quick_and_errors(reproduce, tmp_path: Path, calib_file: Path) -> None:
    model = save_tiny(tmp_path / "m", "opt")
    grid, _ = reproduce.parse_args(["--quick", "--model", str(model), "--calib", str(calib_file), "--eval-data", str(calib_file),
                                    "--recoveries", "biases+norms"])
    assert grid.budget == reproduce.QUICK_BUDGET and grid.methods == reproduce.QUICK_METHODS
    assert grid.recoveries == ["none", "biases+norms"]  # the pruned baseline is always there: it defines the gap
    assert grid.train_data == calib_file
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--model", str(model), "--calib", str(calib_file), "--eval-data", str(calib_file), "--recoveries", "nope"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--model", str(tmp_path / "missing")])


def test_methods_study_rows_skip_what_perp_lacks(reproduce, tmp_path: Path, calib_file: Path, capsys, monkeypatch) -> None:
    # the row list: each row only at its own settings, the baselines' recoveries, no dense controls
    grid, _ = reproduce.parse_args(["--study", "methods", "--model", str(tmp_path), "--calib", str(calib_file),
                                    "--eval-data", str(calib_file)])
    assert grid.study == "methods" and not grid.dense_controls and grid.recoveries == ["none", "biases+norms", "masklora"]
    rows = {(meth, s) for _, meth, s, _ in grid.cells()}
    assert ("ria+permute", "2:4") in rows and ("ria+permute", "0.5") not in rows
    assert {s for meth, s in rows if meth == "owl-sparsegpt"} == {"0.6", "0.7", "0.8"}
    assert {s for meth, s in rows if meth == "sparsegpt+rec-sublayer"} == {"0.6", "0.7"}
    assert all(reproduce.variant(v.baseline) for v in reproduce.METHOD_VARIANTS.values() if v.baseline)
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--study", "methods", "--model", str(tmp_path), "--methods", "nope"])

    # a row whose flag the installed perp does not accept is skipped with its reason and runs nothing
    fake = reproduce.Variant("wanda+fake", "wanda", ("--no-such-flag",), settings=("0.5",), baseline="wanda")
    monkeypatch.setitem(reproduce.METHOD_VARIANTS, fake.name, fake)
    assert reproduce.unavailable(fake) == "the installed `perp prune` does not accept --no-such-flag"
    assert reproduce.unavailable(reproduce.Variant("x", "no-such-method")).startswith("the installed perp has no")
    assert reproduce.unavailable(reproduce.METHOD_VARIANTS["wanda"]) is None
    model = save_tiny(tmp_path / "tiny-opt-random", "opt")
    grid = _grid(reproduce, tmp_path, model, calib_file, methods=["wanda", fake.name], settings=["0.5"], recoveries=["none"],
                 study="methods", dense_controls=False)
    runner = reproduce.Runner()
    rows, failures = reproduce.run_grid(grid, runner, quiet=True)
    assert failures == [] and [c[0] for c in runner.commands] == ["eval", "prune", "eval"]
    assert "skipping wanda+fake: the installed `perp prune` does not accept --no-such-flag" in capsys.readouterr().err
    # a variant is its own pruned model: flags are part of the cache key
    study = reproduce.Study(grid, runner)
    assert study.pruned_path(model, "wanda", "0.5") != study.pruned_path(model, fake.name, "0.5")
    written = reproduce.write_outputs(rows, grid, failures)
    assert [p.name for p in written] == ["methods.csv", "methods.md"]  # no row has its baseline yet: no plot
    md = (grid.out / "methods.md").read_text()
    assert "| wanda | 50% |" in md and "## Not run" in md and "wanda+fake: the installed `perp prune` does not accept" in md


def test_methods_report_compares_each_row_with_its_baseline(reproduce, tmp_path: Path, calib_file: Path) -> None:
    grid = reproduce.Grid(models=[tmp_path], calib=calib_file, train_data=calib_file, eval_data=calib_file, work=tmp_path / "w",
                          out=tmp_path / "out", methods=["wanda", "owl-wanda"], settings=["0.6", "0.7"],
                          recoveries=["none", "masklora"], study="methods", dense_controls=False)
    ppl = {("wanda", "none"): 170.0, ("wanda", "masklora"): 150.0, ("owl-wanda", "none"): 168.0, ("owl-wanda", "masklora"): 151.0}
    rows = [{"model": "m", "method": "dense", "setting": "0%", "recovery": "none", "perplexity": 137.0, "sparsity": 0.0,
             "prune_s": 0.0, "recover_s": 0.0, "trainable_parameters": 0, "trainable_share": 0.0, "train_tokens": 0}]
    rows += [{"model": "m", "method": m, "setting": s, "recovery": r, "perplexity": p + (10 if s == "70%" else 0), "sparsity": 0.6,
              "prune_s": 1.0, "recover_s": 2.0, "eval_s": 0.5, "trainable_parameters": 1, "trainable_share": 0.1, "train_tokens": 1}
             for (m, r), p in ppl.items() for s in ("60%", "70%")]
    rows = reproduce.with_gaps(rows)
    deltas = reproduce.baseline_deltas(rows, "m", grid)
    assert {(d["setting"], d["recovery"]): d["delta"] for d in deltas} == {
        ("60%", "none"): -2.0, ("60%", "masklora"): 1.0, ("70%", "none"): -2.0, ("70%", "masklora"): 1.0}
    written = reproduce.write_outputs(rows, grid, [])
    assert [p.name for p in written] == ["methods.csv", "methods.md", "methods_vs_baseline_m.png"]
    md = (grid.out / "methods.md").read_text()
    assert "| owl-wanda | 70% | 178.00 | 161.00 | -2.00 | +1.00 |" in md
    assert "**owl-wanda** vs wanda, mean Δ: none -2.00 (60%, 70%); masklora +1.00 (60%, 70%)." in md
