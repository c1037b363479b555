"""Perplexity exactly as the Wanda, SparseGPT and PERP papers measure it.

The protocol (`eval_ppl_wikitext` / `eval_ppl_c4` in the reference code):

1. One token stream. WikiText-2: the `wikitext-2-raw-v1` rows joined with "\\n\\n" and
   tokenized once (a local `wiki.test.raw` gives the same text, see `data.read_rows`).
   C4: the first 1100 documents of `c4-validation.00000-of-00008` joined with " ",
   tokenized, cut to the first 256 x seqlen tokens. A local document file (`.jsonl`,
   `.parquet`, datasets directory) gets the C4 treatment; a line file (`.txt`, `.raw`)
   the WikiText one.
2. Non-overlapping windows of `seqlen` tokens; the remainder is dropped.
3. In each window the model predicts tokens 2..seqlen from their prefixes (the shifted
   loss, seqlen-1 predictions: nothing predicts the first token of a window). The
   references take that window's mean NLL and multiply it by seqlen, then divide the sum
   by windows x seqlen: this is the mean of the per-window means, which, with every
   window holding the same seqlen-1 predictions, is the mean token NLL over all
   predicted tokens. We compute the latter directly (float32 log-softmax, float64 sum),
   so a batched run equals a direct loop over `model(x, labels=x).loss`.
4. Perplexity = exp(mean NLL).

Whether a BOS token starts the stream is the tokenizer's default (the references call
`tokenizer(text)`), unless `add_bos` forces it either way.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

from perp_cli.data import TextSource
from perp_cli.errors import DataError, NumericalError, UsageError
from perp_cli.progress import make_progress

C4_DOCUMENTS = 1100  # SparseGPT/Wanda: valdata[:1100]
C4_WINDOWS = 256  # SparseGPT/Wanda: valenc[:, :256 * seqlen]


@dataclass
class PerplexityResult:
    """One perplexity measurement: `ppl = exp(nll_mean)` over `windows` windows of `seqlen`.

    `tokens` is the length of the whole evaluation stream (including the dropped
    remainder and any windows skipped by `max_windows`), as the papers report it.
    """

    ppl: float
    nll_mean: float
    tokens: int
    windows: int
    seqlen: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Does `tokenizer(text)` start with the BOS token by default (LLaMA-2: yes, GPT-2: no)?"""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_specials) > len(plain) and with_specials[0] == bos


def resolve_add_bos(tokenizer: Any, add_bos: bool | None) -> bool:
    """Whether the evaluation stream will start with BOS (what the manifest records)."""
    return tokenizer_adds_bos(tokenizer) if add_bos is None else add_bos


def eval_token_ids(tokenizer: Any, source: TextSource, seqlen: int, add_bos: bool | None = None) -> torch.Tensor:
    """The evaluation token stream of `source`, a 1-D LongTensor (see the module docstring).

    Line sources (WikiText, `.txt`, `.raw`): all rows joined with "\\n\\n", tokenized
    once. Document sources (C4, `.jsonl`, `.parquet`): the first 1100 documents joined
    with " ", tokenized, the first 256 x seqlen tokens kept.
    """
    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {seqlen}")
    text = "\n\n".join(source.documents) if source.stream else " ".join(source.documents[:C4_DOCUMENTS])
    ids = list(tokenizer(text, verbose=False)["input_ids"])  # a corpus is longer than model_max_length on purpose
    default_bos = tokenizer_adds_bos(tokenizer)
    if add_bos and not default_bos:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise UsageError("--add-bos: this tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id] + ids
    elif add_bos is False and default_bos and ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    token_ids = torch.tensor(ids, dtype=torch.long)
    if not source.stream:
        token_ids = token_ids[: C4_WINDOWS * seqlen]
    return token_ids


def window_nll_sums(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window `[b, seqlen]` -> `[b]` (float64).

    The shifted loss: position t predicts token t+1, so each window contributes
    seqlen-1 predictions. NLL = logsumexp(logits) - logit of the target, which is the
    cross-entropy, computed in float32 whatever the model's dtype (and on CPU about 3x
    faster than `F.cross_entropy` on the sliced logits, which copies them).
    """
    logits = model(windows, use_cache=False).logits[:, :-1, :]
    if logits.dtype != torch.float32:
        logits = logits.float()
    targets = windows[:, 1:].unsqueeze(-1)
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets).squeeze(-1)
    return nll.double().sum(dim=1)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then every module's own train/eval flag
    back: retraining calls this mid-run and may keep some modules in eval on purpose."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _exp(nll: float) -> float:
    """exp that says inf instead of raising OverflowError for a hopeless model."""
    return math.exp(nll) if nll < 700 else math.inf


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    quiet: bool = True,
    description: str = "perplexity",
) -> PerplexityResult:
    """Perplexity over non-overlapping `seqlen` windows of `token_ids` (remainder dropped).

    Works on any causal LM that returns `.logits`, including one with perp adapters
    attached (it only calls the model). `max_windows` evaluates the first N windows only
    (quick runs; the papers use all). Batching does not change the result beyond float
    rounding: every window is scored independently.
    """
    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {seqlen}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--max-windows must be at least 1, got {max_windows}")
    token_ids = token_ids.reshape(-1)
    windows = token_ids.numel() // seqlen
    if windows == 0:
        raise DataError(f"the evaluation text has only {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        windows = min(windows, max_windows)
    stream = token_ids[: windows * seqlen].view(windows, seqlen)
    device = _device_of(model)

    total = 0.0  # a Python float is float64
    with evaluation_mode(model), torch.inference_mode(), make_progress(quiet) as progress:
        task = progress.add_task(description, total=windows, status="")
        for start in range(0, windows, batch_size):
            batch = stream[start : start + batch_size].to(device)
            sums = window_nll_sums(model, batch).cpu()
            if not torch.isfinite(sums).all():
                bad = start + int((~torch.isfinite(sums)).nonzero()[0])
                raise NumericalError(f"window {bad} gives a non-finite loss (NaN/inf logits; try --dtype float32)")
            total += sums.sum().item()
            done = start + batch.shape[0]
            progress.update(task, advance=batch.shape[0], status=f"ppl {_exp(total / (done * (seqlen - 1))):.2f}")

    nll_mean = total / (windows * (seqlen - 1))
    return PerplexityResult(ppl=_exp(nll_mean), nll_mean=nll_mean, tokens=int(token_ids.numel()), windows=windows, seqlen=seqlen)
