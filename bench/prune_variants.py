"""WikiText-2 perplexity of OWL, RIA (+ channel permutation) and DSnoT against their
baselines, on a real checkpoint (default tiny-opt; `--model ../shared/models/stories260K`).

    python bench/prune_variants.py
    python bench/prune_variants.py --model ../shared/models/stories260K --seqlen 256

Each row prunes a copy of the dense model with `perp_cli.pruner.prune` on the same
calibration windows (local C4 sample) and evaluates the first `--windows` WikiText-2
test windows (`perp_cli.perplexity`). Rows come in pairs: the baseline, then the variant.
"""

from __future__ import annotations

import sys

from common import quality_parser, quality_setup

# (label, PruneConfig keyword arguments); each variant follows its baseline
ROWS: list[tuple[str, dict]] = [
    ("wanda 70% uniform", dict(method="wanda", sparsity=0.7)),
    ("wanda 70% owl", dict(method="wanda", sparsity=0.7, allocation="owl")),
    ("sparsegpt 70% uniform", dict(method="sparsegpt", sparsity=0.7)),
    ("sparsegpt 70% owl", dict(method="sparsegpt", sparsity=0.7, allocation="owl")),
    ("wanda 50%", dict(method="wanda", sparsity=0.5)),
    ("ria 50%", dict(method="ria", sparsity=0.5)),
    ("wanda 2:4", dict(method="wanda", pattern="2:4")),
    ("ria 2:4", dict(method="ria", pattern="2:4")),
    ("ria 2:4 + permute", dict(method="ria", pattern="2:4", permute=True)),
    ("wanda 60%", dict(method="wanda", sparsity=0.6)),
    ("wanda 60% + dsnot", dict(method="wanda", sparsity=0.6, refine="dsnot")),
    ("wanda 60% + dsnot (all matrices)", dict(method="wanda", sparsity=0.6, refine="dsnot", refine_skip="none")),
    ("wanda 60% + dsnot (5 iterations)", dict(method="wanda", sparsity=0.6, refine="dsnot", refine_iters=5)),
    ("wanda 70%", dict(method="wanda", sparsity=0.7)),
    ("wanda 70% + dsnot", dict(method="wanda", sparsity=0.7, refine="dsnot")),
    ("wanda 70% + dsnot (all matrices)", dict(method="wanda", sparsity=0.7, refine="dsnot", refine_skip="none")),
    ("wanda 70% + dsnot (5 iterations)", dict(method="wanda", sparsity=0.7, refine="dsnot", refine_iters=5)),
]


def main() -> None:
    parser = quality_parser(__doc__, nsamples=64, seqlen=256)
    parser.add_argument("--rows", default="", help="comma-separated row labels (default: all)")
    args = parser.parse_args()
    q = quality_setup(args)
    from perp_cli.pruner import PruneConfig

    print(f"{q.calibration()}; {q.evaluation()}", file=sys.stderr)
    wanted = set(filter(None, args.rows.split(",")))
    rows = [("dense", q.ppl(q.base.model), 0.0, "")]
    for label, kwargs in ROWS:
        if wanted and label not in wanted:
            continue
        ckpt, results, seconds = q.pruned(PruneConfig(seqlen=args.seqlen, skip_indivisible=True, **kwargs))
        achieved = results["sparsity_achieved"]["pruned_tensors"]
        rows.append((label, q.ppl(ckpt.model), seconds, f"{achieved:.4f}"))
        print(f"  {label:34s} ppl {rows[-1][1]:9.2f}  sparsity {achieved:.4f} ({seconds:.1f}s)", file=sys.stderr)

    print("| setting | WikiText-2 ppl | achieved sparsity | prune time (s) |\n|---|---:|---:|---:|")
    for label, value, seconds, achieved in rows:
        print(f"| {label} | {value:.2f} | {achieved} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
