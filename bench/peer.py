"""perp against the peer users pick today: llm-compressor's `oneshot` SparseGPT.

    python bench/peer.py --peer-python /work/venv-peer/bin/python      # tiny-opt, 50%, 32 x 256 C4 tokens
    python bench/peer.py --peer-python ... --nsamples 128 --seqlen 512   # more calibration
    python bench/peer.py                                                 # no peer given or found: says so, exits 0

llm-compressor pins an older transformers than perp, so it lives in its own virtual
environment (docs/peer.md says how to install it); this script
runs it there with that environment's interpreter (`--peer-python`, default
`$PERP_PEER_PYTHON`). When the peer is not installed the script prints why and exits 0
(it is optional).

One run, the same inputs for both:

1. the calibration windows are sampled once, by perp (C4 sample, `--nsamples` x
   `--seqlen`, seed 0), and saved as token ids to a file both sides read;
2. perp prunes the checkpoint with SparseGPT (50% unstructured, damp 0.01, blocks of 128
   columns, block by block with pruned outputs feeding the next block) in a fresh child
   process of this interpreter: `perp_cli.pruner.prune` with those token ids, then
   `checkpoint.save`;
3. llm-compressor prunes the same checkpoint with `oneshot(recipe=SparseGPTModifier(
   sparsity=0.5, dampening_frac=0.01, block_size=128, ignore=["lm_head"]),
   pipeline="sequential")` on a dataset holding those token ids, in a fresh child of the
   peer's interpreter, then `save_pretrained(save_compressed=False)`;
4. both outputs are scored by the same evaluator (`perp eval`, WikiText-2 test, the first
   `--eval-windows` windows of `--eval-seqlen` tokens) and their sparsity counted from
   the written weights.

Each child reports its own wall time for the pruning call (model load to saved output,
`prune s`) and the process's peak RSS (`ru_maxrss` from `os.wait4`); the table puts
perp / peer ratios beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import C4_SAMPLE, TINY_OPT, WIKITEXT2_TEST, run_measured, scratch

# The peer's side, run by the peer's interpreter (`python -c PEER_CODE MODEL TOKENS OUT SPARSITY`).
PEER_CODE = r"""
import json, sys, time
start = time.perf_counter()
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier
import llmcompressor
model_dir, tokens_file, out, sparsity = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ids = load_file(tokens_file)["input_ids"]
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
imported = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
recipe = SparseGPTModifier(sparsity=sparsity, dampening_frac=0.01, block_size=128, mask_structure="0:0",
                           targets=["Linear"], ignore=["re:.*lm_head"])
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False, pipeline="sequential", batch_size=1)
model.save_pretrained(out, save_compressed=False)
done = time.perf_counter()
print(json.dumps({"prune_s": done - imported, "total_s": done - start, "version": llmcompressor.__version__}))
"""


def perp_child(model: str, tokens_file: str, out: str, sparsity: float) -> None:
    """`--perp-child`: perp's side, in this interpreter (a fresh process)."""
    start = time.perf_counter()
    from safetensors.torch import load_file

    from perp_cli import checkpoint
    from perp_cli.manifest import StepRecord
    from perp_cli.pruner import PruneConfig, prune

    tokens = load_file(tokens_file)["input_ids"]
    imported = time.perf_counter()
    config = PruneConfig("sparsegpt", sparsity=sparsity, damp=0.01, blocksize=128, nsamples=tokens.shape[0],
                         seqlen=tokens.shape[1], batch_size=1, device="cpu")
    ckpt = checkpoint.open(model, device="cpu")
    masks, results, data = prune(ckpt, config, tokens=tokens)
    step = StepRecord("prune", args={"method": "sparsegpt", "sparsity": sparsity, "model": model}, input=model, seed=0)
    step.data, step.results = data, results
    checkpoint.save(out, ckpt.model, ckpt.tokenizer, masks, manifest_in=ckpt.manifest, step=step)
    done = time.perf_counter()
    import perp_cli

    print(json.dumps({"prune_s": done - imported, "total_s": done - start, "version": perp_cli.__version__}))


def sample_tokens(model: str, calib: str, nsamples: int, seqlen: int, file: Path) -> None:
    """The calibration windows, sampled once by perp, saved as `input_ids` [n, seqlen]."""
    from safetensors.torch import save_file

    from perp_cli import data
    from perp_cli.checkpoint import _load_tokenizer

    tokenizer = _load_tokenizer(model, False, True)
    source = data.load_source(calib, split="train")
    tokens = data.sample_windows(tokenizer, source, nsamples, seqlen, seed=0)
    save_file({"input_ids": tokens.contiguous()}, str(file))


def written_sparsity(directory: Path) -> float:
    """Zeros among the decoder blocks' 2-D weights, counted from the written file(s)."""
    import glob

    import torch
    from safetensors.torch import load_file

    zeros = total = 0
    for f in sorted(glob.glob(str(directory / "model*.safetensors"))):
        for name, t in load_file(f).items():
            if t.dim() == 2 and ".layers." in name and name.endswith(".weight"):
                zeros += int((t == 0).sum())
                total += t.numel()
    return zeros / total if total else float("nan")


def perplexity(directory: Path, wiki: str, seqlen: int, windows: int | None) -> float:
    from perp_cli.cli.app import main as perp_main

    out = directory.parent / f"{directory.name}-eval.json"
    limit = ["--max-windows", str(windows)] if windows else []
    code = perp_main(["eval", str(directory), "--dataset", wiki, "--seqlen", str(seqlen), *limit, "-o", str(out), "-q"])
    if code:
        raise SystemExit(f"perp eval {directory} failed with exit code {code}")
    return _find_ppl(json.loads(out.read_text()))


def _find_ppl(report: dict) -> float:
    """The perplexity in `perp eval -o` JSON: results[0].perplexity.<dataset>.ppl."""
    try:
        return float(next(iter(report["results"][0]["perplexity"].values()))["ppl"])
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return float("nan")


def peer_available(python: str | None) -> str | None:
    """None when `python` can import llmcompressor, else the reason it cannot be used."""
    if not python:
        return "no peer interpreter: pass --peer-python /path/to/venv/bin/python (or set PERP_PEER_PYTHON)"
    if not Path(python).exists():
        return f"{python} does not exist"
    check = subprocess.run([python, "-c", "import llmcompressor, transformers, torch; print(llmcompressor.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"{python} cannot import llmcompressor ({last})"
    return None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--perp-child":
        perp_child(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=os.environ.get("PERP_PEER_PYTHON"),
                        help="interpreter of the environment where llmcompressor is installed (default $PERP_PEER_PYTHON)")
    parser.add_argument("--model", default=str(TINY_OPT), help="checkpoint both prune (default ../shared/models/tiny-opt)")
    parser.add_argument("--calib", default=str(C4_SAMPLE), help="calibration text (default the C4 sample in ../shared)")
    parser.add_argument("--eval-data", default=str(WIKITEXT2_TEST), help="perplexity text (default WikiText-2 test in ../shared)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--eval-windows", type=int, default=100, help="perplexity windows scored (0: all of WikiText-2 test)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity")
    parser.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: a temp dir, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    args = parser.parse_args()

    reason = peer_available(args.peer_python)
    if reason:
        print(f"peer comparison skipped: {reason}. Install llm-compressor in its own environment "
              "(docs/peer.md) and pass its interpreter with --peer-python.")
        return
    for what, path in (("--model", args.model), ("--calib", args.calib), ("--eval-data", args.eval_data)):
        if not Path(path).exists():
            print(f"peer comparison skipped: {what} {path} does not exist (../shared missing? set PERP_SHARED)")
            return

    with scratch("perp-peer-", args.workdir, args.keep) as work:
        tokens = work / "calibration.safetensors"
        sample_tokens(args.model, args.calib, args.nsamples, args.seqlen, tokens)
        rows = {}
        sides = {
            "perp": [sys.executable, __file__, "--perp-child", args.model, str(tokens), str(work / "perp"), str(args.sparsity)],
            "llm-compressor": [args.peer_python, "-c", PEER_CODE, args.model, str(tokens), str(work / "peer"), str(args.sparsity)],
        }
        for side, argv in sides.items():
            print(f"{side}: SparseGPT {args.sparsity:.0%} on {args.nsamples} x {args.seqlen} tokens ...", file=sys.stderr, flush=True)
            child = run_measured(argv, {"TOKENIZERS_PARALLELISM": "false"})
            if child.code != 0:
                sys.stderr.write(child.stderr[-3000:])
                raise SystemExit(f"{side} failed with exit code {child.code}")
            report = json.loads(child.stdout.strip().splitlines()[-1])
            rows[side] = {"prune_s": report["prune_s"], "process_s": child.seconds, "peak_mib": child.peak_mib, "version": report["version"]}
        for f in Path(args.model).glob("tokenizer*"):  # the peer's oneshot saves no tokenizer; the evaluator needs one
            shutil.copy(f, work / "peer" / f.name)
        for side, out in (("perp", work / "perp"), ("llm-compressor", work / "peer")):
            print(f"evaluating {side} ...", file=sys.stderr, flush=True)
            rows[side]["ppl"] = perplexity(out, args.eval_data, args.eval_seqlen, args.eval_windows)
            rows[side]["sparsity"] = written_sparsity(out)
        dense_ppl = perplexity(Path(args.model), args.eval_data, args.eval_seqlen, args.eval_windows) if (Path(args.model) / "config.json").exists() else float("nan")

        perp, peer = rows["perp"], rows["llm-compressor"]
        print()
        print(f"model: {args.model}; SparseGPT {args.sparsity:.0%} unstructured, damp 0.01, blocks of 128 columns; "
              f"calibration {args.nsamples} x {args.seqlen} tokens (the same ids for both); "
              f"WikiText-2 test, {args.eval_windows or 'all'} windows of {args.eval_seqlen}; dense perplexity {dense_ppl:.2f}")
        print(f"perp {perp['version']}; llm-compressor {peer['version']} (its own environment: {args.peer_python})")
        print()
        print("| | perp | llm-compressor | perp / llm-compressor |")
        print("|---|---:|---:|---:|")
        for key, label, fmt in (("prune_s", "prune wall time, load to saved output (s)", "{:.1f}"),
                                ("process_s", "process wall time, with imports (s)", "{:.1f}"),
                                ("peak_mib", "peak RSS of the process (MiB)", "{:.0f}"),
                                ("ppl", "WikiText-2 perplexity", "{:.2f}"),
                                ("sparsity", "sparsity of the block matrices", "{:.4f}")):
            ratio = perp[key] / peer[key] if peer[key] else float("nan")
            print(f"| {label} | {fmt.format(perp[key])} | {fmt.format(peer[key])} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
