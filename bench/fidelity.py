"""perp's choices against the references' on a real checkpoint (docs/fidelity.md).

    python bench/fidelity.py                       # all sections, ../shared/models/tiny-opt
    python bench/fidelity.py --sections interleaved --windows 0   # one section, full WikiText-2

Sections (WikiText-2 test perplexity at `--eval-seqlen`, first `--windows` windows; 0 = all):

* `sparsegpt`:   SparseGPT 50% and 2:4 with the reference's block rule (`--sparsegpt-selection
                 reference`, the default) and with exact counts (`exact`);
* `wanda-scope`: Wanda 50% per output row (the Wanda paper, perp's default) vs per matrix
                 (PERP's code, `--recipe paper`);
* `interleaved`: Wanda 50% then reconstruction (split: `perp prune` + `perp reconstruct`) vs
                 pruning each block right before reconstructing it (`perp reconstruct
                 --prune-method`, PERP's order), under `--recipe perp` and `--recipe paper`;
* `retrain`:     Wanda 50% retrained with `--recipe perp` (biases+norms, random windows) vs
                 `--recipe paper` (biases+norms+lm_head LoRA+MaskLoRA, padded documents,
                 batch 1 x 2), both for `--retrain-steps` optimizer steps; MaskLoRA merged.

Calibration: `--nsamples` windows of `--seqlen` tokens from the local C4 sample, seed 0,
the same windows for every pruning and reconstruction.
"""

from __future__ import annotations

import copy
import time

import torch

from common import quality_parser


def main() -> None:
    parser = quality_parser(__doc__, nsamples=128, seqlen=512)
    parser.add_argument("--retrain-steps", type=int, default=100)
    parser.add_argument("--sections", default="sparsegpt,wanda-scope,interleaved,retrain")
    parser.add_argument("--recipes", default="perp,paper", help="recipes of the interleaved and retrain sections")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from perp_cli import adapters, arch, checkpoint, data
    from perp_cli.perplexity import eval_token_ids, perplexity
    from perp_cli.pruner import PruneConfig, prune
    from perp_cli.reconstruction import RECIPES as REC_RECIPES
    from perp_cli.reconstruction import ReconstructConfig, reconstruct
    from perp_cli.recipes.retrain import RECIPES as RETRAIN_RECIPES
    from perp_cli.recipes.retrain import RetrainOptions, retrain
    from perp_cli.training import TrainConfig

    base = checkpoint.open(args.model, need_tokenizer=True)
    source = data.load_source(args.calib)
    tokens = data.sample_windows(base.tokenizer, source, args.nsamples, args.seqlen, seed=0)
    eval_ids = eval_token_ids(base.tokenizer, data.load_source(args.eval, split="test"), args.eval_seqlen)
    limit = args.windows or None

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, eval_ids, args.eval_seqlen, 8, max_windows=limit, quiet=True).ppl

    def pruned(**kw):
        ckpt = copy.deepcopy(base)
        masks, results, _ = prune(ckpt, PruneConfig(**kw), tokens=tokens)
        ckpt.masks = masks
        return ckpt, results

    rows: list[tuple[str, str, float, str]] = []

    def row(section: str, what: str, value: float, note: str = "") -> None:
        rows.append((section, what, value, note))
        print(f"{section:12s} {what:58s} {value:9.3f}  {note}", flush=True)

    sections = args.sections.split(",")
    print(f"model {args.model}: {args.nsamples} x {args.seqlen} C4 windows (seed 0); WikiText-2 at {args.eval_seqlen}, "
          f"{'all' if limit is None else limit} windows")
    row("dense", "dense", ppl(base.model))

    if "sparsegpt" in sections:
        for pattern in ("unstructured", "2:4"):
            for selection in ("reference", "exact") if pattern == "unstructured" else ("reference",):
                start = time.perf_counter()
                ckpt, results = pruned(method="sparsegpt", pattern=pattern, sparsegpt_selection=selection)
                row("sparsegpt", f"{pattern} --sparsegpt-selection {selection}", ppl(ckpt.model),
                    f"sparsity {results['sparsity_achieved']['pruned_tensors']:.4%}, {time.perf_counter() - start:.0f}s")

    if "wanda-scope" in sections:
        for scope in ("row", "matrix"):
            ckpt, _ = pruned(method="wanda", scope=scope)
            row("wanda-scope", f"wanda 50% --scope {scope}", ppl(ckpt.model))

    if "interleaved" in sections:
        for recipe in args.recipes.split(","):
            cfg = ReconstructConfig(**REC_RECIPES[recipe])
            scope = "matrix" if recipe == "paper" else None
            split, _ = pruned(method="wanda", scope=scope)
            start = time.perf_counter()
            reconstruct(split, base.model, tokens, cfg)
            row("interleaved", f"wanda 50% split (prune, then reconstruct), --recipe {recipe}", ppl(split.model),
                f"{time.perf_counter() - start:.0f}s")
            inter = copy.deepcopy(base)
            start = time.perf_counter()
            reconstruct(inter, None, tokens, cfg, prune=PruneConfig(method="wanda", scope=scope, batch_size=cfg.batch_size))
            row("interleaved", f"wanda 50% interleaved (--prune-method), --recipe {recipe}", ppl(inter.model),
                f"{time.perf_counter() - start:.0f}s")

    if "retrain" in sections:
        for recipe in args.recipes.split(","):
            preset = RETRAIN_RECIPES[recipe]
            ckpt, _ = pruned(method="wanda")
            cfg = TrainConfig(steps=args.retrain_steps, batch_size=preset["batch_size"], grad_accum=preset["grad_accum"])
            needed = cfg.steps * cfg.batch_size * cfg.grad_accum
            if preset["data_mode"] == "documents":
                windows = data.document_windows(base.tokenizer, source, needed, args.seqlen, seed=0)
            else:
                windows = data.sample_windows(base.tokenizer, source, needed, args.seqlen, seed=0)
            opts = RetrainOptions(train=preset["train"], adapter=preset["adapter"])
            start = time.perf_counter()
            outcome = retrain(ckpt, opts, cfg, windows, quiet=True)
            for name, adapter in outcome.adapters.items():  # `perp merge`: MaskLoRA under the mask
                matrix = next(m for m in arch.matrices(ckpt.model) if m.key == name)
                adapter.merge(matrix)
            adapters.detach(ckpt.model)
            real = int((windows != data.PAD).sum())
            row("retrain", f"wanda 50% + retrain --recipe {recipe} ({args.retrain_steps} steps)", ppl(ckpt.model),
                f"{real:,} real tokens, {outcome.results['trainable_parameters']:,} trainable, {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
