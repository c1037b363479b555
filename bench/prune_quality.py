"""WikiText-2 perplexity of every pruning method on a real checkpoint (default tiny-opt).

    python bench/prune_quality.py                  # ../shared/models/tiny-opt, ../shared/data
    python bench/prune_quality.py --windows 20     # quicker

Calibration: `--nsamples` windows of `--seqlen` tokens from the local C4 sample (the
references' recipe: a random document longer than seqlen, a random window in it).
Evaluation: the WikiText-2 test rows joined with "\\n\\n", the first `--windows`
non-overlapping windows of `--eval-seqlen` tokens (`perp_cli.perplexity`).
"""

from __future__ import annotations

import sys

from common import quality_parser, quality_setup


def main() -> None:
    parser = quality_parser(__doc__, nsamples=64, seqlen=256)
    parser.add_argument("--methods", default="magnitude,random,wanda,sparsegpt")
    parser.add_argument("--settings", default="0.5,0.7,2:4", help="sparsities and/or N:M patterns")
    args = parser.parse_args()
    q = quality_setup(args)
    from perp_cli.pruner import PruneConfig

    print(f"{q.calibration()}; {q.evaluation()}", file=sys.stderr)
    rows = [("dense", "-", q.ppl(q.base.model), 0.0)]
    for setting in args.settings.split(","):
        pattern = setting if ":" in setting else "unstructured"
        sparsity = None if ":" in setting else float(setting)
        for method in args.methods.split(","):
            ckpt, _, seconds = q.pruned(PruneConfig(method, sparsity=sparsity, pattern=pattern, seqlen=args.seqlen))
            rows.append((method, setting, q.ppl(ckpt.model), seconds))
            print(f"  {method:10s} {setting:5s} ppl {rows[-1][2]:9.2f}  ({rows[-1][3]:.1f}s)", file=sys.stderr)

    print("| method | sparsity | WikiText-2 ppl | prune time (s) |\n|---|---|---:|---:|")
    for method, setting, value, seconds in rows:
        print(f"| {method} | {setting} | {value:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
