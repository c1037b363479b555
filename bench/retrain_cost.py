"""Memory and speed of PERP's retraining subsets versus full retraining, OPT-125m shapes.

    python bench/retrain_cost.py                    # 12 blocks (125M parameters), 4 steps of 1 x 512 tokens
    python bench/retrain_cost.py --small            # 2 blocks: a quick look
    python bench/retrain_cost.py --configs "biases,norms;all" --steps 2

PERP's claim is that retraining only biases and norms (or MaskLoRA) costs far less memory
than full retraining, because only the trainable parameters get gradients and AdamW state.
Each configuration runs in its own fresh process, so the peak host RSS (`ru_maxrss`) it
reports is its own; "model" is the RSS after building and pruning the model (50%
magnitude, so masks exist for MaskLoRA and masked full retraining), the baseline every
configuration starts from; "overhead" is peak minus model. Speed is measured over the
steps after a first warm-up step. Weights and tokens are random: the shapes, not the
values, set the cost.

glibc keeps freed memory of the many weight-sized temporaries (MaskLoRA builds
W + s·(M⊙BA) per matrix per step) in fragmented heaps, which inflates peak RSS;
`--mmap-threshold 65536` shows the memory the step actually needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

OPT_125M = {
    "hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "word_embed_proj_dim": 768,
    "max_position_embeddings": 2048, "vocab_size": 50272, "do_layer_norm_before": True, "enable_bias": True, "dropout": 0.0,
}
CONFIGS = "biases,norms;biases,norms+masklora;all"


def build(layers: int, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("opt", **{**OPT_125M, "num_hidden_layers": layers})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def magnitude_masks(model: torch.nn.Module, sparsity: float = 0.5):
    from perp_cli import arch, mask
    from perp_cli.mask import MaskSet

    masks = {}
    for m in arch.matrices(model):
        w = m.weight()
        keep = w.abs() > w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values
        masks[m.name] = m.to_param_layout(keep).contiguous()
    ms = MaskSet(masks)
    mask.apply(model, ms)
    return ms


def worker(args: argparse.Namespace) -> None:
    """Train one configuration and print a JSON line (run in a fresh process)."""
    from perp_cli import adapters
    from perp_cli.manifest import peak_memory
    from perp_cli.trainable import count_parameters, select_trainable
    from perp_cli.training import TrainConfig, train_lm

    train, _, adapter = args.worker.partition("+")
    model = build(args.layers)
    masks = magnitude_masks(model)
    model_rss = peak_memory()["host_rss_mib"]
    tokens = torch.randint(0, OPT_125M["vocab_size"], ((args.steps + 1) * args.batch_size, args.seqlen),
                           generator=torch.Generator().manual_seed(0))
    params = select_trainable(model, train)
    torch.manual_seed(0)
    ads = adapters.attach(model, adapter, rank=args.rank, alpha=2 * args.rank, masks=masks) if adapter else {}
    n_train = sum(p.numel() for p in params.values()) + sum(p.numel() for a in ads.values() for p in a.parameters())
    warm = train_lm(model, tokens[: args.batch_size], TrainConfig(steps=1, batch_size=args.batch_size), params, ads, masks, quiet=True)
    start = time.perf_counter()
    result = train_lm(model, tokens[args.batch_size :], TrainConfig(steps=args.steps, batch_size=args.batch_size, warmup=0.0),
                      params, ads, masks, quiet=True)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "trainable": n_train, "share": n_train / count_parameters(model), "model_rss_mib": model_rss,
        "peak_rss_mib": peak_memory()["host_rss_mib"], "tokens_per_s": result.tokens_seen / seconds,
        "seconds_per_step": seconds / args.steps, "warmup_seconds": warm.wall_time_s,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="decoder blocks (12 = OPT-125m)")
    parser.add_argument("--small", action="store_true", help="2 blocks, 256-token windows: a quick look")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16, help="MaskLoRA rank (alpha = 2 x rank)")
    parser.add_argument("--configs", default=CONFIGS, help="';'-separated TRAIN[+ADAPTER] configurations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the workers, e.g. 65536: freed tensors "
                             "then go back to the OS at once, so peak RSS shows what the step needs rather than "
                             "allocator fragmentation (0: glibc's default, what a user gets)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.layers, args.seqlen = 2, 256
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return

    print(f"OPT-125m shapes, {args.layers} blocks; {args.steps} steps of {args.batch_size} x {args.seqlen} tokens; "
          f"{torch.get_num_threads()} threads; glibc mmap threshold {args.mmap_threshold or 'default'}", file=sys.stderr)
    rows = {}
    for config in args.configs.split(";"):
        cmd = [sys.executable, __file__, "--worker", config, "--layers", str(args.layers), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--rank", str(args.rank),
               "--threads", str(torch.get_num_threads())]
        env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {})}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            sys.exit(f"{config} failed:\n{out.stderr}")
        rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {config}: {rows[config]['seconds_per_step']:.2f} s/step", file=sys.stderr)

    ref = rows.get("all")
    print("| trains | trainable (share) | peak RSS (MiB) | overhead over model (MiB) | tokens/s | "
          "peak vs all | overhead vs all | tokens/s vs all |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for config, r in rows.items():
        overhead = r["peak_rss_mib"] - r["model_rss_mib"]
        ratios = ("-", "-", "-")
        if ref:
            ref_overhead = ref["peak_rss_mib"] - ref["model_rss_mib"]
            ratios = (f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}", f"{overhead / ref_overhead:.2f}",
                      f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}")
        print(f"| {config} | {r['trainable'] / 1e6:.2f}M ({r['share']:.2%}) | {r['peak_rss_mib']:.0f} | {overhead:.0f} | "
              f"{r['tokens_per_s']:.0f} | {ratios[0]} | {ratios[1]} | {ratios[2]} |")
    print(f"\nmodel alone (built + pruned): {next(iter(rows.values()))['model_rss_mib']:.0f} MiB RSS")


if __name__ == "__main__":
    main()
