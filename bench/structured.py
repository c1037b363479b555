"""Structured pruning (`perp shrink`): what it buys in size, speed and memory, and what it
costs in perplexity before and after PERP-style recovery.

    flock /tmp/perp-heavy.lock python bench/structured.py              # both parts (see below for the budget)
    python bench/structured.py --part speed --no-1b                      # shared checkpoints only, a quick look
    python bench/structured.py --part quality --windows 20 --steps 10    # a quick quality run

Two parts, both written to `results/structured.{md,csv}` and `results/structured.png`:

* **speed**: for each model and each shape (dense; depth, width and heads at 25% and 50%
  removal), in a fresh process: parameters, weight bytes (the safetensors file for the
  shared checkpoints; parameters x 4 bytes for the 1B model, which is never written),
  CPU forward latency at batch 1 and batch 16 (best of `--repeats` after one warm-up,
  `--threads` threads), and the process's peak RSS (model + that forward). Models: the
  shared checkpoints, shrunk by `perp shrink` (the quality part's outputs), and a
  1B-shaped LLaMA (TinyLlama-1.1B's config: hidden 2048, MLP 5632, 22 layers, 32 heads
  in 4 key-value groups, vocabulary 32000) with random weights, whose smaller shapes come
  from perp's own surgery on the meta-device skeleton (the same configs `perp shrink`
  would write; the weights' values do not change latency or memory).
* **quality**: on the shared checkpoints, WikiText-2 test perplexity (first `--windows`
  windows of 256 tokens, as results/results.md) of the dense model, of each shrunk model,
  and after each recovery: `biases+norms` (`perp retrain --train biases,norms`, LLaMA
  gets zero-initialised biases), `lora` (`--train biases,norms --adapter lora`, then
  `perp merge`, no --allow-densify: nothing must stay zero) and `reconstruct`
  (`perp reconstruct --train biases,norms --adapter lora` against the source model).
  Budget: `--steps` x 4 x 256 training tokens per retraining, `--rec-steps` x 4 x 256
  per block for reconstruction, from `--nsamples` calibration windows of C4. Two
  reference rows use the same protocol: the dense model after the same retraining (the
  control: retraining on C4 alone moves WikiText-2 perplexity, a lot for stories260K),
  and SparseGPT 50% unstructured with the same recoveries (MaskLoRA in place of LoRA).

Every step runs through perp's public CLI in-process; every finished cell is cached as
JSON under `--work`, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import C4_SAMPLE, ROOT, STORIES260K, TINY_OPT, WIKITEXT2_TEST, cache_dir  # noqa: E402

MODELS = [TINY_OPT, STORIES260K]
CALIB = C4_SAMPLE
EVAL = WIKITEXT2_TEST
WORK = cache_dir("structured")
STRUCTURES = ["depth", "width", "heads"]
RATIOS = ["0.25", "0.5"]
RECOVERIES = ["none", "biases+norms", "lora", "reconstruct"]
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    head_dim=64, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
)


class StepFailed(RuntimeError):
    pass


def perp(*args: Any) -> dict[str, Any]:
    """`perp ARGS --json` in-process; the parsed JSON (nonzero exit: StepFailed with stderr's line)."""
    from perp_cli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if code != 0:
        raise StepFailed(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {code}")
    text = out.getvalue().strip()
    return json.loads(text) if text else {}


CACHED_ONLY = [False]  # --cached-only: report what the cache holds, compute nothing


def _cached(path: Path, compute) -> dict[str, Any] | None:
    if path.exists():
        return json.loads(path.read_text())
    if CACHED_ONLY[0]:
        return None
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


# ----------------------------------------------------------------------------- quality


def needs_biases(model: Path) -> bool:
    return json.loads((model / "config.json").read_text()).get("model_type") == "llama"


def shrunk_dir(a: argparse.Namespace, model: Path, structure: str, ratio: str) -> Path:
    return a.work / model.name / f"{structure}-{ratio}"


def shrink_cell(a: argparse.Namespace, model: Path, structure: str, ratio: str) -> dict[str, Any]:
    out = shrunk_dir(a, model, structure, ratio)

    def run() -> dict[str, Any]:
        if out.exists():
            shutil.rmtree(out)
        started = time.time()
        try:
            res = perp("shrink", model, "-o", out, "--structure", structure, "--remove-ratio", ratio, "--calib", a.calib,
                       "--nsamples", a.nsamples, "--seqlen", 256, "--device", "cpu", "--quiet", "--json")
        except StepFailed as exc:
            return {"refused": str(exc).replace("perp: error: ", "")}
        return {"parameters": res["parameters"], "sizes": res["sizes"], "removed": res["removed"],
                "shrink_s": round(time.time() - started, 2)}

    return _cached(a.work / model.name / f"{structure}-{ratio}.shrink.json", run)


def evaluate(a: argparse.Namespace, directory: Path) -> float:
    res = perp("eval", directory, "--dataset", a.eval_data, "--seqlen", 256, "--max-windows", a.windows, "--batch-size", 8,
               "--device", "cpu", "--quiet", "--json")
    return next(iter(res["results"][0]["perplexity"].values()))["ppl"]


def recover(a: argparse.Namespace, model: Path, source: Path, recovery: str, out: Path, adapter: str = "lora") -> dict[str, Any]:
    """`adapter`: lora for dense inputs (shrunk or the dense control), masklora for the
    unstructured reference (plain LoRA would fill its pruned weights)."""
    biases = ["--add-biases"] if needs_biases(model) else []
    started = time.time()
    if recovery in ("biases+norms", "lora"):
        adapted = out.with_name(out.name + ".adapted") if recovery == "lora" else out
        args = ["retrain", source, "-o", adapted, "--train", "biases,norms", "--data", a.calib, "--seqlen", 256,
                "--batch-size", 4, "--steps", a.steps, "--lr", 2e-3, "--device", "cpu", "--overwrite", "--quiet", "--json", *biases]
        if recovery == "lora":
            args += ["--adapter", adapter, "--rank", 16, "--alpha", 32]
        res = perp(*args)
        info = {"trainable_parameters": res["trainable_parameters"], "tokens": res["tokens_seen"]}
        if recovery == "lora":
            perp("merge", adapted, "-o", out, "--overwrite", "--quiet", "--json")  # no --allow-densify: there is no mask
            shutil.rmtree(adapted, ignore_errors=True)
    else:
        res = perp("reconstruct", source, "-o", out, "--dense", model, "--train", "biases,norms", "--adapter", adapter,
                   "--rank", 16, "--alpha", 32, "--calib", a.calib, "--nsamples", a.nsamples, "--seqlen", 256,
                   "--steps-per-block", a.rec_steps, "--batch-size", 4, "--device", "cpu", "--overwrite", "--quiet", "--json", *biases)
        info = {"trainable_parameters": res["trainable_parameters"], "tokens": res["tokens_per_block"] * len(res["blocks"])}
    info["recover_s"] = round(time.time() - started, 2)
    return info


def quality(a: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for model in a.models:
        dense = _cached(a.work / model.name / "dense.json", lambda: {"ppl": evaluate(a, model)})
        rows.append({"model": model.name, "structure": "dense", "ratio": "0", "recovery": "none", "ppl": dense["ppl"]})
        for recovery in [r for r in a.recoveries if r in ("biases+norms", "lora")]:  # the control: the same retraining, dense
            def control(recovery=recovery) -> dict[str, Any]:
                out = a.work / model.name / f"dense-{recovery}"
                info = recover(a, model, model, recovery, out)
                info["ppl"] = evaluate(a, out)
                shutil.rmtree(out, ignore_errors=True)
                return info
            print(f"[quality] {model.name} dense (control) {recovery}", file=sys.stderr, flush=True)
            key = f"dense-{recovery}-s{a.steps}-w{a.windows}.json"
            rows.append({"model": model.name, "structure": "dense", "ratio": "0", "recovery": recovery,
                         **_cached(a.work / model.name / key, control)})
        if a.unstructured:  # the reference: SparseGPT 50% unstructured, same protocol, MaskLoRA for LoRA
            pruned = a.work / model.name / "sparsegpt-0.5"
            if not (pruned / "perp.json").exists():
                shutil.rmtree(pruned, ignore_errors=True)
                perp("prune", model, "-o", pruned, "--method", "sparsegpt", "--sparsity", 0.5, "--calib", a.calib,
                     "--nsamples", a.nsamples, "--seqlen", 256, "--device", "cpu", "--quiet", "--json")
            for recovery in a.recoveries:
                def reference(recovery=recovery) -> dict[str, Any]:
                    if recovery == "none":
                        return {"ppl": evaluate(a, pruned)}
                    out = a.work / model.name / f"sparsegpt-0.5-{recovery}"
                    info = recover(a, model, pruned, recovery, out, adapter="masklora")
                    info["ppl"] = evaluate(a, out)
                    shutil.rmtree(out, ignore_errors=True)
                    return info
                print(f"[quality] {model.name} sparsegpt 50% {recovery}", file=sys.stderr, flush=True)
                key = f"sparsegpt-0.5-{recovery}-s{a.steps}-r{a.rec_steps}-w{a.windows}.json"
                rows.append({"model": model.name, "structure": "unstructured", "ratio": "0.5", "recovery": recovery,
                             **_cached(a.work / model.name / key, reference)})
        for structure in a.structures:
            for ratio in a.ratios:
                shrunk = shrink_cell(a, model, structure, ratio)
                base = {"model": model.name, "structure": structure, "ratio": ratio}
                if "refused" in shrunk:
                    rows.append({**base, "recovery": "none", "refused": shrunk["refused"]})
                    continue
                source = shrunk_dir(a, model, structure, ratio)
                for recovery in a.recoveries:
                    def cell(recovery=recovery) -> dict[str, Any]:
                        if recovery == "none":
                            return {"ppl": evaluate(a, source)}
                        out = a.work / model.name / f"{structure}-{ratio}-{recovery}"
                        info = recover(a, model, source, recovery, out)
                        info["ppl"] = evaluate(a, out)
                        shutil.rmtree(out, ignore_errors=True)
                        return info
                    key = f"{structure}-{ratio}-{recovery}-s{a.steps}-r{a.rec_steps}-w{a.windows}.json"
                    print(f"[quality] {model.name} {structure} {ratio} {recovery}", file=sys.stderr, flush=True)
                    rows.append({**base, "recovery": recovery, **_cached(a.work / model.name / key, cell),
                                 "params_before": shrunk["parameters"]["before"], "params_after": shrunk["parameters"]["after"]})
    return rows


# ----------------------------------------------------------------------------- speed


def llama_1b_config(structure: str | None, ratio: float) -> Any:
    """TinyLlama-1.1B's config, or the config `perp shrink` writes for it (perp's surgery
    on the meta skeleton; which units go does not change the shapes)."""
    import torch
    from transformers import AutoConfig

    from perp_cli import checkpoint
    from perp_cli.shrinking import depth, heads, layout, width
    from perp_cli.shrinking.surgery import check_config

    config = AutoConfig.for_model("llama", **LLAMA_1B)
    if structure is None:
        return config
    model = checkpoint.build_skeleton(config, torch.float32)
    n = config.num_hidden_layers
    if structure == "depth":
        return depth.surgery(model, list(range(n - round(ratio * n), n))).config
    if structure == "width":
        plan = {i: layout.channels(model, i) for i in range(n)}
        return width.surgery(model, plan, {i: list(range(round(ratio * config.intermediate_size))) for i in range(n)}).config
    plan = {i: layout.heads(model, i) for i in range(n)}
    cut = heads.surgery(model, plan, {i: list(range(round(ratio * config.num_key_value_heads))) for i in range(n)})
    check_config(cut.config, f"removing {ratio:.0%} of the key-value groups")
    return cut.config


def speed_worker(a: argparse.Namespace) -> None:
    """One model shape in this process: print one JSON line."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch + transformers imported, no model yet
    if a.worker.startswith("llama-1b"):
        _, structure, ratio = a.worker.split(":")
        config = llama_1b_config(None if structure == "dense" else structure, float(ratio))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        seqlen = a.seqlen_1b
    else:
        path = Path(a.worker)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        weight_bytes = sum(f.stat().st_size for f in path.glob("model*.safetensors"))
        seqlen = a.seqlen
    vocab = model.config.vocab_size
    out = {"parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes, "seqlen": seqlen,
           "baseline_rss_mib": baseline}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in (1, 16):
            ids = torch.randint(4, vocab, (batch, seqlen), generator=gen)
            model(input_ids=ids, use_cache=False)  # warm-up
            times = []
            for _ in range(a.repeats):
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times.append(time.perf_counter() - start)
            out[f"latency_b{batch}_ms"] = 1000 * min(times)  # best of N: the least disturbed by other jobs on shared cores
            out[f"latency_b{batch}_median_ms"] = 1000 * statistics.median(times)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_over_baseline_mib"] = out["peak_rss_mib"] - baseline
    print(json.dumps(out))


def run_worker(a: argparse.Namespace, spec: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", spec, "--threads", str(a.threads), "--repeats", str(a.repeats),
           "--seqlen", str(a.seqlen), "--seqlen-1b", str(a.seqlen_1b)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def speed(a: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    shapes = [("dense", "0")] + [(s, r) for s in a.structures for r in a.ratios]
    for model in a.models:
        for structure, ratio in shapes:
            if structure == "dense":
                path = model
            else:
                if "refused" in shrink_cell(a, model, structure, ratio):
                    continue
                path = shrunk_dir(a, model, structure, ratio)
            key = a.work / model.name / f"speed-{structure}-{ratio}-t{a.threads}-n{a.repeats}-s{a.seqlen}.json"
            print(f"[speed] {model.name} {structure} {ratio}", file=sys.stderr, flush=True)
            cell = _cached(key, lambda: run_worker(a, str(path)))
            if cell is not None:
                rows.append({"model": model.name, "structure": structure, "ratio": ratio, **cell})
    if a.one_b:
        for structure, ratio in shapes:
            if structure != "dense":
                try:
                    llama_1b_config(structure, float(ratio))
                except Exception as exc:  # a shape transformers' config refuses (e.g. 28 heads for hidden 2048)
                    print(f"[speed] llama-1b {structure} {ratio}: skipped ({exc})", file=sys.stderr, flush=True)
                    continue
            key = a.work / "llama-1b" / f"speed-{structure}-{ratio}-t{a.threads}-n{a.repeats}-s{a.seqlen_1b}.json"
            print(f"[speed] llama-1b {structure} {ratio}", file=sys.stderr, flush=True)
            cell = _cached(key, lambda: run_worker(a, f"llama-1b:{structure}:{ratio}"))
            if cell is not None:
                rows.append({"model": "llama-1b (random)", "structure": structure, "ratio": ratio, **cell})
    return rows


# ----------------------------------------------------------------------------- report


def report(a: argparse.Namespace, speed_rows: list[dict[str, Any]], quality_rows: list[dict[str, Any]]) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "structured.csv", "w", newline="") as f:
        fields = ["part", "model", "structure", "ratio", "recovery", "ppl", "parameters", "weight_bytes", "seqlen",
                  "latency_b1_ms", "latency_b16_ms", "latency_b1_median_ms", "latency_b16_median_ms", "peak_rss_mib", "peak_over_baseline_mib", "params_before", "params_after", "trainable_parameters",
                  "tokens", "recover_s", "refused"]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in speed_rows:
            w.writerow({"part": "speed", **r})
        for r in quality_rows:
            w.writerow({"part": "quality", **r})
    lines = [
        "# Structured pruning (`perp shrink`): size, speed, memory and perplexity",
        "",
        f"Command: `python bench/structured.py {' '.join(sys.argv[1:])}` (cells cached under --work; the cells were computed "
        "by runs with the same settings, `--part quality` then `--part speed`)",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch threads {a.threads}, float32.",
        f"- Latency: best of {a.repeats} forward passes after one warm-up (the median is in the csv), `use_cache=False`, windows of {a.seqlen} tokens "
        f"({a.seqlen_1b} for the 1B model); each shape in a fresh process; peak RSS = the process's high-water mark, "
        "peak over runtime = that minus the RSS once torch and transformers are imported (the model and its forwards).",
        "- Removal R: the fraction of blocks (depth), of each block's MLP channels (width) or of each block's key-value "
        "groups with their query heads (heads), rounded to whole units; the parameter share actually removed is in the table.",
        f"- Quality: WikiText-2 test perplexity, first {a.windows} windows of 256 tokens. Shrink calibration: {a.nsamples} C4 windows "
        f"of 256. biases+norms and lora: {a.steps} steps x 4 x 256 = {a.steps * 1024:,} C4 tokens, lr 2e-3, LoRA rank 16 alpha 32 "
        f"merged without --allow-densify. reconstruct: biases,norms + LoRA per block, {a.rec_steps} steps x 4 x 256 tokens per block "
        "against the source model (a depth-shrunk block learns the dense blocks it stands for). LLaMA gets zero-initialised biases.",
        "",
        "## Size, speed and memory",
        "",
        "| model | shape | parameters | weights (MB) | batch 1 (ms) | batch 16 (ms) | peak RSS (MiB) | peak over runtime (MiB) | speed-up b1 / b16 | memory over runtime |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense_of = {r["model"]: r for r in speed_rows if r["structure"] == "dense"}
    for r in speed_rows:
        d = dense_of[r["model"]]
        shape = "dense" if r["structure"] == "dense" else f"{r['structure']} {float(r['ratio']):.0%}"
        lines.append(
            f"| {r['model']} | {shape} | {r['parameters']:,} ({r['parameters'] / d['parameters']:.0%}) | {r['weight_bytes'] / 1e6:.1f} | "
            f"{r['latency_b1_ms']:.1f} | {r['latency_b16_ms']:.1f} | {r['peak_rss_mib']:.0f} | {r['peak_over_baseline_mib']:.0f} | "
            f"{d['latency_b1_ms'] / r['latency_b1_ms']:.2f}x / {d['latency_b16_ms'] / r['latency_b16_ms']:.2f}x | "
            f"{r['peak_over_baseline_mib'] / d['peak_over_baseline_mib']:.0%} |"
        )
    lines += ["", "## Perplexity after shrinking and after recovery", ""]
    for model in dict.fromkeys(r["model"] for r in quality_rows):
        rows = [r for r in quality_rows if r["model"] == model]
        dense = next(r["ppl"] for r in rows if r["structure"] == "dense" and r["recovery"] == "none")
        lines += [f"### {model}", "", f"Dense perplexity: **{dense:.2f}**.", "",
                  "| shape | parameters kept | " + " | ".join(a.recoveries) + " |", "|---|---:|" + "---:|" * len(a.recoveries)]
        control = {r["recovery"]: r["ppl"] for r in rows if r["structure"] == "dense"}
        lines.append("| dense (control: the same retraining) | 100% | " + " | ".join(
            f"{control[k]:.2f}" if k in control else "-" for k in a.recoveries) + " |")
        reference = {r["recovery"]: r["ppl"] for r in rows if r["structure"] == "unstructured"}
        if reference:
            lines.append("| SparseGPT 50% unstructured (reference; LoRA = MaskLoRA; same size and speed as dense) | 100% stored, 50% of block weights zero | "
                         + " | ".join(f"{reference[k]:.2f}" if k in reference else "-" for k in a.recoveries) + " |")
        for structure in a.structures:
            for ratio in a.ratios:
                cells = {r["recovery"]: r for r in rows if r["structure"] == structure and r["ratio"] == ratio}
                if not cells:
                    continue
                if "refused" in cells.get("none", {}):
                    lines.append(f"| {structure} {float(ratio):.0%} | - | refused: {cells['none']['refused']} |" + " |" * (len(a.recoveries) - 1))
                    continue
                first = next(iter(cells.values()))
                kept = first["params_after"] / first["params_before"]
                best = min(c["ppl"] for c in cells.values())
                vals = [(f"**{cells[k]['ppl']:.2f}**" if cells[k]["ppl"] == best else f"{cells[k]['ppl']:.2f}") if k in cells else "-"
                        for k in a.recoveries]
                lines.append(f"| {structure} {float(ratio):.0%} | {kept:.0%} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["![structured pruning](structured.png)", ""]
    (a.out / "structured.md").write_text("\n".join(lines) + "\n")
    plot(a, speed_rows, quality_rows)


def plot(a: argparse.Namespace, speed_rows: list[dict[str, Any]], quality_rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in quality_rows))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4), squeeze=False)
    axes = list(axes[0])
    markers = {"none": "o", "biases+norms": "s", "lora": "^", "reconstruct": "D"}
    for ax, model in zip(axes, models):
        rows = [r for r in quality_rows if r["model"] == model and "ppl" in r and r["structure"] != "unstructured"]
        dense = next(r["ppl"] for r in rows if r["structure"] == "dense" and r["recovery"] == "none")
        ax.axhline(dense, color="black", lw=1, ls="--", label="dense")
        for recovery in a.recoveries:
            pts = sorted((r["params_after"] / r["params_before"], r["ppl"]) for r in rows
                         if r.get("recovery") == recovery and r["structure"] != "dense")
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(recovery, "o"), label=recovery)
        ref = [r for r in quality_rows if r["model"] == model and r["structure"] == "unstructured" and "ppl" in r]
        if ref:  # unstructured keeps every parameter stored: plotted at 1.0
            ax.scatter([1.0] * len(ref), [r["ppl"] for r in ref], marker="x", color="gray", label="SparseGPT 50% (all recoveries)")
        ax.set_yscale("log")
        ax.set_xlabel("parameters kept (share of dense)")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title(model)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for model in dict.fromkeys(r["model"] for r in speed_rows):
        rows = [r for r in speed_rows if r["model"] == model]
        d = next(r for r in rows if r["structure"] == "dense")
        pts = sorted((r["parameters"] / d["parameters"], d["latency_b16_ms"] / r["latency_b16_ms"]) for r in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=model)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xlabel("parameters kept (share of dense)")
    ax.set_ylabel("CPU forward speed-up at batch 16")
    ax.set_title("speed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "structured.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["speed", "quality", "both"], default="both")
    p.add_argument("--models", type=Path, nargs="+", default=MODELS)
    p.add_argument("--structures", nargs="+", default=STRUCTURES)
    p.add_argument("--ratios", nargs="+", default=RATIOS)
    p.add_argument("--recoveries", nargs="+", default=RECOVERIES)
    p.add_argument("--calib", type=Path, default=CALIB)
    p.add_argument("--eval-data", type=Path, default=EVAL)
    p.add_argument("--windows", type=int, default=100, help="WikiText-2 test windows of 256 tokens (default 100, as results.md)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows for shrink and reconstruct")
    p.add_argument("--steps", type=int, default=50, help="retraining steps (x 4 x 256 tokens)")
    p.add_argument("--rec-steps", type=int, default=25, help="reconstruction steps per block (x 4 x 256 tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seqlen", type=int, default=256, help="latency window length for the shared checkpoints")
    p.add_argument("--seqlen-1b", type=int, default=32, help="latency window length for the 1B model")
    p.add_argument("--no-1b", dest="one_b", action="store_false", help="skip the 1B-shaped model")
    p.add_argument("--no-unstructured", dest="unstructured", action="store_false", help="skip the SparseGPT 50%% reference")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--cached-only", action="store_true", help="report the cached cells only; compute nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        speed_worker(a)
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    CACHED_ONLY[0] = a.cached_only
    quality_rows = quality(a) if a.part in ("quality", "both") else []
    speed_rows = speed(a) if a.part in ("speed", "both") else []
    report(a, speed_rows, quality_rows)
    print((a.out / "structured.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
