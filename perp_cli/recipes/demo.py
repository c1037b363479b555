"""What `perp demo` does besides running the other commands: write its embedded default
model as the chain's step 0, and ask whether a model's family can take biases."""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

from perp_cli import checkpoint
from perp_cli.manifest import StepRecord

EMBEDDED_MODEL = "demo/model"


def write_embedded_default(out: Path) -> None:
    """The shipped model (float16 on disk, to stay small) as a float32 checkpoint: the demo's step 0."""
    with as_file(files("perp_cli").joinpath(EMBEDDED_MODEL)) as source:
        ckpt = checkpoint.open(source, dtype="float32", need_tokenizer=True)
    step = StepRecord("demo-init", {"model": "perp embedded demo model", "dtype": "float32"}, input=None, seed=0)
    checkpoint.save(out, ckpt.model, ckpt.tokenizer, None, {"history": []}, step, overwrite=True)


def lacks_biases(model: str) -> bool:
    """Whether MODEL's family can take biases (a config flag turns them on) and some are off (LLaMA)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from perp_cli import arch

    try:
        config = AutoConfig.from_pretrained(model)
        with torch.device("meta"):  # the architecture map alone: no memory, no weights read
            skeleton = AutoModelForCausalLM.from_config(config)
        return bool(arch.bias_flags(skeleton))
    except Exception:
        return False  # the prune step reports an unreadable or unmapped model with a clear error
