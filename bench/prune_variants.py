"""WikiText-2 perplexity of OWL, RIA (+ channel permutation) and DSnoT against their
baselines, on a real checkpoint (default tiny-opt; `--model ../shared/models/stories260K`).

    python bench/prune_variants.py
    python bench/prune_variants.py --model ../shared/models/stories260K --seqlen 256

Each row prunes a copy of the dense model with `perp_cli.pruner.prune` on the same
calibration windows (local C4 sample) and evaluates the first `--windows` WikiText-2
test windows (`perp_cli.perplexity`). Rows come in pairs: the baseline, then the variant.
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from quality_args import quality_parser

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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from perp_cli import checkpoint, data
    from perp_cli.perplexity import eval_token_ids, perplexity
    from perp_cli.pruner import PruneConfig, prune

    base = checkpoint.load(args.model, need_tokenizer=True)
    ids = eval_token_ids(base.tokenizer, data.load_source(args.eval), args.eval_seqlen)
    probe = PruneConfig("wanda", calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
    tokens, record = data.calibration(base.require_tokenizer(), base.model, probe, probe.seed)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, ids, args.eval_seqlen, batch_size=8, max_windows=args.windows).ppl

    print(f"model {args.model}; calibration {record['source']} {list(tokens.shape)} sha256 {record['token_ids_sha256'][:12]}; "
          f"eval WikiText-2 test, first {args.windows} windows of {args.eval_seqlen}", file=sys.stderr)
    wanted = set(filter(None, args.rows.split(",")))
    rows = [("dense", ppl(base.model), 0.0, "")]
    for label, kwargs in ROWS:
        if wanted and label not in wanted:
            continue
        ckpt = copy.deepcopy(base)
        start = time.time()
        config = PruneConfig(seqlen=args.seqlen, skip_indivisible=True, **kwargs)
        _, results, _ = prune(ckpt, config, tokens=tokens)
        seconds = time.time() - start
        achieved = results["sparsity_achieved"]["pruned_tensors"]
        rows.append((label, ppl(ckpt.model), seconds, f"{achieved:.4f}"))
        print(f"  {label:34s} ppl {rows[-1][1]:9.2f}  sparsity {achieved:.4f} ({seconds:.1f}s)", file=sys.stderr)

    print("| setting | WikiText-2 ppl | achieved sparsity | prune time (s) |\n|---|---:|---:|---:|")
    for label, value, seconds, achieved in rows:
        print(f"| {label} | {value:.2f} | {achieved} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
