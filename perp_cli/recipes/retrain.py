"""The `perp retrain` recipe: open the pruned checkpoint, draw the training windows, train
the chosen subset and adapters (`retrain`, over `training.train_lm`), write the output
with the adapters unmerged (and a PEFT directory with --export-peft)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from perp_cli import adapters as adapters_mod
from perp_cli import checkpoint, data, distributed, memory
from perp_cli import trainable as trainable_mod
from perp_cli.distributed import Distributed
from perp_cli.errors import UsageError
from perp_cli.progress import SILENT, Reporter
from perp_cli import recipes
from perp_cli.recipes import Step, check_rank
from perp_cli.training import TrainConfig, train_lm


@dataclass
class RetrainOptions:
    """What `perp retrain` trains, besides the optimisation settings."""

    train: str = "biases,norms"
    adapter: str | None = None
    adapter_targets: str | None = None
    rank: int = 16
    alpha: float = 32.0
    add_biases: bool = False
    untie_lm_head: bool = False


# `perp retrain --recipe`: perp's defaults, or PERP's reference settings (ZIB-IOL/PERP
# main.py: SelectivePEFT = biases + LayerNorm + lm_head LoRA + MaskLoRA r16/alpha 32, AdamW
# lr 5e-4 linear with 10% warmup, batch 1 x 2 accumulation, C4 documents truncated and
# padded to seqlen). An explicit option wins over the recipe; docs/fidelity.md.
RECIPES: dict[str, dict[str, Any]] = {
    "perp": {"train": "biases,norms", "adapter": "none", "batch_size": 4, "grad_accum": 1, "data_mode": "windows"},
    "paper": {"train": "biases,norms,lm_head-lora", "adapter": "masklora", "batch_size": 1, "grad_accum": 2, "data_mode": "documents"},
}


class RetrainOutcome(NamedTuple):
    results: dict[str, Any]  # what perp.json records of the training
    adapters: dict[str, adapters_mod.Adapter]  # detached and unmerged ({} without an adapter)


def retrain(
    ckpt: Any,
    opts: RetrainOptions,
    cfg: TrainConfig,
    windows: torch.Tensor,
    eval_fn: Callable[[], float] | None = None,
    quiet: bool = False,
    dist: Distributed | None = None,
    report: Reporter = SILENT,
) -> RetrainOutcome:
    """PERP retraining of `ckpt.model` in place, with the options `run` checks before loading;
    adapters come back detached and unmerged.

    `lm_head-lora` in `opts.train` is the exception: that LoRA is dense (lm_head is
    never pruned) and is merged into lm_head before this returns, untying a tied lm_head
    so the input embeddings do not change (the checkpoint then stores the matrix twice).
    `dist` makes this one rank of a data-parallel run (see `train_lm`).
    """
    model = ckpt.model
    if ckpt.adapters_config is not None:
        raise UsageError(f"{ckpt.source} has unmerged adapters; run `perp merge` on it first")
    kind = adapters_mod.canonical_kind(opts.adapter) if opts.adapter and opts.adapter != "none" else None
    parts = trainable_mod.parse_spec(opts.train)
    if opts.untie_lm_head:
        trainable_mod.untie_lm_head(model)
    added = trainable_mod.add_biases(model) if opts.add_biases else []
    params = trainable_mod.select_trainable(model, opts.train)
    tied = trainable_mod.lm_head_is_tied(model) and bool({"lm_head", "embeddings", "all"} & set(parts))
    torch.manual_seed(cfg.seed)
    adapters = (
        adapters_mod.attach(model, kind, opts.rank, opts.alpha, opts.adapter_targets, ckpt.masks) if kind else {}
    )
    head, handle = adapters_mod.attach_lm_head(model, opts.rank, opts.alpha) if "lm_head-lora" in parts else (None, None)
    trained = {**adapters, "lm_head": head} if head is not None else adapters
    try:
        result = train_lm(model, windows, cfg, params, trained, ckpt.masks, eval_fn, quiet, dist, report)
    finally:
        adapters_mod.detach(model)
        if handle is not None:
            handle.remove()
    head_state = None  # None, "merged", or "merged, lm_head untied"
    if head is not None:  # dense (lm_head is never pruned): merged now, untied first if tied
        head_state = "merged, lm_head untied" if adapters_mod.merge_lm_head(model, head) else "merged"
    n_train = sum(p.numel() for p in params.values()) + sum(p.numel() for a in trained.values() for p in a.parameters())
    total = trainable_mod.count_parameters(model)
    return RetrainOutcome({
        "trainable_parameters": n_train, "total_parameters": total, "trainable_share": round(n_train / total, 8), "trained": parts,
        "tied_lm_head": tied, "added_biases": len(added), "dense_retraining": ckpt.masks is None, "adapters": len(adapters),
        "lm_head_lora": head_state, **result.summary(),
    }, adapters)


@dataclass(kw_only=True)
class Config(Step):
    options: RetrainOptions
    train: TrainConfig  # steps: replaced by --steps / --tokens once the sequence length is known
    preset: str = "perp"  # the --recipe the defaults came from (recorded)
    data: str = "c4"
    text_field: str = "text"
    data_mode: str = "windows"  # windows | documents
    seqlen: int | None = None
    steps: int | None = None
    tokens: int | None = None
    eval_data: str | None = None
    eval_windows: int = 32
    export_peft: Path | None = None
    device: str = "auto"
    device_map: str | None = None


@dataclass(kw_only=True)
class Outcome(recipes.Outcome):
    written: bool  # False on the ranks of a data-parallel run that are not rank 0


def run(config: Config, report: Reporter = SILENT) -> Outcome:
    opts, cfg = config.options, config.train
    kind = None if opts.adapter.strip().lower() == "none" else adapters_mod.canonical_kind(opts.adapter)
    if config.export_peft is not None and kind != "lora":
        raise UsageError("--export-peft needs --adapter lora (PEFT has no MaskLoRA/ScaleLoRA equivalent)")
    if config.steps is not None and config.tokens is not None:
        raise UsageError("give --steps or --tokens, not both")
    if cfg.eval_every and config.eval_data is None:
        raise UsageError("--eval-every needs --eval-data (held-out text)")
    cfg.validate()
    if trainable_mod.parse_spec(opts.train) == ["none"] and kind is None:
        raise UsageError("--train none with --adapter none trains nothing; choose a subset or an adapter")
    if config.device_map is not None and config.device != "auto":
        raise UsageError("give --device or --device-map, not both")
    checkpoint.device_map_kwargs(config.device_map)
    inputs = [config.data, config.eval_data]
    config.check_output(*inputs)
    if config.export_peft is not None:
        config.check_output(*inputs, config.output, output=config.export_peft)
        if config.output.expanduser().resolve() in config.export_peft.expanduser().resolve().parents:
            raise UsageError(f"--export-peft {config.export_peft} is inside the output {config.output}; choose a directory beside it")
    dist = distributed.setup(config.device)
    if dist is not None:
        if config.device_map is not None:
            raise UsageError("--device-map spreads one model over the GPUs; a torchrun / accelerate launch gives each process its own GPU: use one or the other")
        dist.local_slice(cfg.batch_size)  # an uneven split fails now, not after loading

    # --- the library calls: open ------------------------------------------------------
    ckpt = checkpoint.open(config.model, dtype=config.dtype, device=str(dist.device) if dist else config.device,
                           allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code, need_tokenizer=True,
                           device_map=config.device_map, trust_inputs=config.trust_inputs)
    # -----------------------------------------------------------------------------------
    offloaded = checkpoint.offloaded_parameters(ckpt.model) if config.device_map else []
    if offloaded:
        raise UsageError(
            f"--device-map {config.device_map} offloaded {len(offloaded)} parameters (e.g. {offloaded[0]}) to CPU/disk, "
            "where they cannot train; use more GPUs, --dtype bfloat16, or a smaller model"
        )
    seqlen = data.default_seqlen(ckpt.model, config.seqlen)
    per_step = cfg.batch_size * cfg.grad_accum * seqlen
    cfg.steps = math.ceil(config.tokens / per_step) if config.tokens is not None else (100 if config.steps is None else config.steps)
    # the training windows are drawn up front: their token ids must fit in memory
    memory.require(cfg.steps * per_step * 8, f"{cfg.steps:,} steps x {cfg.batch_size * cfg.grad_accum} windows x {seqlen} tokens of training data",
                   "lower --steps / --tokens")
    if kind is not None:
        check_rank(ckpt.model, opts.rank, opts.adapter_targets)
    if config.eval_data is not None and not cfg.eval_every:
        cfg.eval_every = cfg.steps
    if ckpt.masks is None and kind in adapters_mod.NEEDS_MASK:
        raise UsageError(f"--adapter {kind} needs the pruning masks, but {config.model} has no masks.safetensors (a dense model: use scalelora or lora)")

    source = data.load_source(config.data, split="train", text_field=config.text_field)
    needed = cfg.steps * cfg.batch_size * cfg.grad_accum
    if config.data_mode == "documents":
        windows = data.document_windows(ckpt.tokenizer, source, needed, seqlen, seed=config.seed)
    else:
        windows = data.sample_windows(ckpt.tokenizer, source, nsamples=needed, seqlen=seqlen, seed=config.seed, within_data=False)
    eval_fn, eval_record = None, {}
    if config.eval_data is not None:
        from perp_cli.perplexity import eval_token_ids, perplexity

        eval_source = data.load_source(config.eval_data, split="test", text_field=config.text_field)
        eval_ids = eval_token_ids(ckpt.tokenizer, eval_source, seqlen)
        eval_record = {**eval_source.describe(), "windows": config.eval_windows, "seqlen": seqlen}

        def held_out_perplexity() -> float:
            return perplexity(ckpt.model, eval_ids, seqlen, cfg.batch_size, max_windows=config.eval_windows, quiet=True).ppl

        eval_fn = held_out_perplexity

    step = config.record("retrain", {
        "model": config.model, "output": str(config.output), "recipe": config.preset, "data_mode": config.data_mode, "train": opts.train,
        "add_biases": opts.add_biases, "untie_lm_head": opts.untie_lm_head, "adapter": kind or "none", "adapter_targets": opts.adapter_targets,
        "rank": opts.rank, "alpha": opts.alpha, "data": config.data, "seqlen": seqlen, "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum, "steps": cfg.steps, "tokens": config.tokens, "lr": cfg.lr, "warmup": cfg.warmup,
        "schedule": cfg.schedule, "weight_decay": cfg.weight_decay, "grad_checkpointing": cfg.grad_checkpointing,
        "eval_every": cfg.eval_every, "eval_data": config.eval_data, "eval_windows": config.eval_windows, "dtype": config.dtype,
        "device": config.device, "export_peft": config.export_peft, "device_map": config.device_map,
    })
    # --- the library calls: train and write -------------------------------------------
    outcome = retrain(ckpt, opts, cfg, windows, eval_fn=eval_fn, quiet=report.quiet, dist=dist, report=report)
    step.data = {"train": data.describe_tokens(source, windows), **({"eval": eval_record} if eval_record else {})}
    results = {**outcome.results, **(dist.describe(cfg.batch_size) if dist else {"world_size": 1})}
    if results["tied_lm_head"]:
        results["note"] = "lm_head is tied to the input embeddings: training one trained the other"
    step.results = results

    def write() -> None:
        peft = adapters_mod.peft_files(outcome.adapters, ckpt.model, str(config.output.resolve())) if config.export_peft else None
        checkpoint.save(config.output, ckpt.model, ckpt.tokenizer, ckpt.masks, manifest_in=ckpt.manifest, step=step,
                        overwrite=config.replace, adapters=adapters_mod.state_dict(outcome.adapters) if outcome.adapters else None,
                        adapters_config=adapters_mod.config(outcome.adapters, opts.adapter_targets) if outcome.adapters else None)
        if peft is not None:
            _write_peft(config.export_peft, *peft, overwrite=config.replace)

    if dist is None:
        write()
    else:  # every rank holds the same trained weights; rank 0 writes them, the others wait for it
        dist.on_main(write)
        dist.close()
    # -----------------------------------------------------------------------------------
    return Outcome(results=results, written=dist is None or dist.is_main)


def _write_peft(where: Path, cfg: dict, tensors: dict, overwrite: bool) -> None:
    """A PEFT adapter directory, written atomically like a checkpoint."""
    from safetensors.torch import save_file

    with checkpoint.staging(where, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
