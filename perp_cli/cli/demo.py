"""`perp demo [MODEL]`: the main job end to end, as the shell pipeline a user would write.

prune (SparseGPT) → retrain (biases + norms + MaskLoRA) → merge → inspect → eval, each
step a real `perp` subcommand reading the previous step's directory. Every command line
is printed first, so the demo doubles as a template for your own pipeline. It ends with
the story in numbers: held-out perplexity dense → pruned → recovered, the share of the
pruning gap the recovery closed, and the share of the parameters it trained.

With no MODEL it runs on the embedded default shipped in the package (perp_cli/demo/model,
see its MODEL_CARD.md): a small LLaMA-style model trained on C4 documents, so pruning
hurts it the way it hurts a real LLM. The demo calibrates and retrains on one built-in
text (calibration.jsonl) and evaluates on another (heldout.jsonl); the model never saw
either, and the recovery never sees the evaluation text. No download, no ../shared.
"""

from __future__ import annotations

import json
import shlex
import shutil
from importlib.resources import as_file, files
from pathlib import Path
from typing import Annotated, Any, Callable

import torch
import typer

from perp_cli.cli.common import DeviceOpt, OverwriteOpt, QuietOpt, SeedOpt
from perp_cli.errors import PerpError, UsageError
from perp_cli.progress import console
from perp_cli.recipes.demo import lacks_biases, write_embedded_default

CALIBRATION_TEXT = "demo/calibration.jsonl"
HELDOUT_TEXT = "demo/heldout.jsonl"
METHODS = ("magnitude", "wanda", "sparsegpt")

EMBEDDED_NOTE = (
    "no model given: using perp's embedded default, a 1.1M-parameter LLaMA-style model trained on C4 "
    "(see perp_cli/demo/model/MODEL_CARD.md). Pass a model directory to run the same chain on it."
)


def gap_closed(dense: float, pruned: float, recovered: float) -> float:
    """Share of the perplexity that pruning added and the recovery took back (1 = back to dense)."""
    return (pruned - recovered) / (pruned - dense) if pruned != dense else float("nan")


def demo(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Argument(help="Model directory or hub id. Omit to use the embedded default (no download).", show_default=False)
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory that receives one checkpoint per step and eval.json.")] = Path("perp-demo"),
    method: Annotated[str, typer.Option("--method", help="Pruning method: magnitude, wanda or sparsegpt.")] = "sparsegpt",
    sparsity: Annotated[float, typer.Option("--sparsity", help="Unstructured sparsity to prune to: high enough that the damage shows (SparseGPT barely hurts the embedded model at 60%).")] = 0.8,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Calibration and retraining text (c4, wikitext2 or a local file). Default: the built-in calibration text (50 C4 documents).", show_default=False),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval-data", help="Held-out evaluation text (c4, wikitext2 or a local file). Default: the built-in held-out text (50 other C4 documents).", show_default=False),
    ] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window for every step.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Retraining steps (of 4 windows).")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="Peak retraining learning rate.")] = 2e-3,
    rank: Annotated[int, typer.Option("--rank", help="MaskLoRA rank.")] = 4,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Run prune → retrain (biases, norms, MaskLoRA) → merge → inspect → eval, printing each
    command, then the story in numbers: held-out perplexity dense → pruned → recovered and
    the share of the pruning gap closed."""
    run_command: Callable[[list[str]], int] = ctx.find_root().obj  # `perp`'s own main: each step runs as from the shell
    if method not in METHODS:
        raise UsageError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"--sparsity must be in [0.0, 1.0), got {sparsity}")
    if output.exists() and not overwrite:
        raise UsageError(f"{output} already exists; pass --overwrite or choose another -o")
    output.mkdir(parents=True, exist_ok=True)
    builtin = files("perp_cli")
    with as_file(builtin.joinpath(CALIBRATION_TEXT)) as calib_text, as_file(builtin.joinpath(HELDOUT_TEXT)) as heldout_text:
        train_text, test_text = data or str(calib_text), eval_data or str(heldout_text)
        embedded = model is None
        if embedded:
            console.print(f"[yellow]{EMBEDDED_NOTE}[/]")
            # The embedded model's 128-wide matrices gain little from threads, while OpenMP workers
            # spinning on a busy machine made the demo 8x slower (11 min instead of 85 s at load 10
            # on 2 cores). Set here, after torch has loaded; left in place (the process ends).
            torch.set_num_threads(1)
            model = str(output / "0-dense")
            write_embedded_default(Path(model))
        add_biases = lacks_biases(model)
        pruned, retrained, merged = (str(output / name) for name in ("1-pruned", "2-retrained", "3-merged"))
        report = output / "eval.json"
        common = ["--seed", str(seed), "--device", device] + (["--quiet"] if quiet else []) + (["--overwrite"] if overwrite else [])
        trained = "biases" + (" (added, zero-initialised)" if add_biases else "") + f", norms and MaskLoRA rank {rank}"
        pipeline = [
            (f"prune: {method} sets {sparsity:.0%} of the weights of every linear layer to zero"
             + (", calibrated on 16 windows of the calibration text." if method != "magnitude" else " (smallest |w| first)."),
             ["prune", model, "-o", pruned, "--method", method, "--sparsity", str(sparsity), "--calib", train_text,
              "--nsamples", "16", "--seqlen", str(seqlen), *common]),
            (f"retrain (PERP): trains only the {trained} for {steps} steps on the calibration text; "
             "every pruned weight stays exactly zero.",
             ["retrain", pruned, "-o", retrained, "--train", "biases,norms", *(["--add-biases"] if add_biases else []),
              "--adapter", "masklora", "--rank", str(rank), "--alpha", str(2 * rank), "--lr", str(lr),
              "--data", train_text, "--seqlen", str(seqlen), "--batch-size", "4", "--steps", str(steps), *common]),
            ("merge: folds the adapter into the weights under the mask: a plain, still sparse checkpoint.",
             ["merge", retrained, "-o", merged, *common]),
            ("inspect: checks that every masked weight is exactly zero and the sparsity is as asked.",
             ["inspect", merged, "--expect-sparsity", str(sparsity), "--per-block"] + (["--quiet"] if quiet else [])),
            ("eval: perplexity of dense, pruned and recovered models on the held-out text (lower is better).",
             ["eval", model, pruned, merged, "--dataset", test_text, "--seqlen", str(seqlen), "--batch-size", "8",
              "--device", device, "-o", str(report)] + (["--quiet"] if quiet else [])),
        ]
        for number, (what, argv) in enumerate(pipeline, 1):
            console.print(f"\n[bold]step {number}/{len(pipeline)}, {what}[/]\n  perp {shlex.join(argv)}", highlight=False)
            code = run_command(argv)
            if code != 0:
                raise PerpError(f"demo stopped: step {number} (perp {argv[0]}) exited with {code}")
    where = ("the built-in held-out text, which none of these models trained on" if embedded and eval_data is None
             else Path(test_text).name)
    print_story(json.loads(report.read_text(encoding="utf-8"))["results"], method, sparsity, where)
    console.print(f"\n[green]done.[/] Checkpoints in {output}/: each loads with AutoModelForCausalLM.from_pretrained.")
    if shutil.which("perp") is None:
        console.print("(the `perp` console script is not on PATH; `python -m perp_cli` runs the same commands)")


def print_story(results: list[dict[str, Any]], method: str, sparsity: float, where: str) -> None:
    """The demo's last words, from the `perp eval -o` results of the dense, pruned and recovered
    models: what pruning cost and what the recovery won back."""
    dense, pruned, recovered = (next(iter(r["perplexity"].values()))["ppl"] for r in results)
    share = results[2]["trainable_share"]
    console.print(
        f"\n[bold]perplexity[/] on {where}:\n"
        f"  dense      {dense:9.2f}\n"
        f"  pruned     {pruned:9.2f}   {method} {sparsity:.0%}: {pruned - dense:+.2f}\n"
        f"  recovered  {recovered:9.2f}   PERP, {float('nan') if share is None else share:.2%} of the parameters trained, "
        f"still {sparsity:.0%} sparse\n"
        f"[bold]PERP closed {gap_closed(dense, pruned, recovered):.0%} of the gap that pruning opened[/].",
        highlight=False,
    )
