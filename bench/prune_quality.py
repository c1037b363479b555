"""WikiText-2 perplexity of every pruning method on a real checkpoint (default tiny-opt).

    python bench/prune_quality.py                  # ../shared/models/tiny-opt, ../shared/data
    python bench/prune_quality.py --windows 20     # quicker

Calibration: `--nsamples` windows of `--seqlen` tokens from the local C4 sample (the
references' recipe: a random document longer than seqlen, a random window in it).
Evaluation: the WikiText-2 test rows joined with "\\n\\n", the first `--windows`
non-overlapping windows of `--eval-seqlen` tokens (`perp_cli.perplexity`).
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from quality_args import quality_parser


def main() -> None:
    parser = quality_parser(__doc__, nsamples=64, seqlen=256)
    parser.add_argument("--methods", default="magnitude,random,wanda,sparsegpt")
    parser.add_argument("--settings", default="0.5,0.7,2:4", help="sparsities and/or N:M patterns")
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
    rows = [("dense", "-", ppl(base.model), 0.0)]
    for setting in args.settings.split(","):
        pattern = setting if ":" in setting else "unstructured"
        sparsity = None if ":" in setting else float(setting)
        for method in args.methods.split(","):
            ckpt = copy.deepcopy(base)
            start = time.time()
            prune(ckpt, PruneConfig(method, sparsity=sparsity, pattern=pattern, seqlen=args.seqlen), tokens=tokens)
            seconds = time.time() - start
            rows.append((method, setting, ppl(ckpt.model), seconds))
            print(f"  {method:10s} {setting:5s} ppl {rows[-1][2]:9.2f}  ({rows[-1][3]:.1f}s)", file=sys.stderr)

    print("| method | sparsity | WikiText-2 ppl | prune time (s) |\n|---|---|---:|---:|")
    for method, setting, value, seconds in rows:
        print(f"| {method} | {setting} | {value:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
