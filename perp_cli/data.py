"""Text sources and token windows, shared by calibration, retraining and evaluation.

Sources are `wikitext2`, `c4` (through `datasets`, where the network allows) or a local
path: `.txt`/`.raw` (one row per line, WikiText style), `.jsonl` (`text` field or
`text_field`), `.parquet`, or a directory written by `datasets.save_to_disk`.

Sampling reproduces the Wanda/SparseGPT references: pick a random document longer than
`seqlen` tokens, then a random window inside it. Line-based sources (WikiText, .txt) are
one continuous stream, as the references treat WikiText.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Union

import torch

from perp_cli.errors import DataError, UsageError
from perp_cli.manifest import sha256_file, sha256_tensor

WIKITEXT = ("wikitext", "wikitext-2-raw-v1")
C4_REPO = "allenai/c4"
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


@dataclass
class TextSource:
    """Documents from one source. `stream` sources are read as one continuous text."""

    name: str
    documents: list[str]
    stream: bool
    sha256: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "documents": len(self.documents), "sha256": self.sha256}

    def joined(self) -> str:
        """The evaluation text: WikiText rows joined with blank lines, documents with a space."""
        return "\n\n".join(self.documents) if self.stream else " ".join(self.documents)


def read_rows(path: Path) -> list[str]:
    """WikiText rows as the HF `wikitext-2-raw-v1` dataset has them: a raw line, or ""."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line if line.strip() else "" for line in f]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _text(value: Any, where: str, text_field: str) -> str:
    """A document's text: a string; null (a record without text) is skipped as empty,
    never read as the word "None"; anything else is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is a {type(value).__name__}, not text")
    return value


def _texts(values: list[Any], where: str, text_field: str) -> list[str]:
    return [_text(v, where, text_field) for v in values]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}:{lineno} is not valid JSON") from exc
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{path}:{lineno} has no field {text_field!r} (choose one with --text-field)")
                docs.append(_text(record[text_field], f"{path}:{lineno}", text_field))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text") from exc
    return docs


def _read_dataset_dir(path: Path, split: str, text_field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path} is not a directory written by datasets.save_to_disk: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataError(f"{path} has no column {text_field!r} (choose one with --text-field)")
    return _texts(list(ds[text_field]), str(path), text_field)


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import datasets

    with open(path, "rb") as f:  # the magic bytes first: datasets logs its own lines on a bad file
        head, size = f.read(4), path.stat().st_size
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise DataError(f"{path} is not a readable parquet file (no PAR1 magic bytes at its start and end)")
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path} is not a readable parquet file: {first}") from exc
    if text_field not in ds.column_names:
        raise DataError(f"{path} has no column {text_field!r} (choose one with --text-field)")
    return _texts(list(ds[text_field]), str(path), text_field)


def _hub(name: str, split: str) -> TextSource:
    import datasets

    try:
        if name == "wikitext2":
            ds = datasets.load_dataset(*WIKITEXT, split=split)
            return TextSource("wikitext2:" + split, list(ds["text"]), stream=True)
        hub_split = "validation" if split in ("validation", "test") else "train"
        ds = datasets.load_dataset(C4_REPO, data_files={hub_split: C4_FILES[hub_split]}, split=hub_split)
        return TextSource("c4:" + hub_split, list(ds["text"]), stream=False)
    except Exception as exc:
        raise DataError(
            f"cannot load {name} from the Hugging Face hub ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "offline, pass a local file instead (e.g. wiki.test.raw or a C4 .jsonl)"
        ) from exc


def load_source(source: str, split: str = "train", text_field: str = "text") -> TextSource:
    """Documents from `source` (`wikitext2`, `c4` or a local path)."""
    if source in ("wikitext2", "c4"):
        return _hub(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"data source {source!r} is neither wikitext2, c4 nor an existing path")
    if not path.is_dir() and not path.is_file():
        raise UsageError(f"data source {source} is not a regular file (a pipe, device or socket); give a file")
    if path.is_dir():
        docs, stream = _read_dataset_dir(path, split, text_field), False
        digest = None
    else:
        suffix = path.suffix.lower()
        if suffix in (".txt", ".raw"):
            docs, stream = read_rows(path), True
        elif suffix == ".jsonl":
            docs, stream = _read_jsonl(path, text_field), False
        elif suffix == ".parquet":
            docs, stream = _read_parquet(path, text_field), False
        else:
            raise UsageError(f"{path}: unknown data format {suffix!r} (use .txt, .raw, .jsonl, .parquet or a datasets directory)")
        digest = sha256_file(path)
    if not any(d.strip() for d in docs):
        raise DataError(f"{path} contains no text")
    return TextSource(str(path), docs, stream=stream, sha256=digest)


def _token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    # verbose=False: tokenizing a whole corpus longer than model_max_length is intended here
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def sample_windows(
    tokenizer: Any,
    source: TextSource,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    concat: bool = False,
    within_data: bool = True,
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens, `[nsamples, seqlen]`, reproducibly.

    Document sources follow the references: a random document longer than `seqlen`,
    then a random window in it (documents may repeat). `concat` (and stream sources)
    draws random windows from all documents joined together instead.

    `within_data` (calibration): asking for more windows than the text holds without
    overlap is an error that says how many it holds (a typo such as 1000000000 would
    otherwise run for hours on repeats). Training passes False: epochs repeat the data.
    """
    if nsamples < 1:
        raise UsageError(f"--nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {seqlen}")
    rng = random.Random(seed)
    if source.stream or concat:
        ids = _token_ids(tokenizer, source.joined())
        if ids.numel() <= seqlen:
            raise DataError(f"{source.name} has only {ids.numel()} tokens, fewer than one window of {seqlen}")
        if within_data and nsamples > ids.numel() // seqlen:
            raise UsageError(
                f"--nsamples {nsamples} is more than {source.name} holds: {ids.numel()} tokens make "
                f"{ids.numel() // seqlen} windows of {seqlen}; ask for at most that many"
            )
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s : s + seqlen] for s in starts])

    cache: dict[int, torch.Tensor] = {}
    long_enough: set[int] = set()
    if within_data:
        _check_document_capacity(tokenizer, source, nsamples, seqlen, cache, long_enough)
    windows = []
    for _ in range(nsamples):
        while True:
            if len(cache) == len(source.documents) and not long_enough:
                raise DataError(
                    f"no document in {source.name} is longer than {seqlen} tokens; "
                    "lower --seqlen or pass --calib-concat to draw windows from the joined documents"
                )
            i = rng.randint(0, len(source.documents) - 1)
            if i not in cache:
                cache[i] = _token_ids(tokenizer, source.documents[i])
                if cache[i].numel() > seqlen:
                    long_enough.add(i)
            if i in long_enough:
                break
        ids = cache[i]
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def _check_document_capacity(
    tokenizer: Any, source: TextSource, nsamples: int, seqlen: int, cache: dict[int, torch.Tensor], long_enough: set[int]
) -> None:
    """Fail unless the documents hold `nsamples` disjoint windows of `seqlen` tokens
    (each window comes from a document longer than `seqlen`, as in the references).
    Tokenizes documents only until enough windows are found (the sampler reuses them)."""
    capacity = 0
    for i, doc in enumerate(source.documents):
        if capacity >= nsamples:
            return
        if i not in cache:
            cache[i] = _token_ids(tokenizer, doc)
            if cache[i].numel() > seqlen:
                long_enough.add(i)
        if i in long_enough:
            capacity += (cache[i].numel() - 1) // seqlen
    if capacity < nsamples and long_enough:
        raise UsageError(
            f"--nsamples {nsamples} is more than {source.name} holds: its {len(long_enough)} documents longer than "
            f"{seqlen} tokens make {capacity} windows; ask for at most that many, or pass --calib-concat"
        )

PAD = -1  # marks padding in `document_windows`: no attention, no loss


def document_windows(tokenizer: Any, source: TextSource, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` documents, each its first `seqlen` tokens, right-padded with `PAD`.

    PERP's reference retrains on C4 documents tokenized with truncation and padding to
    seqlen (the HF Trainer, shuffled): short documents give mostly padding, long ones
    lose their tail. Documents are drawn in a seeded random order (all of them before
    any repeats); empty ones are skipped. Stream sources have no documents: an error.
    """
    if source.stream:
        raise UsageError(f"{source.name} is one continuous text, not documents; use --data-mode windows")
    if nsamples < 1:
        raise UsageError(f"the number of training documents must be at least 1, got {nsamples}")
    rng = random.Random(seed)
    order: list[int] = []
    out = torch.full((nsamples, seqlen), PAD, dtype=torch.long)
    row = 0
    while row < nsamples:
        if not order:
            order = list(range(len(source.documents)))
            rng.shuffle(order)
            if row == 0 and not any(source.documents):
                raise DataError(f"{source.name} has no non-empty document")
        ids = _token_ids(tokenizer, source.documents[order.pop()])[:seqlen]
        if ids.numel() == 0:
            continue
        out[row, : ids.numel()] = ids
        row += 1
    return out


def default_seqlen(model: Any, requested: int | None) -> int:
    """min(2048, the model's positions); never raw `max_position_embeddings` uncapped."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if requested is None:
        return min(2048, positions) if positions else 2048
    if requested < 2:
        raise UsageError(f"--seqlen must be at least 2, got {requested}")
    if positions and requested > positions:
        raise UsageError(f"--seqlen {requested} exceeds the model's {positions} positions")
    return requested


def describe_tokens(source: TextSource, tokens: torch.Tensor) -> dict[str, Any]:
    """What the manifest records about the data a step consumed."""
    return {**source.describe(), "token_ids_sha256": sha256_tensor(tokens), "shape": list(tokens.shape)}


@dataclass(kw_only=True)
class CalibrationConfig:
    """The calibration windows a step samples (`--calib --text-field --nsamples --seqlen
    --calib-concat`); a part of every step's config that calibrates on text."""

    calib: str = "c4"
    text_field: str = "text"
    nsamples: int = 128
    seqlen: int | None = None  # None: `default_seqlen`
    calib_concat: bool = False


class Calibration(NamedTuple):
    tokens: torch.Tensor  # [nsamples, seqlen] token ids
    record: dict[str, Any]  # what perp.json records under the step's "data"


def calibration(tokenizer: Any, model: Any, config: CalibrationConfig, seed: int) -> Calibration:
    """Sample the calibration windows as the references do (`sample_windows`), with their record."""
    seqlen = default_seqlen(model, config.seqlen)
    source = load_source(config.calib, split="train", text_field=config.text_field)
    tokens = sample_windows(tokenizer, source, config.nsamples, seqlen, seed, config.calib_concat)
    return Calibration(tokens, {**describe_tokens(source, tokens), "seqlen": seqlen, "concat": config.calib_concat})


# what a library step takes as calibration windows: token ids (tests, benchmarks), sampled
# windows with their record, or a recipe's sampler, called once the step's own checks pass
# (so that a bad option fails before any text is read, as it did when the library sampled)
Windows = Union[torch.Tensor, Calibration, Callable[[], Calibration]]


def calibration_of(windows: Windows) -> Calibration:
    """The windows a step was given, sampled now if given as a sampler."""
    if callable(windows):
        windows = windows()
    if isinstance(windows, Calibration):
        return windows
    return Calibration(windows, {"source": "tokens given by the caller", "token_ids_sha256": sha256_tensor(windows),
                                 "shape": list(windows.shape)})
