"""Pruning speed and memory per method on an OPT-125m-shaped model built from its config.

    python bench/prune_speed.py             # 12 blocks (125M parameters), 8 x 512 calibration tokens
    python bench/prune_speed.py --small     # 2 blocks: a quick look
    python bench/prune_speed.py --layers 4 --nsamples 16 --methods wanda,sparsegpt

Each method runs in its own process, so the peak memory reported (host RSS, and CUDA when
present) is that method's alone; "model" is the RSS right after building the model, the
baseline every method starts from. The weights are random (the shapes, not the values,
set the cost) and the calibration tokens are random ids.

SparseGPT's compression step is compared with a float32 GEMM roofline of this machine:
the step's floating-point operations (Cholesky factorisations and inverse of each
group's Hessian, the in-block OBS updates and the lazy batch updates) divided by the
rate `torch.mm` reaches on a large square product. The statistics pass (hooks + the
block forward + Hessian accumulation) is reported separately.
"""

from __future__ import annotations

import argparse
import json
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
    """Prune once and print a JSON line (run in a fresh process per method)."""
    from perp_cli.checkpoint import Checkpoint
    from perp_cli.manifest import peak_memory
    from perp_cli.pruner import PruneConfig, prune

    model = build(args.layers)
    before = peak_memory()["host_rss_mib"]
    tokens = torch.randint(0, OPT_125M["vocab_size"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    _, results, _ = prune(Checkpoint(model, None, None, {}, "opt-125m-shaped"),
                          PruneConfig(args.worker, sparsity=0.5, device=args.device), tokens=tokens)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "model_rss_mib": before, "peak": results["peak_memory"],
                      "block_seconds": results["block_seconds"]}))


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


def sparsegpt_block_flops(blocksize: int = 128) -> float:
    """Operations of SparseGPT's compression step for one OPT-125m block.

    Per input group of dimension d: Cholesky (d³/3), inverse from the factor (d³), upper
    Cholesky of the inverse (d³/3). Per matrix [rows, cols]: the in-block OBS rank-1
    updates (2·rows·(b−i) for column i of a block of b) and the lazy update of the
    remaining columns after each block (2·rows·b·remaining).
    """
    h, f = OPT_125M["hidden_size"], OPT_125M["ffn_dim"]
    groups = [h, h, h, f]  # q/k/v share one Hessian; out_proj; fc1; fc2
    matrices = [(h, h)] * 4 + [(f, h), (h, f)]
    flops = sum(5 / 3 * d**3 for d in groups)
    for rows, cols in matrices:
        for start in range(0, cols, blocksize):
            b = min(blocksize, cols - start)
            flops += sum(2 * rows * (b - i) for i in range(b))
            flops += 2 * rows * b * (cols - start - b)
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="decoder blocks (12 = OPT-125m)")
    parser.add_argument("--small", action="store_true", help="2 blocks, 4 x 256 tokens: a quick look")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", default="magnitude,random,wanda,sparsegpt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.layers, args.nsamples, args.seqlen = 2, 4, 256
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return

    params = sum(p.numel() for p in build(args.layers).parameters())
    rate = gemm_rate()
    print(f"OPT-125m shapes, {args.layers} blocks, {params / 1e6:.1f}M parameters; calibration {args.nsamples} x {args.seqlen} "
          f"tokens; {torch.get_num_threads()} threads; float32 GEMM {rate / 1e9:.1f} GFLOP/s", file=sys.stderr)
    rows = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, "--layers", str(args.layers), "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--device", args.device, "--threads", str(torch.get_num_threads())]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {method}: {rows[method]['seconds']:.1f}s", file=sys.stderr)

    print("| method | time (s) | peak host RSS (MiB) | model alone (MiB) |\n|---|---:|---:|---:|")
    for method, r in rows.items():
        print(f"| {method} | {r['seconds']:.1f} | {r['peak']['host_rss_mib']:.0f} | {r['model_rss_mib']:.0f} |")
    if "sparsegpt" in rows:
        blocks = rows["sparsegpt"]["block_seconds"]
        flops = sparsegpt_block_flops()
        roof = flops / rate
        prune_s = sum(b["prune"] for b in blocks) / len(blocks)
        stats_s = sum(b["statistics"] for b in blocks) / len(blocks)
        print(f"\nSparseGPT per block (mean of {len(blocks)}): compression {prune_s:.2f}s for {flops / 1e9:.1f} GFLOP; "
              f"GEMM roofline {roof:.2f}s -> {roof / prune_s:.0%} of roofline; statistics pass {stats_s:.2f}s")


if __name__ == "__main__":
    main()
