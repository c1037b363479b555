"""Train perp's embedded demo model: a small LLaMA-style causal LM shipped in the package.

    python scripts/train_demo_model.py --c4 ../shared/data/c4/c4-train.00000-of-01024.first1000.jsonl

Deterministic (fixed seeds, fixed data order; float32 on CPU): the same command on the same
torch build and thread count gives the same weights. It writes, into perp_cli/demo/:

- model/: config, model.safetensors (float16), tokenizer (byte-level BPE), MODEL_CARD.md
- calibration.jsonl: C4 documents 900-949 of the sample, which the demo calibrates and retrains on
- heldout.jsonl: C4 documents 950-999, which the demo evaluates on

Neither held-out file is seen by the tokenizer or the model in training: both are trained on
documents 0-899 only. Layout: LLaMA (RMSNorm, rotary positions, SwiGLU, no biases), so the
demo's `--add-biases` is the step PERP needs on modern models.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

TRAIN_DOCS = range(0, 900)
CALIB_DOCS = range(900, 950)
HELDOUT_DOCS = range(950, 1000)
SPECIALS = ["<pad>", "<s>", "</s>"]

ARCH = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    attention_bias=False, mlp_bias=False,
)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512,
    )


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents tokenized and concatenated, each followed by </s>."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seqlen: int) -> float:
    """Non-overlapping windows, remainder dropped: the protocol of `perp eval`."""
    model.eval()
    n = stream.numel() // seqlen
    windows = stream[: n * seqlen].view(n, seqlen)
    nll = 0.0
    for batch in windows.split(32):
        out = model(input_ids=batch, labels=batch)
        nll += out.loss.item() * batch.shape[0]
    model.train()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--c4", type=Path, required=True, help="the 1000-document C4 sample (jsonl)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "perp_cli" / "demo")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    records = [json.loads(line) for line in args.c4.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(records) < HELDOUT_DOCS.stop:
        raise SystemExit(f"{args.c4} has {len(records)} documents; expected the first 1000 of the shard")
    train_texts = [records[i]["text"] for i in TRAIN_DOCS]

    tokenizer = train_tokenizer(train_texts, args.vocab)
    train = token_stream(tokenizer, train_texts)
    calib = token_stream(tokenizer, [records[i]["text"] for i in CALIB_DOCS])
    heldout = token_stream(tokenizer, [records[i]["text"] for i in HELDOUT_DOCS])
    print(f"tokens: train {train.numel():,}, calibration {calib.numel():,}, held-out {heldout.numel():,}", flush=True)

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **ARCH,
    )
    model = LlamaForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    start, t0 = 0, time.time()
    for step in range(args.steps):
        starts = torch.randint(0, train.numel() - args.seqlen - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s : s + args.seqlen] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {time.time() - t0:.0f}s", flush=True)
        if step % 1000 == 999:
            print(f"  held-out ppl (seqlen 128): {perplexity(model, heldout, 128):.2f}", flush=True)
    train_seconds = time.time() - t0

    out_model = args.out / "model"
    out_model.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    model.save_pretrained(out_model)
    tokenizer.save_pretrained(out_model)
    # what ships is float16: measure that, upcast to float32 as the demo runs it
    shipped = LlamaForCausalLM(config)
    shipped.load_state_dict(load_file(out_model / "model.safetensors"), strict=False)
    shipped.tie_weights()
    shipped = shipped.float()
    metrics = {
        "parameters": n_params, "train_tokens": train.numel(), "tokens_seen": args.steps * args.batch * args.seqlen,
        "train_seconds": round(train_seconds), "final_train_loss": round(loss.item(), 3),
        "ppl_heldout_128": round(perplexity(shipped, heldout, 128), 2),
        "ppl_calibration_128": round(perplexity(shipped, calib, 128), 2),
        "ppl_train_sample_128": round(perplexity(shipped, train[: heldout.numel()], 128), 2),
        "heldout_tokens": heldout.numel(), "calibration_tokens": calib.numel(), "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(metrics, indent=1))
    (out_model / "training.json").write_text(json.dumps(metrics, indent=1) + "\n")

    for name, docs in (("calibration.jsonl", CALIB_DOCS), ("heldout.jsonl", HELDOUT_DOCS)):
        lines = [json.dumps(records[i], ensure_ascii=False) for i in docs]
        (args.out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
