"""`perp eval DIR [DIR ...]`: perplexity and zero-shot accuracy, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from perp_cli.cli.common import AllowPickleOpt, DeviceOpt, DtypeOpt, JsonOpt, QuietOpt, SeedOpt, TrustInputsOpt, TrustRemoteCodeOpt, emit_json
from perp_cli.evaluation import EvalSettings, comparison_rows
from perp_cli.progress import Reporter, console
from perp_cli.recipes.evaluate import Config, run
from perp_cli.zeroshot import parse_tasks


def eval_cmd(
    models: Annotated[
        list[str],
        typer.Argument(metavar="DIR...", help="Checkpoints to evaluate (perp or Hugging Face directories, or hub ids); several give one table side by side.", show_default=False),
    ],
    dataset: Annotated[
        list[str] | None,
        typer.Option("--dataset", "-d", help="Perplexity data, repeatable: wikitext2, c4 (hub; WikiText-2 / SparseGPT-Wanda C4 protocol) or a local file (.txt/.raw read as WikiText rows; .jsonl/.parquet as C4 documents). Default: wikitext2, unless only --tasks is given.", show_default=False),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split of hub datasets (c4 maps test to its validation shard) and datasets directories.")] = "test",
    text_field: Annotated[str, typer.Option("--text-field", help="Text field of .jsonl/.parquet/datasets sources.")] = "text",
    seqlen: Annotated[int | None, typer.Option("--seqlen", help="Window length in tokens. Default: min(2048, the model's max positions).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward pass (and lm-eval batch size); changes speed and memory, not results.")] = 1,
    max_windows: Annotated[int | None, typer.Option("--max-windows", help="Score only the first N windows (quick runs; recorded). Default: all, as the papers do.", show_default=False)] = None,
    add_bos: Annotated[bool | None, typer.Option("--add-bos/--no-add-bos", help="Force a BOS token at the start of the stream, or strip it. Default: the tokenizer's own behaviour (recorded).", show_default=False)] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option("--tasks", "-t", help="lm-eval tasks, comma-separated or repeated; 'paper' = boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa. Needs pip install 'perp[eval]'. Default: none.", show_default=False),
    ] = None,
    limit: Annotated[float | None, typer.Option("--limit", help="lm-eval: at most N documents per task (or a fraction < 1), for quick runs. Default: all.", show_default=False)] = None,
    include_path: Annotated[Path | None, typer.Option("--include-path", help="lm-eval: a directory of extra task YAMLs (local tasks run offline).", show_default=False)] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="lm-eval: few-shot examples. Default: the task's own (0 for the paper tasks).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also save all results as JSON to this file (never inside an evaluated checkpoint).", show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw a bar chart (.png/.pdf/.svg) of perplexity per dataset and sparsity per checkpoint (and mean zero-shot accuracy with --tasks). Needs pip install 'perp[plot]'. Default: no plot.", show_default=False)] = None,
    record: Annotated[bool, typer.Option("--record", help="Append the results to each directory's perp.json ('evaluations'); without it eval never writes to a checkpoint.")] = False,
    json_out: JsonOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: Annotated[str | None, typer.Option("--device-map", help="auto (or balanced, balanced_low_0, sequential): spread a model too big for one device over all visible GPUs, then CPU RAM, then --offload-dir (Accelerate), instead of --device; without a GPU everything runs on the CPU. Default: off.", show_default=False)] = None,
    offload_dir: Annotated[Path | None, typer.Option("--offload-dir", help="With --device-map: a directory for the weights that fit neither the GPUs nor CPU RAM. Default: none (such a model fails to load).", show_default=False)] = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    trust_inputs: TrustInputsOpt = False,
) -> None:
    """Perplexity (WikiText-2 / C4 protocols of Wanda, SparseGPT and PERP) and zero-shot
    accuracy (lm-evaluation-harness) of one or more checkpoints, in one table.

    Perplexity: the text is tokenized once, cut into non-overlapping windows of --seqlen
    tokens (remainder dropped), exp of the mean next-token NLL. A directory with unmerged
    adapters is scored with them applied.
    """
    task_list = parse_tasks(tasks)
    settings = EvalSettings(
        datasets=list(dataset) if dataset else ([] if task_list else ["wikitext2"]),
        split=split, text_field=text_field, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows,
        add_bos=add_bos, tasks=task_list, limit=limit, include_path=str(include_path) if include_path else None,
        num_fewshot=num_fewshot, seed=seed, dtype=dtype, device=device, device_map=device_map,
        offload_dir=str(offload_dir) if offload_dir else None, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, trust_inputs=trust_inputs, record=record, quiet=quiet,
    )
    outcome = run(Config(models, settings, output, plot, inputs=list(dataset or []) + ([str(include_path)] if include_path else [])),
                  Reporter(quiet))
    if json_out:
        emit_json(outcome.summary)
    if not quiet:
        _render(outcome.results)


def _render(results: list[dict[str, Any]]) -> None:
    header, rows = comparison_rows(results)
    windows = sorted({(label, p["windows"], p["seqlen"], p["add_bos"]) for r in results for label, p in r["perplexity"].items()})
    caption = "; ".join(f"{label}: {w} windows x {s} tokens{', BOS' if bos else ''}" for label, w, s, bos in windows)
    table = Table(title="perp eval", title_justify="left", caption=caption or None, caption_justify="left")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
