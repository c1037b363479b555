"""Text sources and reference-faithful window sampling."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from perp_cli import data, tiny
from perp_cli.errors import DataError, UsageError

from conftest import shared_path


def test_wikitext_raw_file_gives_the_hf_rows_text() -> None:
    source = data.load_source(str(shared_path("data", "wikitext-2-raw", "wiki.test.raw")))
    assert source.stream and len(source.documents) == 4358
    text = source.joined().encode()
    assert len(text) == 1_296_370
    assert hashlib.sha256(text).hexdigest() == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_jsonl_documents_and_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "c", "body": "x"}) + "\n")
    source = data.load_source(str(f))
    assert source.documents == ["a b", "c"] and not source.stream and source.sha256
    with pytest.raises(DataError, match="--text-field"):
        data.load_source(str(f), text_field="body")


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        data.load_source(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        data.load_source(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match="UTF-8"):
        data.load_source(str(tmp_path / "bin.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UsageError, match="unknown data format"):
        data.load_source(str(tmp_path / "x.csv"))


def _reference_c4_sampler(tokenizer, docs, nsamples, seqlen, seed):
    """The loop of SparseGPT/Wanda's get_c4, verbatim in spirit."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = torch.tensor(tokenizer(docs[i])["input_ids"])
            if enc.numel() > seqlen:
                break
        i = random.randint(0, enc.numel() - seqlen - 1)
        out.append(enc[i : i + seqlen])
    return torch.stack(out)


def test_document_sampling_matches_the_reference_loop(tmp_path: Path) -> None:
    tok = tiny.build_tokenizer()
    gen = random.Random(1)
    docs = ["".join(gen.choice("abcdefgh ") for _ in range(gen.randint(5, 300))) for _ in range(40)]
    source = data.TextSource("mem", docs, stream=False)
    ours = data.sample_windows(tok, source, nsamples=12, seqlen=64, seed=7)
    assert torch.equal(ours, _reference_c4_sampler(tok, docs, 12, 64, 7))
    assert torch.equal(ours, data.sample_windows(tok, source, nsamples=12, seqlen=64, seed=7))


def test_too_few_long_documents_is_an_error_not_a_hang() -> None:
    tok = tiny.build_tokenizer()
    source = data.TextSource("short", ["short doc"] * 50, stream=False)
    with pytest.raises(DataError, match="--calib-concat"):
        data.sample_windows(tok, source, nsamples=4, seqlen=64, seed=0)
    windows = data.sample_windows(tok, data.TextSource("short", ["short doc number %d" % i for i in range(50)], False),
                                  nsamples=4, seqlen=64, seed=0, concat=True)
    assert windows.shape == (4, 64)


def test_shared_c4_sample_windows() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_path("models", "tiny-opt"))
    source = data.load_source(str(shared_path("data", "c4", "c4-train.00000-of-01024.first1000.jsonl")))
    assert len(source.documents) == 1000
    windows = data.sample_windows(tok, source, nsamples=8, seqlen=256, seed=0)
    assert windows.shape == (8, 256) and windows.dtype == torch.long


def test_default_seqlen_caps_positions() -> None:
    model = tiny.build_model("llama")
    assert data.default_seqlen(model, None) == 256
    model.config.max_position_embeddings = 131072  # LLaMA 3: never allocate that
    assert data.default_seqlen(model, None) == 2048
    with pytest.raises(UsageError, match="exceeds"):
        data.default_seqlen(tiny.build_model("llama"), 1024)


def test_null_text_records_are_skipped_not_read_as_none(tmp_path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": null}\n{"text": "real words"}\n{"text": null}\n')
    source = data.load_source(str(path))
    assert "None" not in source.joined() and "real words" in source.joined()
    (tmp_path / "bad.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="not text"):
        data.load_source(str(tmp_path / "bad.jsonl"))


def test_calibration_beyond_the_data_says_how_many_windows_it_holds(tmp_path) -> None:
    from perp_cli import tiny

    path = tmp_path / "t.txt"
    path.write_text("abcdefgh " * 40)
    source = data.load_source(str(path))
    with pytest.raises(UsageError, match=r"make \d+ windows of 16"):
        data.sample_windows(tiny.build_tokenizer(), source, nsamples=10**9, seqlen=16)
    assert data.sample_windows(tiny.build_tokenizer(), source, nsamples=10**3, seqlen=16, within_data=False).shape == (1000, 16)

def test_document_windows_truncate_pad_and_follow_a_seeded_order() -> None:
    tok = tiny.build_tokenizer()
    docs = ["short one", "", "x" * 500, "a medium length document here"]
    source = data.TextSource("mem", docs, stream=False)
    out = data.document_windows(tok, source, nsamples=5, seqlen=64, seed=3)
    assert out.shape == (5, 64) and torch.equal(out, data.document_windows(tok, source, 5, 64, seed=3))
    rows = {tuple(r[r != data.PAD].tolist()) for r in out}
    expected = {tuple(tok(d)["input_ids"][:64]) for d in docs if d}
    assert rows == expected  # 3 non-empty documents, each its first 64 tokens; the 4th and 5th rows repeat
    for r in out:  # padding only at the end
        real = (r != data.PAD).long()
        assert torch.equal(real, real.sort(descending=True).values)
    with pytest.raises(UsageError, match="windows"):
        data.document_windows(tok, data.TextSource("wiki", ["a"], stream=True), 2, 8)
    with pytest.raises(DataError, match="no non-empty"):
        data.document_windows(tok, data.TextSource("empty", ["", ""], stream=False), 2, 8)
