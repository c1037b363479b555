"""Pruning speed and memory per method on an OPT-125m-shaped model built from its config.

    python bench/prune_speed.py             # 12 blocks (125M parameters), 8 x 512 calibration tokens
    python bench/prune_speed.py --small     # 2 blocks: a quick look
    python bench/prune_speed.py --layers 4 --nsamples 16 --methods wanda,sparsegpt
    python bench/prune_speed.py --methods forward,wanda,sparsegpt --threads 1,2 --repeats 3   # issue 17's figures
    python bench/prune_speed.py --methods forward,floor,wanda --threads 1 --paired --repeats 5   # Wanda against its floor

Each method runs in its own process, so the peak memory reported (host RSS, and CUDA when
present) is that method's alone; "model" is the RSS right after building the model, the
baseline every method starts from. The weights are random (the shapes, not the values,
set the cost) and the calibration tokens are random ids.

SparseGPT's compression step is compared with a float32 GEMM roofline of this machine:
the step's floating-point operations (Cholesky factorisations and inverse of each
group's Hessian, the in-block OBS updates and the lazy batch updates) divided by the
rate `torch.mm` reaches on a large square product, measured in the same process at the
same thread count, before and after the run (the better of the two). The step's phases
(Cholesky/inverse, mask choice, in-block column loop, lazy updates) and the statistics
pass (hooks + the block forward + Hessian accumulation) are reported per block, one
column per thread count.

`forward` is one plain forward of the whole model (embeddings, blocks, head) over the same
tokens in the same micro-batches, without pruning: every method's time is also shown as a
ratio to it. Timings on shared cores vary with the load: use `--repeats` (medians) and
read the load average printed at the start and end.

`floor` (with `--paired`) runs Wanda's two passes per block without Wanda's work (the
statistics pass up to the last matrix's input, hooks recording nothing, then the
propagation, skipped after the last block as in `perp prune`): the kernels the reference order needs, so `floor` / forward is the lowest
ratio Wanda can reach with this pass structure, measured under the same load as Wanda.
The `own work / forward` column adds up what a method does besides the passes (the
statistics accumulation inside the hooks, and the scores, selection and updates between the
passes; the pruner's per-block clocks) over the pair's forward: less noisy than the ratios,
which move with the passes' own speed from one round to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

OPT_125M = dict(
    hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, word_embed_proj_dim=768,
    max_position_embeddings=2048, vocab_size=50272, do_layer_norm_before=True, enable_bias=True,
)


def build(layers: int, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("opt", **{**OPT_125M, "num_hidden_layers": layers})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def worker(args: argparse.Namespace) -> None:
    """Prune once (or run one plain forward) and print a JSON line (a fresh process per run)."""
    from perp_cli.checkpoint import Checkpoint
    from perp_cli.manifest import peak_memory
    from perp_cli.pruner import PruneConfig, prune

    model = build(args.layers)
    before = peak_memory()["host_rss_mib"]
    tokens = torch.randint(0, OPT_125M["vocab_size"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    rate_before = gemm_rate()
    start = time.perf_counter()
    if args.worker == "forward":  # what a user calls one calibration forward: the whole model, same tokens and micro-batches
        with torch.no_grad():
            for i in range(0, args.nsamples, args.batch_size):
                model(input_ids=tokens[i : i + args.batch_size].to(args.device), use_cache=False)
        results = {"peak_memory": peak_memory(), "block_seconds": []}
    else:
        _, results, _ = prune(Checkpoint(model, None, None, {}, "opt-125m-shaped"),
                              PruneConfig(args.worker, sparsity=0.5, device=args.device, batch_size=args.batch_size), tokens=tokens)
    seconds = time.perf_counter() - start
    rate = max(rate_before, gemm_rate())  # the better of before and after: the roofline is not flattered by a busy moment
    print(json.dumps({"seconds": seconds, "model_rss_mib": before, "peak": results["peak_memory"],
                      "block_seconds": results["block_seconds"], "gemm_flops": rate}))


class _NoStatistic:
    """A statistics object that records nothing (`floor`: the hooks fire, nothing is kept)."""

    def __init__(self, features: int, device: torch.device) -> None:
        pass

    def add(self, x: torch.Tensor) -> None:
        pass


def floor_pass(model: torch.nn.Module, tokens: torch.Tensor, args: argparse.Namespace) -> None:
    """`floor`: Wanda's passes without Wanda's work. Per block, as `perp prune --method
    wanda` runs them: the block up to its last matrix's input under the statistics hooks
    (which record nothing here), then the whole block to propagate (in place; not the last
    block, whose outputs nothing reads); no scores,
    masks or zeroing. The kernels the reference order needs: the floor of Wanda's time."""
    from perp_cli import arch, engine
    from perp_cli.pruning.statistics import collecting, target_groups

    arch.groups_probed(model)  # Wanda's probe forward, for the same input groups
    keys = {m.key for m in arch.matrices(model)}

    def step(s: engine.BlockStep) -> None:
        with collecting(model, target_groups(model, s.index, keys), _NoStatistic, s.device):
            s.inputs.run(s.block, keep_outputs=False)

    engine.calibrate(model, tokens, step, device=args.device, batch_size=args.batch_size, in_place=True, propagate_last=False)


def paired(args: argparse.Namespace, methods: list[str]) -> None:
    """`--paired`: one process, one model; `--repeats` rounds of (one plain forward, then
    each of `methods` on a deep copy), alternating, so a burst of load on the shared cores
    hits both sides of a pair. `floor` is `floor_pass`. Prints each pair's ratio (stderr)
    and, per method, the pairs and their median ratio (a JSON line)."""
    import copy

    from perp_cli.checkpoint import Checkpoint
    from perp_cli.pruner import PruneConfig, prune

    model = build(args.layers)
    tokens = torch.randint(0, OPT_125M["vocab_size"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))

    def forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, args.nsamples, args.batch_size):
                model(input_ids=tokens[i : i + args.batch_size].to(args.device), use_cache=False)
        return time.perf_counter() - start

    forward()  # warm-up (first-call allocations and kernel choices), not timed
    pairs: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    own: dict[str, list[float]] = {m: [] for m in methods}  # the method's own work / the pair's forward
    for repeat in range(args.repeats):
        for method in methods:
            f = forward()
            copied = copy.deepcopy(model)
            start = time.perf_counter()
            if method == "floor":
                floor_pass(copied, tokens, args)
            else:
                _, results, _ = prune(Checkpoint(copied, None, None, {}, "opt-125m-shaped"),
                                      PruneConfig(method, sparsity=0.5, device=args.device, batch_size=args.batch_size, quiet=True),
                                      tokens=tokens)
                # inside the passes: statistics accumulation; between them: scores, masks, updates
                own[method].append(sum(b.get("accumulate", 0.0) + b.get("prune", 0.0) for b in results["block_seconds"]) / f)
            m = time.perf_counter() - start
            del copied
            pairs[method].append((f, m))
            print(f"  round {repeat + 1}: forward {f:.2f}s, {method} {m:.2f}s, ratio {m / f:.3f} (load {os.getloadavg()[0]:.1f})",
                  file=sys.stderr, flush=True)
    print(json.dumps({m: {"pairs": p, "median_ratio": median([b / a for a, b in p]),
                          "ratio_of_fastest": min(b for _, b in p) / min(a for a, _ in p),
                          "own_work": median(own[m]) if own[m] else None} for m, p in pairs.items()}))


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul rate in FLOP/s (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sparsegpt_block_flops(blocksize: int = 128, factorisation: float = 5 / 3) -> float:
    """Operations of SparseGPT's compression step for one OPT-125m block.

    Per input group of dimension d, the reference's factorisation (`factorisation` = 5/3):
    Cholesky (d³/3), inverse from the factor (d³), upper Cholesky of the inverse (d³/3);
    perp's (2/3): one Cholesky (d³/3) and a triangular inverse (d³/3). Per matrix
    [rows, cols]: the in-block OBS rank-1 updates (2·rows·(b−i) for column i of a block of
    b) and the lazy update of the remaining columns after each block (2·rows·b·remaining).
    The roofline (issue 17) counts the reference's operations: the time a GEMM-rate
    implementation of the published algorithm would take.
    """
    h, f = OPT_125M["hidden_size"], OPT_125M["ffn_dim"]
    groups = [h, h, h, f]  # q/k/v share one Hessian; out_proj; fc1; fc2
    matrices = [(h, h)] * 4 + [(f, h), (h, f)]
    flops = sum(factorisation * d**3 for d in groups)
    for rows, cols in matrices:
        for start in range(0, cols, blocksize):
            b = min(blocksize, cols - start)
            flops += sum(2 * rows * (b - i) for i in range(b))
            flops += 2 * rows * b * (cols - start - b)
    return flops


PHASES = [  # (key in block_seconds, label); "statistics" includes "accumulate"
    ("statistics", "statistics pass (block forward + accumulation)"),
    ("accumulate", "  of which Hessian accumulation"),
    ("inverse", "Cholesky / inverse"),
    ("mask", "mask choice"),
    ("columns", "in-block column loop"),
    ("lazy", "lazy updates (GEMM)"),
    ("prune", "compression step (all of the above but statistics)"),
]


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="decoder blocks (12 = OPT-125m)")
    parser.add_argument("--small", action="store_true", help="2 blocks, 4 x 256 tokens: a quick look")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per micro-batch (perp prune's default)")
    parser.add_argument("--methods", default="forward,magnitude,random,wanda,sparsegpt",
                        help="comma-separated; 'forward' is one plain forward of the model over the same tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default="0", help="torch threads, comma-separated to compare (e.g. 1,2); 0: torch's default")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method; the tables show medians")
    parser.add_argument("--paired", action="store_true", help="in one process per thread count, alternate one plain forward "
                        "and each method (on a copy of the model) --repeats times; print the median ratio of each pair (issue 17's "
                        "'Wanda <= 1.3 x one forward' figure: --methods forward,wanda --threads 1 --paired --repeats 5). The pseudo-method "
                        "floor runs Wanda's passes without its statistics, scores and masks")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.layers, args.nsamples, args.seqlen = 2, 4, 256
    if args.worker:
        if int(args.threads):
            torch.set_num_threads(int(args.threads))
        if args.worker.startswith("paired:"):
            paired(args, args.worker.split(":", 1)[1].split(","))
        else:
            worker(args)
        return
    if args.paired:
        print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", file=sys.stderr)
        print("| method | threads | pairs | forward, median (s) | method, median (s) | median of the pair ratios | "
              "fastest / fastest | own work / forward |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        methods = [m for m in args.methods.split(",") if m != "forward"]
        for t in [int(t) or torch.get_num_threads() for t in args.threads.split(",")]:
            cmd = [sys.executable, __file__, "--worker", f"paired:{','.join(methods)}", "--layers", str(args.layers), "--nsamples", str(args.nsamples),
                   "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(t),
                   "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
            report = json.loads(out.stdout.strip().splitlines()[-1])
            for method in methods:
                r = report[method]
                fs, ms = [f for f, _ in r["pairs"]], [m for _, m in r["pairs"]]
                own_work = "" if r["own_work"] is None else f"{r['own_work']:.3f}"
                print(f"| {method} | {t} | {len(fs)} | {median(fs):.2f} | {median(ms):.2f} | **{r['median_ratio']:.3f}** | "
                      f"{r['ratio_of_fastest']:.3f} | {own_work} |", flush=True)
        print(f"load average at end {os.getloadavg()[0]:.1f}", file=sys.stderr)
        return

    threads = [int(t) or torch.get_num_threads() for t in args.threads.split(",")]
    methods = args.methods.split(",")
    params = sum(p.numel() for p in build(args.layers).parameters())
    load = os.getloadavg()
    print(f"OPT-125m shapes, {args.layers} blocks, {params / 1e6:.1f}M parameters; calibration {args.nsamples} x {args.seqlen} "
          f"tokens, micro-batches of {args.batch_size}; threads {threads}; {args.repeats} run(s) each, medians; "
          f"load average at start {load[0]:.1f} on {os.cpu_count()} CPUs", file=sys.stderr)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP workers must not spin on shared cores
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):  # repeats outermost: a burst of load hits every row, not one
        for t in threads:
            for method in methods:
                cmd = [sys.executable, __file__, "--worker", method, "--layers", str(args.layers), "--nsamples", str(args.nsamples),
                       "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(t)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault((method, t), []).append(r)
                print(f"  run {repeat + 1}, {t} thread(s), {method}: {r['seconds']:.1f}s (GEMM {r['gemm_flops'] / 1e9:.0f} GFLOP/s)", file=sys.stderr)

    print(f"load average at end {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print("| method | threads | time (s) | / forward | peak host RSS (MiB) | model alone (MiB) |\n|---|---:|---:|---:|---:|---:|")
    for t in threads:
        forward = median([r["seconds"] for r in runs[("forward", t)]]) if ("forward", t) in runs else None
        for method in methods:
            rs = runs[(method, t)]
            seconds = median([r["seconds"] for r in rs])
            ratio = f"{seconds / forward:.2f}" if forward else "-"
            print(f"| {method} | {t} | {seconds:.1f} | {ratio} | {median([r['peak']['host_rss_mib'] for r in rs]):.0f} "
                  f"| {median([r['model_rss_mib'] for r in rs]):.0f} |")
    if "sparsegpt" not in methods:
        return
    flops = sparsegpt_block_flops()
    print(f"\nSparseGPT per block (median over runs of the mean over {args.layers} blocks), {flops / 1e9:.1f} GFLOP per block")
    print("| phase | " + " | ".join(f"{t} thread(s) (s)" for t in threads) + " |\n|---|" + "---:|" * len(threads))
    per = {t: runs[("sparsegpt", t)] for t in threads}
    for key, label in PHASES:
        cells = [median([sum(b.get(key, 0.0) for b in r["block_seconds"]) / len(r["block_seconds"]) for r in per[t]]) for t in threads]
        print(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    rates = [median([r["gemm_flops"] for r in per[t]]) for t in threads]
    roofs = [flops / rate for rate in rates]
    prunes = [median([sum(b["prune"] for b in r["block_seconds"]) / len(r["block_seconds"]) for r in per[t]]) for t in threads]
    print("| measured GEMM rate (GFLOP/s) | " + " | ".join(f"{rate / 1e9:.1f}" for rate in rates) + " |")
    print("| GEMM roofline of the step (s) | " + " | ".join(f"{roof:.3f}" for roof in roofs) + " |")
    print("| **fraction of roofline** (target >= 0.5 at 1 thread) | " + " | ".join(f"**{roof / p:.2f}**" for roof, p in zip(roofs, prunes)) + " |")
    own = sparsegpt_block_flops(factorisation=2 / 3)
    print(f"| fraction counting the operations this kernel does ({own / 1e9:.1f} GFLOP) | "
          + " | ".join(f"{own / rate / p:.2f}" for rate, p in zip(rates, prunes)) + " |")
    if len(threads) > 1:
        print(f"\n**compression step, {threads[-1]} threads / {threads[0]} thread(s): {prunes[-1] / prunes[0]:.2f}** (target <= 1)")


if __name__ == "__main__":
    main()
