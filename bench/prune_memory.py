"""Peak host memory of streamed pruning against the model's size on disk.

    python bench/prune_memory.py                    # ~1.1B LLaMA (TinyLlama shapes), float32 ~4.4 GB, Wanda 128 x 512
    python bench/prune_memory.py --nsamples 16      # the same model, fewer calibration tokens (faster)
    python bench/prune_memory.py --layers 2 --hidden 512 --intermediate 1408 --nsamples 8 --seqlen 128   # a quick look
    python bench/prune_memory.py --runs stream,disk,memory   # also prune without streaming, for comparison
    python bench/prune_memory.py --runs disk        # only the streamed run with the activations on disk
    python bench/prune_memory.py --runs memory --methods wanda,sparsegpt --nsamples 32 --seqlen 256   # in memory: goal <= 1.15x
    python bench/prune_memory.py --runs stream --vocabs 32000,128256 --layers 4   # streamed peak against the vocabulary
    python bench/prune_memory.py --runs memory --commands reconstruct,merge --nsamples 8 --seqlen 128   # the other two in memory

The model is a LLaMA built from a config and written to disk in float32, sharded
(`--shard-size`), without ever holding the whole model: the tensor names and shapes come
from a meta-device skeleton, and each shard's random tensors are generated and written
with `safetensors.torch.save_file`, one shard at a time. The tokenizer is perp's byte
tokenizer (ids < 320 are valid ids of any vocabulary); calibration text is C4 from
../shared when present, else the demo corpus.

`perp prune --streaming on` then runs in a fresh process, and its peak RSS
(`ru_maxrss` of that child, from `os.wait4`) is compared with the size of the weights on
disk. On Linux `exec` carries the parent's RSS high-water mark into the child's
`ru_maxrss`, so this parent stays small (it never imports torch; the model is written by
another subprocess), and the child also reports its own `VmHWM` (peak RSS of its address
space since exec) as a cross-check. The goal is a peak under a quarter of the model. The expected peak is the
Python/torch baseline + one block + the calibration activations (nsamples x seqlen x
hidden x 4 bytes, one copy) + micro-batch temporaries + the bit-packed masks; the table
shows these terms next to the measurement. A second streamed run adds `--offload-dir`
(the activations wait on disk, one micro-batch in memory at a time), which removes the
activation term. Everything is deleted afterwards unless `--keep`.

In memory (`--runs memory`, `--streaming off`) the goal is a peak of at most 1.15 x the
weights (in the working dtype) + the calibration activations (nsamples x seqlen x hidden
x 4 bytes); the table shows peak / (weights + activations) for each `--methods` entry.

`--commands prune,reconstruct,merge` measures `perp reconstruct` and `perp merge` the same
way (each `--runs` entry; merge has no activations to put on disk, so no `disk` run). Their
inputs are set up first and not measured: the model pruned to 50% by magnitude
(streamed), and for merge that checkpoint with MaskLoRA adapters (r16 on every matrix)
from a one-step `perp retrain` on one 32-token window. Reconstruct runs the real path as
cheaply as it goes: `--train norms` + MaskLoRA, `--steps-per-block 1`, the calibration
windows of `--nsamples`/`--seqlen`. What each command must hold (`held_terms`; the table
prints both terms and peak / their sum):

- prune: weights = the model; activations = one copy of the calibration hidden states
  (nsamples x seqlen x hidden x 4 bytes).
- reconstruct (`--target dense`): weights = the pruned model and its dense reference, both
  in memory; activations = three copies (`reconstruction._Reconstructor.fit`: block i's
  inputs X_i, the dense targets T_i, and the trained block's outputs, the next inputs, are
  alive together in `block_error(..., keep_outputs=True)`).
- merge: weights = the model + its adapters (the size of adapters.safetensors);
  activations = the logits probe's two logits tensors (`merging.merge_attached`: the
  unmerged and the merged model's logits on `probe_batch`, 2 x 64 tokens x vocabulary x 4
  bytes).

`--vocabs 32000,128256` repeats every run with each vocabulary (same blocks; the model is
rewritten for each) and adds a table of the streamed peaks side by side: the embeddings
and an untied head are read and written a slice of rows at a time, and the embedding pass
holds only the rows of the calibration tokens, so the streamed peak should not move with
the vocabulary.
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

from common import C4_SAMPLE, ROOT, run_measured, scratch


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=2048, tie_word_embeddings=False, dtype="float32",
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def write_model(directory: Path, args: argparse.Namespace) -> tuple[int, int]:
    """Write config, tokenizer and random float32 weights shard by shard; return
    (parameters, bytes of weights on disk)."""
    import torch
    from safetensors.torch import save_file

    from perp_cli import streaming, tiny
    from perp_cli.shards import nbytes, plan_shards

    config = llama_config(args)
    skeleton = streaming.build_skeleton(config, torch.float32)
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in streaming.output_names(skeleton).items()}
    shards = plan_shards(layout, args.shard_size)
    files = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for file, names in zip(files, shards):
        tensors = {}
        for name in names:
            shape = layout[name][1]
            # norms start at one; matrices as transformers initialises them (normal, std 0.02)
            tensors[name] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
        print(f"  wrote {file} ({sum(nbytes(*layout[n]) for n in names) / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    total = sum(nbytes(*v) for v in layout.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(directory)
    tiny.build_tokenizer().save_pretrained(directory)
    return sum(p.numel() for p in skeleton.parameters()), total


def vm_hwm_mib() -> float | None:
    """This process's peak RSS since exec (Linux), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_sampler(period: float = 0.005) -> dict:
    """Sample this process's RSS every `period` s in a thread; the returned dict fills
    with the peak (MiB), the main thread's innermost perp frames at the peak, and a
    coarse timeline ((seconds, MiB) every 0.5 s): where the peak comes from."""
    import threading
    import traceback

    main_id = threading.main_thread().ident
    page = os.sysconf("SC_PAGE_SIZE") / 2**20
    out: dict = {"peak_mib": 0.0, "at_peak": [], "timeline": []}
    start = time.perf_counter()

    def run() -> None:
        statm = open("/proc/self/statm")
        last = -1.0
        while True:
            statm.seek(0)
            rss = int(statm.read().split()[1]) * page
            now = time.perf_counter() - start
            if rss > out["peak_mib"]:
                if rss > out["peak_mib"] + 1:  # a new peak by more than 1 MiB: remember where
                    frame = sys._current_frames().get(main_id)
                    stack = traceback.extract_stack(frame) if frame is not None else []
                    out["at_peak"] = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack
                                      if "perp_cli" in f.filename or "safetensors" in f.filename or "transformers" in f.filename][-6:]
                out["peak_mib"] = rss
            if now - last >= 0.5:
                out["timeline"].append((round(now, 1), round(rss)))
                last = now
            time.sleep(period)

    threading.Thread(target=run, daemon=True).start()
    return out


def child(argv: list[str]) -> None:
    """`--child perp ARGS`: run the perp CLI in this process, then report VmHWM (and, with
    PERP_BENCH_TIMELINE=1, the sampled RSS peak, the stack there and the timeline) on stderr."""
    if argv and argv[0] == "perp":
        from perp_cli.cli.app import main as perp_main

        sampled = rss_sampler() if os.environ.get("PERP_BENCH_TIMELINE") else None
        code = perp_main(argv[1:])
        if sampled is not None:
            print(json.dumps({"sampled": sampled}), file=sys.stderr, flush=True)
    else:  # `--child import`: the baseline, imports only
        import perp_cli.cli.app  # noqa: F401
        import perp_cli.streaming  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401

        code = 0
    print(json.dumps({"vm_hwm_mib": vm_hwm_mib()}), file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_child(argv: list[str]) -> tuple[int, float, float | None, float, str]:
    """Run `--child ARGV` in a fresh process; return its exit code, ru_maxrss (MiB),
    VmHWM (MiB), seconds and stdout."""
    child = run_measured([sys.executable, __file__, "--child", *argv], {"OMP_WAIT_POLICY": "PASSIVE"})
    hwm = None
    for line in child.stderr.splitlines():
        if line.startswith('{"vm_hwm_mib"'):
            hwm = json.loads(line)["vm_hwm_mib"]
        elif line.startswith('{"sampled"'):  # --timeline: the child's sampled peak, its stack and timeline
            sampled = json.loads(line)["sampled"]
            print(f"  sampled peak {sampled['peak_mib']:.0f} MiB at {' <- '.join(reversed(sampled['at_peak']))}\n"
                  f"  timeline (s, MiB): {sampled['timeline']}", file=sys.stderr, flush=True)
    if child.code != 0:
        sys.stderr.write(child.stderr[-2000:])
    return child.code, child.peak_mib, hwm, child.seconds, child.stdout


def write_model_in_child(directory: Path, args: argparse.Namespace) -> tuple[int, int]:
    """`write_model` in a subprocess (this process never imports torch); returns its
    parameter count and bytes on disk."""
    shape = {k: v for k, v in vars(args).items() if k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "shard_size")}
    written = subprocess.run([sys.executable, __file__, "--write-model", str(directory), json.dumps(shape)],
                             stdout=subprocess.PIPE, text=True, check=True)
    report = json.loads(written.stdout)
    return report["params"], report["bytes"]


PROBE_TOKENS = 2 * 64  # merging.probe_batch: 2 windows of 64 tokens


def held_terms(command: str, on_disk: int, hidden: int, tokens: int, vocab: int, adapters: int = 0) -> tuple[int, int]:
    """(weights, activations) in bytes that an in-memory `perp COMMAND` must hold (the
    module doc says where each term comes from); `tokens` = nsamples x seqlen."""
    one_copy = tokens * hidden * 4
    if command == "prune":
        return on_disk, one_copy
    if command == "reconstruct":
        return 2 * on_disk, 3 * one_copy
    if command == "merge":
        return on_disk + adapters, 2 * PROBE_TOKENS * vocab * 4
    raise ValueError(command)


def setup(*argv: str) -> None:
    """A setup step (not measured): `perp ARGV` in a child."""
    code, _, _, _, _ = run_child(["perp", *argv])
    if code != 0:
        raise SystemExit(f"setup step `perp {argv[0]}` failed with exit code {code}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--write-model":
        params, on_disk = write_model(Path(sys.argv[2]), argparse.Namespace(**json.loads(sys.argv[3])))
        print(json.dumps({"params": params, "bytes": on_disk}))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder blocks (default 22: TinyLlama-1.1B)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=5632, help="MLP size")
    parser.add_argument("--heads", type=int, default=32, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (embeddings and an untied head)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward micro-batch (perp's --batch-size)")
    parser.add_argument("--method", default="wanda", help="pruning method")
    parser.add_argument("--methods", default=None, help="comma list of pruning methods, each measured in turn (default: --method)")
    parser.add_argument("--vocabs", default=None, help="comma list of vocabulary sizes, each measured with the same blocks "
                        "(e.g. 32000,128256; default: --vocab)")
    parser.add_argument("--shard-size", type=int, default=2 * 10**9, help="bytes per input shard (default 2 GB)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the model (default: a temp dir in /tmp)")
    parser.add_argument("--runs", default="stream,disk", help="comma list of: stream (--streaming on), disk (--streaming on "
                        "--offload-dir: activations on disk), memory (--streaming off). Default: stream,disk")
    parser.add_argument("--commands", default="prune", help="comma list of the perp commands measured: prune, reconstruct "
                        "(--train norms + MaskLoRA, 1 step per block), merge (MaskLoRA r16). Default: prune")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--timeline", action="store_true", help="sample each run's RSS every 5 ms and print its timeline "
                        "and the perp frames at the peak (stderr)")
    args = parser.parse_args()
    if args.timeline:
        os.environ["PERP_BENCH_TIMELINE"] = "1"

    known = {"stream": ("on", "memory"), "disk": ("on", "disk"), "memory": ("off", "memory")}
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in known]
    if unknown:
        raise SystemExit(f"--runs: unknown run {unknown[0]!r} (choose from {', '.join(known)})")
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = [c for c in commands if c not in ("prune", "reconstruct", "merge")]
    if unknown:
        raise SystemExit(f"--commands: unknown command {unknown[0]!r} (choose from prune, reconstruct, merge)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else [args.method]
    vocabs = [int(v) for v in args.vocabs.split(",")] if args.vocabs else [args.vocab]
    mib = 2**20
    tokens = args.nsamples * args.seqlen
    runs = []
    with scratch("perp-prune-memory-", args.workdir, args.keep) as work:
        _, _, baseline, _, _ = run_child(["import"])
        for vocab in vocabs:
            args.vocab = vocab
            model_dir = work / f"model-{vocab}"
            model_dir.mkdir()
            print(f"writing the model (vocabulary {vocab}) to {model_dir}", file=sys.stderr)
            start = time.perf_counter()
            params, on_disk = write_model_in_child(model_dir, args)
            print(f"  {params / 1e9:.3f}B parameters, {on_disk / 1e9:.2f} GB in {time.perf_counter() - start:.0f}s", file=sys.stderr)
            calib = ["--calib", str(C4_SAMPLE)] if C4_SAMPLE.is_file() else ["--calib", str(ROOT / "perp_cli" / "demo" / "corpus.txt"), "--calib-concat"]
            calib += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
            spill = work / "activations"
            pruned, adapted = work / "pruned-input", work / "adapted-input"
            measured: dict[str, list[str]] = {}  # label -> the command line, without -o and --streaming
            if "prune" in commands:
                for method in methods:
                    measured[f"prune {method}"] = ["prune", str(model_dir), "--method", method, "--sparsity", "0.5", *calib]
            if "reconstruct" in commands or "merge" in commands:
                print("setting up: the model pruned by magnitude (streamed) ...", file=sys.stderr, flush=True)
                setup("prune", str(model_dir), "-o", str(pruned), "--method", "magnitude", "--sparsity", "0.5", "--streaming", "on", "-q")
            if "reconstruct" in commands:
                measured["reconstruct"] = ["reconstruct", str(pruned), "--dense", str(model_dir), *calib,
                                           "--train", "norms", "--adapter", "masklora", "--steps-per-block", "1"]
            adapters = 0
            if "merge" in commands:
                print("setting up: MaskLoRA adapters from a one-step retrain ...", file=sys.stderr, flush=True)
                setup("retrain", str(pruned), "-o", str(adapted), "--train", "none", "--adapter", "masklora", "--data", calib[1],
                      "--steps", "1", "--batch-size", "1", "--seqlen", "32", "--device", "cpu", "-q")
                adapters = (adapted / "adapters.safetensors").stat().st_size
                measured["merge"] = ["merge", str(adapted)]
            for label, argv in measured.items():
                command = argv[0]
                weights, activations = held_terms(command, on_disk, args.hidden, tokens, vocab, adapters)
                for run in wanted:
                    if command == "merge" and run == "disk":
                        continue  # merge holds no calibration activations
                    mode, where = known[run]
                    extra = ["--offload-dir", str(spill)] if run == "disk" else []
                    out = work / f"{command}-{run}"
                    print(f"{label}, vocabulary {vocab}: --streaming {mode}, activations in {where} ...", file=sys.stderr, flush=True)
                    code, peak, hwm, seconds, stdout = run_child(["perp", *argv, "-o", str(out), "--streaming", mode, *extra,
                                                                  "--device", "cpu", "--json", "-q"])
                    if code != 0:
                        raise SystemExit(f"perp {label} --streaming {mode} {' '.join(extra)} failed with exit code {code}")
                    summary = json.loads(stdout)
                    runs.append({"vocab": vocab, "params": params, "on_disk": on_disk, "label": label, "command": command,
                                 "mode": mode, "where": where, "peak": peak, "hwm": hwm, "seconds": seconds,
                                 "weights": weights, "activations": activations, "sparsity": summary.get("sparsity")})
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
            if not args.keep:  # the next vocabulary's model must not share the disk with this one's
                for directory in (model_dir, pruned, adapted):
                    shutil.rmtree(directory, ignore_errors=True)

        hidden, inter, kv = args.hidden, args.intermediate, args.hidden * args.kv_heads // args.heads
        block = (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden) * 4
        activations = tokens * hidden * 4
        masks = args.layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) / 8
        print()
        print(f"model: LLaMA {args.layers} x (hidden {hidden}, mlp {inter}), vocabulary {', '.join(map(str, vocabs))}: "
              + ", ".join(f"{p / 1e9:.3f}B parameters, {b / 1e9:.2f} GB float32 on disk ({b / mib:.0f} MiB)"
                          for p, b in dict.fromkeys((r["params"], r["on_disk"]) for r in runs)))
        print(f"calibration: {args.nsamples} x {args.seqlen} tokens, micro-batch {args.batch_size}; commands: "
              + ", ".join(dict.fromkeys(r["label"] for r in runs)))
        print(f"terms: baseline (imports) {baseline:.0f} MiB, one block {block / mib:.0f} MiB, "
              f"activations {activations / mib:.0f} MiB (one copy), packed masks {masks / mib:.0f} MiB")
        print("held in memory: prune = the model + one activation copy; reconstruct = the pruned and the dense model + "
              "three activation copies (inputs, dense targets, outputs); merge = the model + its adapters + two probe logits")
        print()
        print("| vocabulary | command | streaming | activations | peak RSS, ru_maxrss (MiB) | VmHWM (MiB) | peak / size on disk | "
              "weights held (MiB) | activations held (MiB) | peak / (weights + activations) | goal | wall time (s) | sparsity |")
        print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for r in runs:
            ratio = r["peak"] * mib / r["on_disk"]
            whole = r["peak"] * mib / (r["weights"] + r["activations"])
            if r["mode"] == "off":
                goal = f"<= 1.15 x (w + a): {'met' if whole <= 1.15 else 'missed'}"
            elif r["command"] == "prune":
                goal = f"< 0.25 x size: {'met' if ratio < 0.25 else 'missed'}"
            else:
                goal = ""
            sparsity = "" if r["sparsity"] is None else f"{r['sparsity']:.4f}"
            print(f"| {r['vocab']} | {r['label']} | {r['mode']} | {r['where']} | {r['peak']:.0f} | {r['hwm'] or 0:.0f} | {ratio:.3f} | "
                  f"{r['weights'] / mib:.0f} | {r['activations'] / mib:.0f} | {whole:.3f} | {goal} | {r['seconds']:.0f} | {sparsity} |")
        if len(vocabs) > 1:
            print()
            print("streamed peak RSS (MiB) against the vocabulary, same blocks:")
            print()
            print("| command | streaming | activations | " + " | ".join(f"vocabulary {v}" for v in vocabs) + f" | {vocabs[-1]} / {vocabs[0]} |")
            print("|---|---|---|" + "---:|" * (len(vocabs) + 1))
            for label in dict.fromkeys(r["label"] for r in runs):
                for run in wanted:
                    mode, where = known[run]
                    peaks = {r["vocab"]: r["peak"] for r in runs if r["label"] == label and r["mode"] == mode and r["where"] == where}
                    if len(peaks) == len(vocabs):
                        print(f"| {label} | {mode} | {where} | " + " | ".join(f"{peaks[v]:.0f}" for v in vocabs)
                              + f" | {peaks[vocabs[-1]] / peaks[vocabs[0]]:.3f} |")


if __name__ == "__main__":
    main()
