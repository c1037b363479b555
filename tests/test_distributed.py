"""Scale: data-parallel retraining (torchrun, gloo on CPU) and `--device-map` loading.

The data-parallel tests launch real processes: `torch.distributed.run --nproc-per-node 2
-m perp_cli retrain ...`, the same command a user types, and compare what rank 0 wrote
with a single-process run on the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from conftest import random_tokens, run_cli, save_tiny
from safetensors.torch import load_file, save_file

from perp_cli import checkpoint, distributed, evaluation, mask
from perp_cli.errors import CheckpointError
from perp_cli.perplexity import perplexity

# float32 rounding only: the per-rank means averaged by DDP are the global mean summed
# in another order. AdamW normalises each update by the gradient's own size, so entries
# with tiny gradients carry that rounding into the weights; with --lr 1e-3 over 4 steps
# the measured gap is about 3e-7 (the same size as splitting the batch into grad-accum
# micro-batches in one process).
ATOL = 1e-5
TRAIN = ("--seqlen", "32", "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3",
         "--warmup", "0", "--device", "cpu", "--seed", "3", "-q", "--json")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    corpus = root / "corpus.txt"
    corpus.write_text(files("perp_cli").joinpath("demo/corpus.txt").read_text(encoding="utf-8"), encoding="utf-8")
    dense = save_tiny(root / "dense", "llama")  # LLaMA has no dropout: ranks and one process see the same function
    result = run_cli("prune", dense, "-o", root / "pruned", "--method", "magnitude", "--sparsity", "0.5", "-q")
    assert result.exit_code == 0, result.stderr
    return {"root": root, "corpus": corpus, "pruned": root / "pruned"}


def tensors(path: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(path / name))


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m perp_cli ...` (free port, local only)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "perp_cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def siblings(out: Path) -> list[str]:
    """Everything in the output's parent that belongs to it (temporaries included)."""
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name)


def assert_close(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=ATOL), (name, (one[name] - two[name]).abs().max())


# ----------------------------------------------------------------------------- data parallel


def test_a_plain_run_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and distributed.setup("auto") is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1
    assert not distributed.launched() and distributed.setup("cpu") is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra",
    [
        # PERP's case: nearly everything frozen (DDP with find_unused_parameters=False
        # reduces only the biases, norms and adapter factors)
        ("bn-masklora", ("--train", "biases,norms", "--add-biases", "--adapter", "masklora", "--rank", "4")),
        # full retraining: every rank re-masks; the pruned weights stay exactly zero
        ("all", ("--train", "all", "--weight-decay", "0.1")),
    ],
)
def test_two_processes_reach_the_parameters_of_one_and_write_once(work, name, extra):
    one, two = work["root"] / f"{name}-1", work["root"] / f"{name}-2"
    single = run_cli("retrain", work["pruned"], "-o", one, "--data", work["corpus"], *TRAIN, *extra)
    assert single.exit_code == 0, single.stderr
    proc = launch(2, "retrain", work["pruned"], "-o", two, "--data", work["corpus"], *TRAIN, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads(proc.stdout)  # one JSON document: only rank 0 prints
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["batch_per_process"] == 2
    assert summary["tokens_seen"] == single.json()["tokens_seen"] == 4 * 2 * 4 * 32  # global batch, not per rank
    assert summary["initial_loss"] == pytest.approx(single.json()["initial_loss"], abs=1e-5)
    assert summary["final_loss"] == pytest.approx(single.json()["final_loss"], abs=1e-5)
    assert siblings(two) == [two.name]  # written once, no temporary left behind
    manifest = json.loads((two / "perp.json").read_text())
    assert manifest["history"][-1]["results"]["world_size"] == 2
    assert single.json()["world_size"] == 1

    before, after_one, after_two = tensors(work["pruned"]), tensors(one), tensors(two)
    assert_close(after_one, after_two)
    # ...and not bitwise equal: ranks that each trained on the whole global batch (no
    # split) would average identical gradients and reproduce one process exactly
    assert not all(torch.equal(after_one[n], after_two[n]) for n in after_one)
    if name == "bn-masklora":
        assert_close(tensors(one, "adapters.safetensors"), tensors(two, "adapters.safetensors"))
        frozen = [n for n in before if n.endswith("proj.weight") or "embed" in n]
        assert frozen and all(torch.equal(before[n], after_two[n]) for n in frozen)  # no gradient, no step
        assert not torch.equal(before["model.norm.weight"], after_two["model.norm.weight"])
    else:
        ckpt = checkpoint.open(two)  # verifies every masked weight is exactly zero
        for n, keep in ckpt.masks.masks.items():
            assert mask.nonzeros_outside(ckpt.model.get_parameter(n), keep) == 0
            assert not torch.equal(before[n], after_two[n])


# ----------------------------------------------------------------------------- device maps


def test_device_map_auto_without_a_gpu_puts_everything_on_the_cpu(work):
    plain = checkpoint.open(work["pruned"])
    mapped = checkpoint.open(work["pruned"], device_map="auto")
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    assert checkpoint.offloaded_parameters(mapped.model) == []
    ids = random_tokens(2, 16, high=260)
    assert torch.equal(plain.model(ids).logits, mapped.model(ids).logits)


def test_offloaded_weights_are_verified_and_evaluated_one_module_at_a_time(work, tmp_path):
    plain = checkpoint.open(work["pruned"])
    on_disk = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
               "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = checkpoint.open(work["pruned"], device_map=on_disk, offload_dir=tmp_path / "offload")
    offloaded = checkpoint.offloaded_parameters(mapped.model)
    assert offloaded and all(n.startswith("model.layers.1.") for n in offloaded)
    ids = torch.arange(4, 4 + 8 * 32).remainder(256).view(-1)
    assert perplexity(mapped.model, ids, 32).ppl == pytest.approx(perplexity(plain.model, ids, 32).ppl, rel=1e-6)
    assert evaluation.measured_sparsity(mapped.model) == pytest.approx(0.5, abs=1e-3)

    # a pruned weight that is not zero, inside the offloaded block, is still caught
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in work["pruned"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = tensors(broken)
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name].masked_fill(~plain.masks[name], 1.0)
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="disagree"):
        checkpoint.open(broken, device_map=on_disk, offload_dir=tmp_path / "offload2")


def test_cli_device_map_auto_gives_the_same_eval_and_retrain_as_a_device(work):
    args = ("eval", work["pruned"], "-d", work["corpus"], "--seqlen", "32", "--max-windows", "4", "-q", "--json")
    plain, mapped = run_cli(*args, "--device", "cpu"), run_cli(*args, "--device-map", "auto")
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.stderr
    assert mapped.json()["settings"]["device_map"] == "auto"
    ppl = [r.json()["results"][0]["perplexity"]["corpus.txt"]["ppl"] for r in (plain, mapped)]
    assert ppl[0] == ppl[1] and ppl[0] > 1
    quick = ("--data", work["corpus"], "--seqlen", "32", "--steps", "2", "--batch-size", "2", "--train", "norms", "-q")
    a = run_cli("retrain", work["pruned"], "-o", work["root"] / "dev", *quick, "--device", "cpu")
    b = run_cli("retrain", work["pruned"], "-o", work["root"] / "map", *quick, "--device-map", "auto")
    assert a.exit_code == 0 and b.exit_code == 0, b.stderr
    ta, tb = tensors(work["root"] / "dev"), tensors(work["root"] / "map")
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    manifest = json.loads((work["root"] / "map" / "perp.json").read_text())
    assert manifest["history"][-1]["args"]["device_map"] == "auto"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--device-map", "everywhere"), "not one of"),
        (("--device-map", "auto", "--device", "cpu"), "not both"),
    ],
)
def test_device_map_usage_errors_exit_2_before_loading(work, args, message):
    out = work["root"] / "never"
    retrain = run_cli("retrain", work["pruned"], "-o", out, "--data", work["corpus"], "--seqlen", "32", "-q", *args)
    assert retrain.exit_code == 2 and message in retrain.stderr
    assert not out.exists()
    evaluate = run_cli("eval", work["pruned"], "-d", work["corpus"], "-q", *args)
    assert evaluate.exit_code == 2 and message in evaluate.stderr
    orphan = run_cli("eval", work["pruned"], "-d", work["corpus"], "-q", "--offload-dir", out)
    assert orphan.exit_code == 2 and "--offload-dir only applies" in orphan.stderr
