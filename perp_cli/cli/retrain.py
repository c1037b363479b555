"""`perp retrain IN -o OUT`: PERP retraining of a tiny parameter subset and/or adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from perp_cli.cli.common import DeviceOpt, DtypeOpt, ModelArg, OutputOpt, SeedOpt, Writing, emit_json, writes_checkpoint
from perp_cli.errors import UsageError
from perp_cli.progress import Reporter, console
from perp_cli.recipes.retrain import RECIPES, Config, RetrainOptions, run
from perp_cli.training import TrainConfig


@writes_checkpoint
def retrain_cmd(
    model: ModelArg,
    output: OutputOpt,
    recipe: Annotated[str, typer.Option("--recipe", help="Defaults for --train, --adapter, --batch-size, --grad-accum, --data-mode (an explicit option wins): perp = biases,norms, no adapter, 4 x 1 random windows; paper = PERP's reference: biases,norms,lm_head-lora + masklora (r 16, alpha 32), batch 1 x 2 accumulation, C4 documents truncated/padded to --seqlen. docs/fidelity.md compares them.")] = "perp",
    train: Annotated[str | None, typer.Option("--train", help="Comma list of what trains: biases (projection biases), norms (LayerNorm weight+bias / RMSNorm weight), lm_head, lm_head-lora (a dense LoRA on lm_head, --rank/--alpha, merged into lm_head when training ends; a tied lm_head is untied so the embeddings stay), embeddings, all (full retraining; pruned weights stay exactly 0), or none (adapter only). A tied lm_head IS the input embedding matrix: training it trains both (see --untie-lm-head). Default: biases,norms (perp), biases,norms,lm_head-lora (paper).", show_default=False)] = None,
    add_biases: Annotated[bool, typer.Option("--add-biases", help="Add zero-initialised biases to the projections of models without them and set the config flags so the output loads in plain transformers (LLaMA: attention_bias, mlp_bias). Refused for families without such flags.")] = False,
    untie_lm_head: Annotated[bool, typer.Option("--untie-lm-head", help="Give lm_head its own copy of the embedding matrix (tie_word_embeddings=false) so --train lm_head leaves the input embeddings alone.")] = False,
    adapter: Annotated[str | None, typer.Option("--adapter", help="none; lora (W + s·BA, merge densifies); masklora (W + s·(M⊙BA), keeps sparsity; needs masks); scalelora or multlora (W ⊙ BA, BA = 1 at init, keeps sparsity); lora-prune (dense LoRA while training, masked at merge; needs masks). s = alpha/rank. Default: none (perp), masklora (paper).", show_default=False)] = None,
    adapter_targets: Annotated[str | None, typer.Option("--adapter-targets", help="Regex (re.search) on matrix names, e.g. 'self_attn'; experts are named NAME[e]. Default: every prunable matrix.", show_default=False)] = None,
    rank: Annotated[int, typer.Option("--rank", help="Adapter rank r.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="Adapter scaling numerator: the update is (alpha/rank)·BA (unused by scalelora).")] = 32.0,
    data_source: Annotated[str, typer.Option("--data", help="Training text: c4 or wikitext2 (hub, needs network), or a local .txt/.raw/.jsonl/.parquet file or datasets directory.")] = "c4",
    text_field: Annotated[str, typer.Option("--text-field", help="Text field of .jsonl/.parquet/datasets data.")] = "text",
    data_mode: Annotated[str | None, typer.Option("--data-mode", help="windows: random windows of --seqlen tokens from documents longer than that (perp); documents: whole documents in a seeded random order, each truncated to --seqlen and right-padded (no attention, no loss on padding; PERP's reference). Default: windows (perp), documents (paper).", show_default=False)] = None,
    seqlen: Annotated[int | None, typer.Option("--seqlen", help="Tokens per training window. Default: min(2048, the model's max positions).", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Windows per micro-batch. Under torchrun / accelerate launch this is the GLOBAL micro-batch, split evenly over the processes (must divide by their number), so N processes take the same steps as one. Default: 4 (perp), 1 (paper).", show_default=False)] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches accumulated per optimizer step (effective batch = batch-size x grad-accum, whatever the number of processes). Default: 1 (perp), 2 (paper).", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps. Default 100 unless --tokens is given.", show_default=False)] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Train on this many tokens instead of --steps (rounded up to whole steps of batch-size x grad-accum x seqlen).", show_default=False)] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate.")] = 5e-4,
    warmup: Annotated[float, typer.Option("--warmup", help="Linear warmup, as a fraction of the steps, in [0, 1).")] = 0.1,
    schedule: Annotated[str, typer.Option("--schedule", help="After warmup: linear (decay to 0), cosine (decay to 0) or constant.")] = "linear",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decoupled weight decay (pruned weights stay 0 regardless).")] = 0.0,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations in the backward pass: less memory, about 30% more time.")] = False,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Print held-out perplexity on --eval-data every N steps (0: only at the end when --eval-data is given).")] = 0,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out text for --eval-every: wikitext2 (hub) or a local file, e.g. wiki.test.raw.", show_default=False)] = None,
    eval_windows: Annotated[int, typer.Option("--eval-windows", help="Evaluate the first N windows of --eval-data (of --seqlen tokens).")] = 32,
    export_peft: Annotated[Path | None, typer.Option("--export-peft", help="Also write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for --adapter lora; its base model is OUT.", show_default=False)] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    device_map: Annotated[str | None, typer.Option("--device-map", help="auto (or balanced, balanced_low_0, sequential): spread the blocks over all visible GPUs with Accelerate (everything on the CPU without one), instead of --device; the model must fit in the GPUs (offloaded weights cannot train). Not with torchrun / accelerate launch. Default: off.", show_default=False)] = None,
    dtype: DtypeOpt = "auto",
    *,
    writing: Writing,
) -> None:
    """Retrain a pruned checkpoint PERP-style; pruned weights stay exactly zero.

    Only the chosen parameters and adapters get gradients and optimizer state (float32,
    even when the frozen weights are bf16/fp16). Adapters are written unmerged
    (adapters.safetensors + adapters.json); fold them in with `perp merge`. A NaN or inf
    loss stops training and writes nothing.

    Data-parallel: `torchrun --nproc-per-node N -m perp_cli retrain ...` or `accelerate
    launch -m perp_cli retrain ...`; rank 0 alone writes the output.
    """
    if recipe not in RECIPES:
        raise UsageError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    chosen = {"train": train, "adapter": adapter, "batch_size": batch_size, "grad_accum": grad_accum, "data_mode": data_mode}
    train, adapter, batch_size, grad_accum, data_mode = (RECIPES[recipe][k] if v is None else v for k, v in chosen.items())
    if data_mode not in ("windows", "documents"):
        raise UsageError(f"--data-mode {data_mode!r} is not one of windows, documents")
    opts = RetrainOptions(train=train, adapter=adapter, adapter_targets=adapter_targets, rank=rank, alpha=alpha,
                          add_biases=add_biases, untie_lm_head=untie_lm_head)
    cfg = TrainConfig(steps=steps or 1, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
                      schedule=schedule, weight_decay=weight_decay, grad_checkpointing=grad_checkpointing,
                      eval_every=eval_every, seed=seed)
    outcome = run(Config(
        model=model, output=output, options=opts, train=cfg, preset=recipe, data=data_source, text_field=text_field, data_mode=data_mode,
        seqlen=seqlen, steps=steps, tokens=tokens, eval_data=eval_data, eval_windows=eval_windows, export_peft=export_peft,
        device=device, device_map=device_map, dtype=dtype, seed=seed, **writing.step(),
    ), Reporter(writing.quiet))
    if not outcome.written:
        return
    if writing.json:
        emit_json({"output": str(output), **outcome.results, **({"export_peft": str(export_peft)} if export_peft else {})})
    if not writing.quiet:
        _render(outcome.results, str(output))


def _render(results: dict, output: str) -> None:
    table = Table(title=f"retrain · {', '.join(results['trained'])}" + (f" + {results['adapters']} adapters" if results["adapters"] else ""), title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("trainable parameters", f"{results['trainable_parameters']:,} ({results['trainable_share']:.4%})")
    table.add_row("tokens seen", f"{results['tokens_seen']:,}")
    if results.get("lm_head_lora"):
        table.add_row("lm_head LoRA", results["lm_head_lora"])
    table.add_row("loss", f"{results['initial_loss']:.4f} → {results['final_loss']:.4f}")
    table.add_row("tokens/s", f"{results['tokens_per_s']:,.0f}")
    table.add_row("training time", f"{results['train_wall_time_s']:.1f} s")
    table.add_row("peak host memory", f"{results['peak_memory'].get('host_rss_mib', 0):,.0f} MiB")
    for record in results["evals"]:
        table.add_row(f"perplexity @ step {record['step']}", f"{record['perplexity']:.2f}")
    console.print(table)
    if results["dense_retraining"]:
        console.print("[yellow]note[/]: the input has no masks.safetensors: this was dense retraining (no sparsity to preserve)", soft_wrap=True)
    if results.get("note"):
        console.print(f"[yellow]note[/]: {results['note']}", soft_wrap=True)
    console.print(f"→ {output}", soft_wrap=True)
