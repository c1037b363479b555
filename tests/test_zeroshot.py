"""Zero-shot through lm-evaluation-harness, for real and offline: a tiny multiple-choice
task (tests/data/tiny_mc: a task YAML and a local jsonl) on tiny models, checked against
log-likelihoods computed here directly from the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_path

from perp_cli import tiny
from perp_cli.zeroshot import PAPER_TASKS, MissingExtra, parse_tasks, require_lm_eval, zero_shot

TASK_DIR = Path(__file__).parent / "data" / "tiny_mc"
TASK = "perp_tiny_mc"

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'perp[eval]')")


@pytest.fixture
def in_task_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """lm-eval resolves a task's local data_files against the working directory."""
    monkeypatch.chdir(TASK_DIR)
    return TASK_DIR


def expected_accuracy(model, tokenizer) -> tuple[float, float]:
    """acc and acc_norm computed directly: sum of log p(" " + choice | context) per choice,
    argmax (acc), argmax of that divided by the choice's length in characters (acc_norm)."""
    docs = [json.loads(line) for line in (TASK_DIR / f"{TASK}.jsonl").read_text().splitlines() if line.strip()]
    hits = hits_norm = 0
    with torch.no_grad():
        for doc in docs:
            context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
            lls = []
            for choice in doc["choices"]:
                cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + cont])
                logprobs = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
                positions = range(len(context) - 1, len(context) + len(cont) - 1)
                lls.append(sum(logprobs[p, t].item() for p, t in zip(positions, cont)))
            norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
            hits += int(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
            hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == doc["label"])
    return hits / len(docs), hits_norm / len(docs)


def test_tiny_task_through_lm_eval_matches_direct_loglikelihoods(in_task_dir: Path) -> None:
    # A large init scale makes the random model's choices depend on content, not just on
    # choice length (a near-uniform model always prefers the shortest / longest choice).
    model, tok = tiny.build_model("llama", seed=0, initializer_range=1.0), tiny.build_tokenizer()
    acc, acc_norm = expected_accuracy(model, tok)
    assert 0 < acc < 1 and 0 < acc_norm < 1 and acc != acc_norm
    result = zero_shot(model, tok, [TASK], batch_size=4, include_path=str(in_task_dir))
    scores = result.tasks[TASK]
    assert scores["samples"] == 12
    assert scores["acc"] == pytest.approx(acc, abs=1e-9)
    assert scores["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert "acc_stderr" in scores and "acc_norm_stderr" in scores
    assert result.mean_acc == pytest.approx(acc)
    # deterministic, and --limit takes the first documents
    again = zero_shot(model, tok, [TASK], batch_size=1, include_path=str(in_task_dir), limit=4)
    assert again.tasks[TASK]["samples"] == 4 and again.limit == 4


@pytest.mark.shared
def test_stories260k_knows_its_stories(in_task_dir: Path) -> None:
    """A real model scores well above chance (1/3) on the TinyStories-flavoured task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("models", "stories260K")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    result = zero_shot(model, tok, [TASK], include_path=str(in_task_dir))
    assert result.tasks[TASK]["acc"] >= 0.9 and result.tasks[TASK]["acc"] == pytest.approx(expected_accuracy(model, tok)[0])


def test_missing_lm_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when absent
    with pytest.raises(MissingExtra, match=r"pip install 'perp\[eval\]'") as info:
        require_lm_eval()
    assert info.value.exit_code == 1 and "\n" not in str(info.value)


def test_parse_tasks() -> None:
    assert parse_tasks(["boolq,rte", "rte", " hellaswag "]) == ["boolq", "rte", "hellaswag"]
    assert parse_tasks(["paper"]) == list(PAPER_TASKS)
    assert parse_tasks(None) == []
