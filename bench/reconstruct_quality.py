"""WikiText-2 perplexity of Wanda and SparseGPT, alone and followed by `perp reconstruct`.

    python bench/reconstruct_quality.py                 # ../shared/models/tiny-opt, ../shared/data
    python bench/reconstruct_quality.py --windows 20 --settings 0.6 --steps 40   # quicker

Calibration: `--nsamples` windows of `--seqlen` tokens from the local C4 sample (the
references' recipe), the same windows for pruning and for reconstruction. Reconstruction
uses the library defaults (biases + norms + MaskLoRA r=16, target = dense block on the
reconstructed stream) with `--steps` AdamW steps per block of `--batch-size` windows at
`--lr`. Evaluation: the WikiText-2 test rows joined with "\\n\\n", the first `--windows`
non-overlapping windows of `--eval-seqlen` tokens (`perp_cli.perplexity`).
"""

from __future__ import annotations

import sys
import time

from common import quality_parser, quality_setup


def main() -> None:
    parser = quality_parser(__doc__, nsamples=128, seqlen=256)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--settings", default="0.5,0.6,0.7,2:4", help="sparsities and/or N:M patterns")
    parser.add_argument("--steps", type=int, default=100, help="AdamW steps per block")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: the library's")
    parser.add_argument("--train", default="biases,norms")
    parser.add_argument("--adapter", default="masklora")
    parser.add_argument("--target", default="dense")
    args = parser.parse_args()
    q = quality_setup(args)
    from perp_cli.pruner import PruneConfig
    from perp_cli.reconstruction import ReconstructConfig, reconstruct

    rec_kw = {"steps_per_block": args.steps, "batch_size": args.batch_size, "train": args.train, "adapter": args.adapter, "target": args.target}
    if args.lr is not None:
        rec_kw["lr"] = args.lr
    rec_cfg = ReconstructConfig(**rec_kw)

    print(f"{q.calibration()}; reconstruction {rec_cfg.train} + {rec_cfg.adapter}, target {rec_cfg.target}, "
          f"{rec_cfg.steps_per_block} steps x {rec_cfg.batch_size} windows per block, lr {rec_cfg.lr:g}; {q.evaluation()}",
          file=sys.stderr)
    dense = q.ppl(q.base.model)
    print(f"  dense ppl {dense:.2f}", file=sys.stderr)
    rows = []
    for setting in args.settings.split(","):
        pattern = setting if ":" in setting else "unstructured"
        sparsity = None if ":" in setting else float(setting)
        row = {"setting": setting}
        for method in args.methods.split(","):
            ckpt, _, _ = q.pruned(PruneConfig(method, sparsity=sparsity, pattern=pattern, seqlen=args.seqlen))
            row[method] = q.ppl(ckpt.model)
            start = time.time()
            outcome = reconstruct(ckpt, q.base.model, q.tokens, rec_cfg)
            row[f"{method}_s"] = time.time() - start
            row[f"{method}+rec"] = q.ppl(ckpt.model)
            mse = " ".join(f"{b.mse_before:.3g}->{b.mse_after:.3g}{'(restored)' if b.restored else ''}" for b in outcome.blocks)
            print(f"  {method:10s} {setting:5s} ppl {row[method]:8.2f} -> {row[f'{method}+rec']:8.2f} "
                  f"({row[f'{method}_s']:.0f}s; block MSE {mse})", file=sys.stderr)
        rows.append(row)

    methods = args.methods.split(",")
    header = " | ".join(f"{m} | {m} + reconstruct" for m in methods)
    print(f"| sparsity | dense | {header} |")
    print("|---|---:|" + "---:|---:|" * len(methods))
    for row in rows:
        cells = " | ".join(f"{row[m]:.2f} | {row[m + '+rec']:.2f}" for m in methods)
        print(f"| {row['setting']} | {dense:.2f} | {cells} |")
    seconds = [row[f"{m}_s"] for row in rows for m in methods]
    print(f"\nreconstruction time per run: {min(seconds):.0f}-{max(seconds):.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
