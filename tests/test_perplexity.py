"""Perplexity: the reference protocol on tiny models, the paper number on the real
stories260K checkpoint, and the token streams of the WikiText and C4 protocols."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from conftest import magnitude_masks, shared_path

from perp_cli import arch, tiny
from perp_cli.data import TextSource, load_source
from perp_cli.errors import DataError, NumericalError, UsageError
from perp_cli.perplexity import (
    C4_DOCUMENTS,
    C4_WINDOWS,
    eval_token_ids,
    perplexity,
    resolve_add_bos,
    tokenizer_adds_bos,
)

WIKI_TEST_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def reference_ppl(model, token_ids: torch.Tensor, seqlen: int) -> float:
    """Wanda/SparseGPT `eval_ppl_wikitext`, literally: HF's shifted labels loss per window
    (seqlen-1 predictions), times seqlen, summed, divided by windows x seqlen, exp."""
    n = token_ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(n):
            x = token_ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            nlls.append(model(x, labels=x).loss.double() * seqlen)
    return math.exp(torch.stack(nlls).sum().item() / (n * seqlen))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_windows_equal_a_direct_labels_loop(family: str) -> None:
    model = tiny.build_model(family, seed=3)
    seqlen = 32
    ids = torch.randint(4, 260, (5 * seqlen + 7,), generator=torch.Generator().manual_seed(0))
    expected = reference_ppl(model, ids, seqlen)
    for batch_size in (1, 2, 5, 8):
        result = perplexity(model, ids, seqlen, batch_size=batch_size)
        assert result.ppl == pytest.approx(expected, rel=1e-6)
        assert (result.windows, result.tokens, result.seqlen) == (5, 5 * seqlen + 7, seqlen)
        assert result.nll_mean == pytest.approx(math.log(expected), rel=1e-6)


def test_max_windows_scores_the_first_windows_only() -> None:
    model = tiny.build_model("llama", seed=1)
    ids = torch.randint(4, 260, (6 * 16,), generator=torch.Generator().manual_seed(1))
    first_two = perplexity(model, ids, 16, max_windows=2, batch_size=3)
    assert first_two.windows == 2 and first_two.tokens == 96
    assert first_two.ppl == pytest.approx(reference_ppl(model, ids[:32], 16), rel=1e-6)
    assert perplexity(model, ids, 16, max_windows=100).windows == 6


def test_training_mode_is_restored_and_weights_untouched() -> None:
    model = tiny.build_model("opt", seed=0).train()
    model.model.decoder.layers[0].eval()  # a caller may keep parts in eval mode on purpose
    modes = {name: m.training for name, m in model.named_modules()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perplexity(model, torch.arange(4, 4 + 64), 16)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_bad_inputs() -> None:
    model = tiny.build_model("llama", seed=0)
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, torch.arange(10), 16)
    with pytest.raises(UsageError):
        perplexity(model, torch.arange(64), 1)
    with pytest.raises(UsageError):
        perplexity(model, torch.arange(64), 16, batch_size=0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(NumericalError, match="window 0 gives a non-finite loss"):
        perplexity(model, torch.arange(64), 16)


# ----------------------------------------------------------------------------- token streams


def _bos_tokenizer():
    """The byte tokenizer, but adding BOS by default like LLaMA-2's."""
    from tokenizers import processors

    tok = tiny.build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_wikitext_stream_is_rows_joined_with_blank_lines() -> None:
    tok = tiny.build_tokenizer()
    rows = [" = Title = \n", "", " Some text .\n", ""]
    source = TextSource("rows", rows, stream=True)
    ids = eval_token_ids(tok, source, seqlen=4)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tok.decode(ids) == "\n\n".join(rows)  # all of it: no 256 x seqlen cut for WikiText


def test_c4_stream_is_first_1100_documents_cut_to_256_windows() -> None:
    tok = tiny.build_tokenizer()
    docs = [f"d{i}" for i in range(C4_DOCUMENTS + 50)]
    source = TextSource("docs", docs, stream=False)
    long = eval_token_ids(tok, source, seqlen=10_000)
    assert tok.decode(long) == " ".join(docs[:C4_DOCUMENTS])  # the 1101st document is never read
    short = eval_token_ids(tok, source, seqlen=8)
    assert short.numel() == C4_WINDOWS * 8
    assert torch.equal(short, long[: C4_WINDOWS * 8])


def test_bos_default_forced_and_stripped() -> None:
    plain, bos = tiny.build_tokenizer(), _bos_tokenizer()
    source = TextSource("t", ["hello world"], stream=True)
    assert not tokenizer_adds_bos(plain) and tokenizer_adds_bos(bos)
    assert not resolve_add_bos(plain, None) and resolve_add_bos(bos, None)
    text_ids = torch.tensor(plain("hello world")["input_ids"])
    assert torch.equal(eval_token_ids(plain, source, 4), text_ids)
    assert torch.equal(eval_token_ids(plain, source, 4, add_bos=True), torch.cat([torch.tensor([1]), text_ids]))
    assert torch.equal(eval_token_ids(bos, source, 4), torch.cat([torch.tensor([1]), text_ids]))
    assert torch.equal(eval_token_ids(bos, source, 4, add_bos=False), text_ids)


# ----------------------------------------------------------------------------- real data


@pytest.mark.shared
def test_local_wikitext_file_gives_the_hub_text() -> None:
    source = load_source(str(shared_path("data", "wikitext-2-raw", "wiki.test.raw")), split="test")
    assert len(source.documents) == 4358
    assert hashlib.sha256(source.joined().encode("utf-8")).hexdigest() == WIKI_TEST_SHA256


@pytest.mark.slow
@pytest.mark.shared
def test_stories260k_wikitext2_perplexity_matches_the_reference() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("models", "stories260K")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    source = load_source(str(shared_path("data", "wikitext-2-raw", "wiki.test.raw")), split="test")
    ids = eval_token_ids(tok, source, 512)
    assert not resolve_add_bos(tok, None) and ids[0].item() != tok.bos_token_id
    result = perplexity(model, ids, 512, batch_size=8)
    assert result.tokens == 815_069 and result.windows == 1591 and result.seqlen == 512
    assert result.ppl == pytest.approx(122.36, abs=0.01)


@pytest.mark.shared
def test_pruned_model_is_worse_than_dense() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("models", "tiny-opt")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    source = load_source(str(shared_path("data", "wikitext-2-raw", "wiki.test.raw")), split="test")
    ids = eval_token_ids(tok, source, 256)
    dense = perplexity(model, ids, 256, batch_size=10, max_windows=20)
    magnitude_masks(model, 0.5)  # zeroes the 50% smallest-magnitude weights of every matrix
    zeros = sum(int((m.weight() == 0).sum()) for m in arch.matrices(model))
    assert zeros >= sum(m.weight().numel() for m in arch.matrices(model)) // 2
    pruned = perplexity(model, ids, 256, batch_size=10, max_windows=20)
    assert pruned.windows == dense.windows == 20
    assert pruned.ppl > dense.ppl * 1.01
