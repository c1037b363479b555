"""The command-line arguments every tiny-opt quality bench shares (model, data, windows)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PERP_SHARED", ROOT.parent / "shared"))


def quality_parser(doc: str | None, nsamples: int, seqlen: int) -> argparse.ArgumentParser:
    """A parser with the shared checkpoint, calibration and WikiText-2 evaluation arguments;
    each bench adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "tiny-opt"))
    parser.add_argument("--calib", default=str(SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"))
    parser.add_argument("--eval", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--nsamples", type=int, default=nsamples)
    parser.add_argument("--seqlen", type=int, default=seqlen)
    parser.add_argument("--eval-seqlen", type=int, default=seqlen)
    parser.add_argument("--windows", type=int, default=100, help="WikiText-2 windows evaluated (0 = all)")
    return parser
