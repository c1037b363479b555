"""Peak host memory of streamed pruning against the model's size on disk.

    python bench/prune_memory.py                    # ~1.1B LLaMA (TinyLlama shapes), float32 ~4.4 GB, Wanda 128 x 512
    python bench/prune_memory.py --nsamples 16      # the same model, fewer calibration tokens (faster)
    python bench/prune_memory.py --layers 2 --hidden 512 --intermediate 1408 --nsamples 8 --seqlen 128   # a quick look
    python bench/prune_memory.py --runs stream,disk,memory   # also prune without streaming, for comparison
    python bench/prune_memory.py --runs disk        # only the streamed run with the activations on disk
    python bench/prune_memory.py --runs memory --methods wanda,sparsegpt --nsamples 32 --seqlen 256   # in memory: goal <= 1.15x
    python bench/prune_memory.py --runs stream --vocabs 32000,128256 --layers 4   # streamed peak against the vocabulary

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
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else [args.method]
    vocabs = [int(v) for v in args.vocabs.split(",")] if args.vocabs else [args.vocab]
    mib = 2**20
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
            spill = work / "activations"
            for method in methods:
                base = ["perp", "prune", str(model_dir), "--method", method, "--sparsity", "0.5",
                        *calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
                        "--device", "cpu", "--json", "-q"]
                for run in wanted:
                    mode, where = known[run]
                    extra = ["--offload-dir", str(spill)] if run == "disk" else []
                    out = work / f"pruned-{run}"
                    print(f"{method}, vocabulary {vocab}: --streaming {mode}, activations in {where} ...", file=sys.stderr, flush=True)
                    code, peak, hwm, seconds, stdout = run_child([*base, "-o", str(out), "--streaming", mode, *extra])
                    if code != 0:
                        raise SystemExit(f"perp prune --method {method} --streaming {mode} {' '.join(extra)} failed with exit code {code}")
                    summary = json.loads(stdout)
                    runs.append((vocab, params, on_disk, method, mode, where, peak, hwm, seconds, summary))
                    shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(model_dir, ignore_errors=True)

        hidden, inter, kv = args.hidden, args.intermediate, args.hidden * args.kv_heads // args.heads
        block = (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden) * 4
        activations = args.nsamples * args.seqlen * hidden * 4
        masks = args.layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) / 8
        print()
        print(f"model: LLaMA {args.layers} x (hidden {hidden}, mlp {inter}), vocabulary {', '.join(map(str, vocabs))}: "
              + ", ".join(f"{p / 1e9:.3f}B parameters, {b / 1e9:.2f} GB float32 on disk ({b / mib:.0f} MiB)"
                          for p, b in dict.fromkeys((r[1], r[2]) for r in runs)))
        print(f"calibration: {', '.join(methods)}, {args.nsamples} x {args.seqlen} tokens, micro-batch {args.batch_size}")
        print(f"terms: baseline (imports) {baseline:.0f} MiB, one block {block / mib:.0f} MiB, "
              f"activations {activations / mib:.0f} MiB, packed masks {masks / mib:.0f} MiB")
        print()
        print("| vocabulary | method | streaming | activations | peak RSS, ru_maxrss (MiB) | VmHWM (MiB) | peak / size on disk | "
              "peak / (weights + activations) | goal | wall time (s) | sparsity |")
        print("|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|")
        for vocab, _, on_disk, method, mode, where, peak, hwm, seconds, summary in runs:
            ratio = peak * mib / on_disk
            whole = peak * mib / (on_disk + activations)
            goal = (f"< 0.25 x size: {'met' if ratio < 0.25 else 'missed'}" if mode == "on"
                    else f"<= 1.15 x (w + a): {'met' if whole <= 1.15 else 'missed'}")
            print(f"| {vocab} | {method} | {mode} | {where} | {peak:.0f} | {hwm or 0:.0f} | {ratio:.3f} | {whole:.3f} | {goal} | "
                  f"{seconds:.0f} | {summary['sparsity']:.4f} |")
        if len(vocabs) > 1:
            print()
            print("streamed peak RSS (MiB) against the vocabulary, same blocks:")
            print()
            print("| method | streaming | activations | " + " | ".join(f"vocabulary {v}" for v in vocabs) + f" | {vocabs[-1]} / {vocabs[0]} |")
            print("|---|---|---|" + "---:|" * (len(vocabs) + 1))
            for method in methods:
                for run in wanted:
                    mode, where = known[run]
                    peaks = {r[0]: r[6] for r in runs if r[3] == method and r[4] == mode and r[5] == where}
                    print(f"| {method} | {mode} | {where} | " + " | ".join(f"{peaks[v]:.0f}" for v in vocabs)
                          + f" | {peaks[vocabs[-1]] / peaks[vocabs[0]]:.3f} |")


if __name__ == "__main__":
    main()
