"""`perp demo [MODEL]`: the main job end to end, as the shell pipeline a user would write.

prune (SparseGPT) → retrain (biases + norms + MaskLoRA) → merge → inspect → eval, each
step a real `perp` subcommand reading the previous step's directory. Every command line
is printed first, so the demo doubles as a template for your own pipeline.

With no MODEL it runs on the embedded default: a tiny OPT-style model built
deterministically from a built-in config (random weights, byte-level tokenizer) and a
small built-in English text, so it needs no download and no ../shared. Its numbers show
the pipeline working, not the method's quality (random weights know no language).
"""

from __future__ import annotations

import shlex
import shutil
from importlib.resources import as_file, files
from pathlib import Path
from typing import Annotated

import typer

from perp_cli import checkpoint, tiny
from perp_cli.cli.common import DeviceOpt, OverwriteOpt, QuietOpt, SeedOpt
from perp_cli.errors import PerpError, UsageError
from perp_cli.manifest import StepRecord
from perp_cli.progress import console

EMBEDDED_NOTE = (
    "no model given: using perp's embedded default, a tiny OPT-style model built from a built-in config "
    "(random weights, byte-level tokenizer) with a built-in English text. Pass a model directory to run on it."
)


def write_embedded_default(out: Path, seed: int) -> None:
    """Save the embedded default model as an ordinary checkpoint directory."""
    model = tiny.build_model(tiny.DEFAULT_FAMILY, seed=seed)
    step = StepRecord("demo-init", {"family": tiny.DEFAULT_FAMILY, "config": tiny.FAMILY_CONFIGS[tiny.DEFAULT_FAMILY]},
                      input=None, seed=seed)
    checkpoint.save(out, model, tiny.build_tokenizer(), None, {"history": []}, step, overwrite=True)


def demo(
    model: Annotated[
        str | None, typer.Argument(help="Model directory or hub id. Omit to use the embedded default (no download).", show_default=False)
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory that receives one checkpoint per step.")] = Path("perp-demo"),
    method: Annotated[str, typer.Option("--method", help="Pruning method: magnitude, wanda or sparsegpt.")] = "sparsegpt",
    sparsity: Annotated[float, typer.Option("--sparsity", help="Unstructured sparsity to prune to.")] = 0.5,
    data: Annotated[
        str | None, typer.Option("--data", help="Calibration, training and evaluation text (c4, wikitext2 or a local file). Default: the built-in text.")
    ] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window for every step.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Retraining steps.")] = 30,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Run prune → retrain (biases, norms, MaskLoRA) → merge → inspect → eval, printing each command."""
    from perp_cli.cli.app import main  # the subcommands run exactly as from the shell

    if output.exists() and not overwrite:
        raise UsageError(f"{output} already exists; pass --overwrite or choose another -o")
    output.mkdir(parents=True, exist_ok=True)
    with as_file(files("perp_cli").joinpath("demo/corpus.txt")) as corpus:
        text = data or str(corpus)
        if model is None:
            console.print(f"[yellow]{EMBEDDED_NOTE}[/]")
            model = str(output / "0-dense")
            write_embedded_default(Path(model), seed)
        pruned, retrained, merged = (str(output / name) for name in ("1-pruned", "2-retrained", "3-merged"))
        common = ["--seed", str(seed), "--device", device] + (["--quiet"] if quiet else []) + (["--overwrite"] if overwrite else [])
        calib = ["--seqlen", str(seqlen), "--calib-concat"] if data is None else ["--seqlen", str(seqlen)]
        pipeline = [
            ["prune", model, "-o", pruned, "--method", method, "--sparsity", str(sparsity), "--calib", text,
             "--nsamples", "16", *calib, *common],
            ["retrain", pruned, "-o", retrained, "--train", "biases,norms", "--adapter", "masklora",
             "--data", text, "--seqlen", str(seqlen), "--batch-size", "4", "--steps", str(steps), *common],
            ["merge", retrained, "-o", merged, *common],
            ["inspect", merged, "--expect-sparsity", str(sparsity), "--per-block"] + (["--quiet"] if quiet else []),
            ["eval", model, pruned, merged, "--dataset", text, "--seqlen", str(seqlen), "--device", device]
            + (["--quiet"] if quiet else []),
        ]
        for number, argv in enumerate(pipeline, 1):
            console.print(f"\n[bold]step {number}/{len(pipeline)}:[/] perp {shlex.join(argv)}", highlight=False)
            code = main(argv)
            if code != 0:
                raise PerpError(f"demo stopped: step {number} (perp {argv[0]}) exited with {code}")
    console.print(f"\n[green]done.[/] Checkpoints in {output}/: each loads with AutoModelForCausalLM.from_pretrained.")
    if shutil.which("perp") is None:
        console.print("(the `perp` console script is not on PATH; `python -m perp_cli` runs the same commands)")
