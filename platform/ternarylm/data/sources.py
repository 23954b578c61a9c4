"""Text sources: local .txt / .jsonl / .parquet files and Hugging Face hub datasets, as documents.

split_documents yields (train, validation) documents: the hub's own splits, a separate
validation source, or a contiguous tail of a single local file. Project Gutenberg books lose
their licence header and footer and stay one document.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from ternarylm.core.errors import UserError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_LOCAL_HINT = (
    "use a local file instead: source='path/to/file.txt' (documents separated by blank lines), "
    "'.jsonl' or '.parquet' (text in text_column); samples live in ../shared/data next to the "
    "repository, e.g. ../shared/data/tinystories/tinystories_sample.txt"
)
_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK[^*]*\*\*\*", re.I)
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK", re.I)


class DataError(UserError):
    """Unusable data or data settings; the message names the input and how to fix it."""


def split_documents(
    source: str, val_source: str | None, text_column: str, val_fraction: float
) -> tuple[Iterable[str], Iterable[str]]:
    """(train, validation) documents: hub splits, a separate file, or a single file's tail."""
    if val_source is not None:
        train = _whole_source(source, "train", text_column)
        return train, _whole_source(val_source, "validation", text_column)
    if not is_local(source):
        train = _hub_documents(source, "train", text_column)
        return train, _hub_documents(source, "validation", text_column)
    units, one_document = _read_units(local_file(source), text_column)
    train, val = _tail_split(units, val_fraction, source)
    return _as_documents(train, one_document), _as_documents(val, one_document)


def _whole_source(source: str, split: str, column: str) -> Iterable[str]:
    if not is_local(source):
        return _hub_documents(source, split, column)
    return _as_documents(*_read_units(local_file(source), column))


def read_local(path: str | Path, text_column: str = "text") -> list[str]:
    """Documents of a local .txt / .jsonl / .parquet file, as the pipeline reads them."""
    return _as_documents(*_read_units(local_file(str(path)), text_column))


def is_local(source: str) -> bool:
    """A path (existing, with a known suffix, or explicitly relative/absolute), not a hub id."""
    return (
        Path(source).expanduser().exists()
        or source.endswith(LOCAL_SUFFIXES + (".json",))
        or source.startswith(("/", "./", "../", "~"))
    )


def local_file(source: str) -> Path:
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise DataError(f"{path}: file not found; pass an existing .txt/.jsonl/.parquet file")
    if not path.is_file():
        raise DataError(f"{path}: is a directory; pass one .txt/.jsonl/.parquet file inside it")
    if path.suffix not in LOCAL_SUFFIXES:
        supported = ", ".join(LOCAL_SUFFIXES)
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {supported}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; pass a file with text in it")
    return path


def _read_units(path: Path, column: str) -> tuple[list[str], bool]:
    """Text units of a file, in order, and whether they are paragraphs of a single document."""
    if path.suffix == ".txt":
        units, one_document = _txt_units(_decode(path.read_bytes(), path))
    else:
        units, one_document = _table_documents(path, column), False
    if not units:
        raise DataError(f"{path}: contains no text (only whitespace); pass a file with text in it")
    return units, one_document


def _as_documents(units: list[str], one_document: bool) -> list[str]:
    return ["\n\n".join(units)] if one_document else units


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text of a file: binary input is an error rather than garbage tokens."""
    if b"\x00" in data:
        raise DataError(f"{path}: contains NUL bytes, so it is binary, not text; pass a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")  # -sig: drop the BOM that Gutenberg files start with
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}); is it binary? "
            "Convert it to UTF-8 or pass a .parquet file"
        ) from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _txt_units(text: str) -> tuple[list[str], bool]:
    """Paragraphs (blank-line separated) of a .txt file, or its lines if it has no blank lines.

    Each paragraph is a document (TinyStories), except in a Project Gutenberg book: there the
    licence header and footer are dropped and the paragraphs stay one document, because an eos
    between paragraphs of a novel would teach the model boundaries that do not exist.
    """
    body = _gutenberg_body(text)
    text = text if body is None else body
    units = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(units) < 2:
        units = [line.strip() for line in text.split("\n") if line.strip()]
    return units, body is not None


def _gutenberg_body(text: str) -> str | None:
    start = _GUTENBERG_START.search(text)
    if start is None:
        return None
    end = _GUTENBERG_END.search(text, start.end())
    return text[start.end() : end.start() if end else len(text)]


def _tail_split(units: list[str], fraction: float, source: str) -> tuple[list[str], list[str]]:
    """Hold out the shortest contiguous tail with at least `fraction` of the bytes.

    Never a random sample: neighbouring paragraphs of one story would then sit on both sides
    and validation loss would measure memorisation.
    """
    if len(units) < 2:
        raise DataError(
            f"{source}: only one paragraph/line, so no validation tail can be split off; "
            "add text or pass val_source=<separate validation file>"
        )
    sizes = [len(unit.encode()) for unit in units]
    target = fraction * sum(sizes)
    cut, held = len(units), 0
    while cut > 1 and held < target:
        cut -= 1
        held += sizes[cut]
    return units[:cut], units[cut:]


def _table_documents(path: Path, column: str) -> list[str]:
    """Rows of a .jsonl / .parquet file's text column, read through Hugging Face datasets."""
    import datasets

    if path.suffix == ".jsonl":
        _check_text_prefix(path)
    builder = "json" if path.suffix == ".jsonl" else "parquet"
    # datasets copies the file into an Arrow cache; keep that copy private to this build.
    with tempfile.TemporaryDirectory() as hf_cache, _quiet_datasets():
        try:
            table = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=hf_cache
            )
        except (datasets.exceptions.DatasetsError, pa.ArrowException, OSError, ValueError) as err:
            detail = err.__cause__ or err
            message = f"{path}: cannot be read as {path.suffix} ({detail}); check the file format"
            raise DataError(message) from err
        if column not in table.column_names:
            raise DataError(
                f"{path}: no column {column!r}; available columns: {', '.join(table.column_names)}. "
                "Set text_column to one of them"
            )
        feature = table.features[column]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DataError(f"{path}: column {column!r} holds {feature}, not text; pick a text column")
        return [text.strip() for text in table[column] if text and text.strip()]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Without datasets' progress bar and its own log line of a read error: a bad file is
    one line, our DataError (a local file's conversion takes moments; nothing to watch)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _check_text_prefix(path: Path, size: int = 1 << 20) -> None:
    """Reject binary files early; a prefix suffices (datasets would fail later, less clearly)."""
    with path.open("rb") as f:
        head = f.read(size)
    if b"\x00" in head:
        raise DataError(f"{path}: contains NUL bytes, so it is binary, not JSON lines")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # prefix may end mid-char
    except UnicodeDecodeError as err:
        message = f"{path}: not UTF-8 text (bad byte at offset {err.start}); is it binary?"
        raise DataError(message) from err


def _hub_documents(name: str, split: str, column: str) -> Iterator[str]:
    """Stream a hub split (streaming: a max_train_bytes cap then downloads only what it reads)."""
    if hub_offline():
        message = f"cannot load hub dataset {name!r}: offline mode (HF_HUB_OFFLINE) is set"
        raise DataError(f"{message}; {_LOCAL_HINT}")
    import datasets

    try:
        rows = iter(datasets.load_dataset(name, split=split, streaming=True))
        first = next(rows, None)
    except (OSError, ValueError) as err:  # ConnectionError, HfHubHTTPError, missing dataset or split
        message = f"cannot load hub dataset {name!r} split {split!r} ({err}); {_LOCAL_HINT}"
        raise DataError(message) from err
    if first is None:
        return
    if column not in first:
        available = ", ".join(first)
        raise DataError(f"hub dataset {name!r}: no column {column!r}; available columns: {available}")
    for row in itertools.chain([first], rows):
        text = row[column]
        if text and text.strip():
            yield text.strip()


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE / HF_DATASETS_OFFLINE ask for no hub access."""
    # Read the environment now: datasets and huggingface_hub read it once, at import, so a
    # later HF_HUB_OFFLINE=1 would otherwise be ignored and the download would retry for ages.
    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)
