"""Peak host memory of `perp reconstruct` and `perp merge`, streamed against in memory.

    python bench/stream_memory.py                      # 8 blocks, hidden 1024, fp32 (~640 MiB of weights)
    python bench/stream_memory.py --layers 16          # deeper: the streamed peak should not move
    python bench/stream_memory.py --only merge         # one of the two commands
    python bench/stream_memory.py --layers 22 --hidden 2048 --intermediate 5632 --heads 32 --kv-heads 4 --shard-size 2000000000
                                                       # TinyLlama-1.1B shapes (the in-memory goal: <= 1.15x)

A LLaMA-shaped model with random float32 weights is written shard by shard
(`bench/prune_memory.py`'s `write_model`), pruned to 50% by magnitude with
`--streaming on`, and given MaskLoRA adapters by a one-step `perp retrain` (setup, not
measured). Then each measured command runs twice in a fresh child process, with
`--streaming off` and `--streaming on`, and the table shows each child's peak RSS
(`ru_maxrss`, and `VmHWM` as a cross-check) next to the size of the weights. The two
outputs of each command are compared tensor by tensor: they must be bit-identical.
Everything is deleted afterwards unless `--keep`.

In memory (`--streaming off`) the goal is a peak of at most 1.15 x (the weights the
command must hold + its activations), as `bench/prune_memory.py`'s `held_terms` counts
them: for `reconstruct` the pruned model and its dense reference (two models) plus three
copies of nsamples x seqlen x hidden x 4 bytes (inputs, dense targets, outputs), for
`merge` one model and its adapters plus the logits probe's two logits tensors.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import prune_memory  # write_model, run_child: the same model and measurement
from common import ROOT, scratch

CORPUS = ROOT / "perp_cli" / "demo" / "corpus.txt"


def same_tensors(a: Path, b: Path) -> bool:
    """Every weight tensor of two checkpoints equal, bit for bit (in a child: this process never imports torch)."""
    code = (
        "import glob, sys, torch\nfrom safetensors.torch import load_file\n"
        "def w(d):\n    out = {}\n    [out.update(load_file(f)) for f in sorted(glob.glob(d + '/model*.safetensors'))]\n    return out\n"
        "a, b = w(sys.argv[1]), w(sys.argv[2])\n"
        "print(int(a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "1"


def perp(*args: str) -> None:
    """A setup step (not measured)."""
    code, _, _, _, _ = prune_memory.run_child(["perp", *args])
    if code != 0:
        raise SystemExit(f"setup step `perp {args[0]}` failed with exit code {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder blocks")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=2816, help="MLP size")
    parser.add_argument("--heads", type=int, default=16, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=16, help="key/value heads")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (embeddings and an untied head)")
    parser.add_argument("--shard-size", type=int, default=200_000_000, help="bytes per input and output shard")
    parser.add_argument("--nsamples", type=int, default=16, help="reconstruction calibration windows")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per window")
    parser.add_argument("--steps", type=int, default=5, help="reconstruction steps per block")
    parser.add_argument("--only", choices=["reconstruct", "merge"], default=None, help="measure one command only")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    args = parser.parse_args()

    with scratch("perp-stream-memory-", args.workdir, args.keep) as work:
        dense, pruned, adapted = work / "dense", work / "pruned", work / "adapted"
        dense.mkdir()
        params, on_disk = prune_memory.write_model_in_child(dense, args)
        shard = ["--max-shard-size", str(args.shard_size)]
        print(f"model: {params / 1e6:.0f}M parameters, {on_disk / 2**20:.0f} MiB float32; setting up ...", file=sys.stderr, flush=True)
        perp("prune", str(dense), "-o", str(pruned), "--method", "magnitude", "--sparsity", "0.5", "--streaming", "on", *shard, "-q")
        calib = ["--calib", str(CORPUS), "--calib-concat", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                 "--batch-size", "4", "--device", "cpu", "-q"]
        commands = {
            "reconstruct": ["reconstruct", str(pruned), "--dense", str(dense), *calib, "--steps-per-block", str(args.steps), "--train", "norms", *shard],
            "merge": ["merge", str(adapted), *shard, "-q"],
        }
        if args.only != "reconstruct":
            perp("retrain", str(pruned), "-o", str(adapted), "--train", "none", "--adapter", "masklora", "--data", str(CORPUS),
                 "--steps", "1", "--batch-size", "1", "--seqlen", "32", "--device", "cpu", "-q")
        _, baseline, _, _, _ = prune_memory.run_child(["import"])
        rows = []
        for name, argv in commands.items():
            if args.only and name != args.only:
                continue
            outs = {}
            for mode in ("off", "on"):
                out = work / f"{name}-{mode}"
                print(f"{name} --streaming {mode} ...", file=sys.stderr, flush=True)
                code, peak, hwm, seconds, _ = prune_memory.run_child(["perp", *argv, "-o", str(out), "--streaming", mode])
                if code != 0:
                    raise SystemExit(f"perp {name} --streaming {mode} failed with exit code {code}")
                outs[mode] = out
                rows.append((name, mode, peak, hwm, seconds))
            rows.append((name, "identical", same_tensors(outs["off"], outs["on"]), None, None))

        mib = 2**20
        print()
        print(f"model: LLaMA {args.layers} x (hidden {args.hidden}, mlp {args.intermediate}), vocab {args.vocab}: "
              f"{params / 1e6:.0f}M parameters, {on_disk / mib:.0f} MiB float32 on disk; imports alone {baseline:.0f} MiB")
        print(f"reconstruct: --train norms + MaskLoRA, {args.nsamples} x {args.seqlen} tokens, {args.steps} steps per block; "
              f"merge: MaskLoRA r16 on every matrix")
        print()
        adapters = (adapted / "adapters.safetensors").stat().st_size if adapted.exists() else 0
        held = {name: sum(prune_memory.held_terms(name, on_disk, args.hidden, args.nsamples * args.seqlen, args.vocab, adapters))
                for name in commands}  # what an in-memory run must hold (prune_memory.held_terms)
        print("| command | streaming | peak RSS, ru_maxrss (MiB) | VmHWM (MiB) | peak / weights of one model | "
              "peak / (weights held + activations) | in-memory goal <= 1.15 | wall time (s) |")
        print("|---|---|---:|---:|---:|---:|---|---:|")
        for name, mode, peak, hwm, seconds in rows:
            if mode == "identical":
                print(f"| {name} | outputs bit-identical: {'yes' if peak else 'NO'} | | | | | | |")
            else:
                whole = peak * mib / held[name]
                goal = ("met" if whole <= 1.15 else "missed") if mode == "off" else ""
                print(f"| {name} | {mode} | {peak:.0f} | {hwm or 0:.0f} | {peak * mib / on_disk:.2f} | {whole:.3f} | {goal} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
