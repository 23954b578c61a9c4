"""Data pipeline: text source -> tokenizer -> cached token arrays -> per-rank (x, y) batches.

prepare_data(DataConfig) reads a Hugging Face hub dataset or a local .txt / .jsonl / .parquet
file, holds out validation (the hub's own split, a separate file, or a contiguous tail of a
single file), trains or loads a tokenizer on the training split only, and writes each split as
one flat array of token ids, documents separated by the eos id, into a cache directory keyed by
everything that affects the tokens. WindowSampler and eval_batches turn those arrays into
batches: random windows for training, an ordered sweep of the validation split for evaluation.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ternarylm.errors import UserError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SPLITS = ("train", "validation")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
# Bump whenever reading, splitting or encoding changes, so stale caches are never reused.
FORMAT_VERSION = 1
# Special tokens that already mean "end of document" in common pretrained tokenizers.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
_LOCAL_HINT = (
    "use a local file instead: source='path/to/file.txt' (documents separated by blank lines), "
    "'.jsonl' or '.parquet' (text in text_column); samples live in ../shared/data next to the "
    "repository, e.g. ../shared/data/tinystories/tinystories_sample.txt"
)
_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK[^*]*\*\*\*", re.I)
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK", re.I)
_SPOOL_BATCH = 1024


class DataError(UserError):
    """Unusable data or data settings; the message names the input and how to fix it."""


def _default_cache_dir() -> str:
    return os.environ.get("TERNARYLM_CACHE", str(Path.home() / ".cache" / "ternarylm" / "tokens"))


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized and where the tokens are cached."""

    source: str = "roneneldan/TinyStories"
    """Hugging Face hub dataset id, or a local .txt / .jsonl / .parquet file."""
    text_column: str = "text"
    """Column holding the text in hub, .jsonl and .parquet sources (ignored for .txt)."""
    tokenizer: str = "bpe:8192"
    """'bpe:N' (byte-level BPE trained on the train split), 'char' (bytes) or 'hf:NAME|PATH'."""
    val_fraction: float = 0.1
    """Share of a single local file's bytes held out for validation, as a contiguous tail."""
    val_source: str | None = None
    """Separate validation file or hub id; None = tail of a local source / the hub's split."""
    max_train_bytes: int | None = None
    """Cap on UTF-8 bytes of training text read (hub TinyStories is ~2 GB); None = all."""
    cache_dir: str = field(default_factory=_default_cache_dir)
    """Root of the token cache: $TERNARYLM_CACHE, else ~/.cache/ternarylm/tokens."""

    def __post_init__(self) -> None:
        _parse_tokenizer(self.tokenizer)
        if not self.source.strip():
            raise DataError("source is empty: pass a hub dataset id or a .txt/.jsonl/.parquet file")
        if not self.text_column:
            raise DataError("text_column is empty: name the column that holds the text")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(
                f"val_fraction must be in (0, 1), got {self.val_fraction}: it is the share of a "
                "local file held out for validation (e.g. 0.1)"
            )
        if self.max_train_bytes is not None and self.max_train_bytes <= 0:
            raise DataError(f"max_train_bytes must be positive or None, got {self.max_train_bytes}")


@dataclass(frozen=True)
class PreparedData:
    """A built token cache: one flat token array per split and the tokenizer that made them."""

    path: Path
    """Cache directory holding {train,validation}.bin, tokenizer.json and meta.json."""
    vocab_size: int
    """Number of token ids, special tokens included."""
    eos_id: int
    """Id appended after every document."""
    train_tokens: int
    """Tokens in the training split, eos tokens included."""
    val_tokens: int
    """Tokens in the validation split, eos tokens included."""
    train_bytes: int
    """UTF-8 bytes of the training text (the denominator of bits per byte)."""
    val_bytes: int
    """UTF-8 bytes of the validation text."""
    dtype: str
    """NumPy dtype of the token files: uint16 when the vocabulary fits, else uint32."""

    @classmethod
    def load(cls, path: Path) -> PreparedData:
        meta = json.loads((path / META_FILE).read_text())
        splits = meta["splits"]
        return cls(
            path=path,
            vocab_size=meta["vocab_size"],
            eos_id=meta["eos_id"],
            train_tokens=splits["train"]["tokens"],
            val_tokens=splits["validation"]["tokens"],
            train_bytes=splits["train"]["bytes"],
            val_bytes=splits["validation"]["bytes"],
            dtype=meta["dtype"],
        )

    def tokens(self, split: str) -> np.ndarray:
        """Read-only memory map of a split's token ids (nothing is loaded until indexed)."""
        return np.memmap(self.path / f"{_check_split(split)}.bin", dtype=self.dtype, mode="r")

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / TOKENIZER_FILE))

    def bytes_per_token(self, split: str) -> float:
        """Text bytes per token; bits per byte = loss in nats / ln(2) / bytes_per_token."""
        if _check_split(split) == "train":
            return self.train_bytes / self.train_tokens
        return self.val_bytes / self.val_tokens


def prepare_data(config: DataConfig) -> PreparedData:
    """Build the token cache for config, or reuse it; a hit only reads meta.json."""
    root = Path(config.cache_dir).expanduser()
    final = root / _cache_name(config)
    if (final / META_FILE).is_file():
        log.info("reusing token cache %s", final)
        return PreparedData.load(final)
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the final path (same filesystem, so the rename is atomic); readers only
    # ever see a missing or a complete cache directory.
    build_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        log.info("building token cache %s", final)
        _build(config, build_dir)
        build_dir.chmod(0o755)  # mkdtemp makes it private; a cache is meant to be shared
        if not _publish(build_dir, final):
            log.info("another process built %s first; using its cache", final)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return PreparedData.load(final)


def vocab_size(config: DataConfig) -> int | None:
    """The vocabulary a trial of this data trains with, without building anything.

    The token cache's when it exists (exact); otherwise from the tokenizer spec: `char` is 256
    bytes + eos, `bpe:N` is N (at most: a small corpus may support fewer merges), `hf:` reads
    the tokenizer file (a local path, or the Hugging Face cache: a dry run never waits on the
    network), eos added if it has none. None when an `hf:` tokenizer is not on this machine.
    """
    cached = Path(config.cache_dir).expanduser() / _cache_name(config) / META_FILE
    if cached.is_file():
        return json.loads(cached.read_text())["vocab_size"]
    kind, arg = _parse_tokenizer(config.tokenizer)
    if kind == "char":
        return 257
    if kind == "bpe":
        return int(arg)
    if _is_local(arg):
        tok = _pretrained_tokenizer(arg)
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(arg, TOKENIZER_FILE, local_files_only=True)
        except Exception:  # not in the local cache (huggingface_hub raises several types)
            return None
        tok = Tokenizer.from_file(path)
    eos_id(tok)
    return tok.get_vocab_size(with_added_tokens=True)


def _publish(build_dir: Path, final: Path) -> bool:
    """Atomically install a finished build; False if a concurrent builder got there first."""
    try:
        build_dir.rename(final)
    except OSError as err:
        # rename(2) refuses to replace a non-empty directory, so the winner's cache, complete
        # because it was renamed into place whole, stays and this build is dropped.
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY) and (final / META_FILE).is_file():
            return False
        raise
    return True


def _build(config: DataConfig, out: Path) -> None:
    train_docs, val_docs = _split_documents(config)
    # Validation first: it is small, so a bad validation source fails before a long train read.
    stats = {
        "validation": _spool(val_docs, out / "validation.arrow", max_bytes=None),
        "train": _spool(train_docs, out / "train.arrow", max_bytes=config.max_train_bytes),
    }
    for split, (documents, _) in stats.items():
        if documents == 0:
            raise DataError(f"{config.source}: the {split} split holds no text; check the source")
    tok = build_tokenizer(config.tokenizer, _read_spool(out / "train.arrow"))
    eos = eos_id(tok)
    dtype = token_dtype(tok.get_vocab_size())
    tok.save(str(out / TOKENIZER_FILE))
    splits = {}
    for split, (documents, n_bytes) in stats.items():
        spool = out / f"{split}.arrow"
        n_tokens = _encode_spool(tok, eos, spool, out / f"{split}.bin", dtype)
        spool.unlink()
        splits[split] = {"documents": documents, "bytes": n_bytes, "tokens": n_tokens}
    meta = {
        "format": FORMAT_VERSION,
        "settings": _cache_settings(config),
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos,
        "dtype": dtype.name,
        "splits": splits,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


# ---------------------------------------------------------------------------------------------
# Cache key


def _cache_name(config: DataConfig) -> str:
    digest = hashlib.sha256(json.dumps(_cache_settings(config), sort_keys=True).encode())
    stem = Path(config.source).stem or config.source
    return f"{_slug(stem)}-{_slug(config.tokenizer)}-{digest.hexdigest()[:16]}"


def _cache_settings(config: DataConfig) -> dict:
    """Everything that changes the tokens; local files are identified by path, size and mtime."""
    return {
        "format": FORMAT_VERSION,
        "source": _source_identity(config.source),
        "val_source": None if config.val_source is None else _source_identity(config.val_source),
        "text_column": config.text_column,
        "tokenizer": _tokenizer_identity(config.tokenizer),
        "val_fraction": config.val_fraction,
        "max_train_bytes": config.max_train_bytes,
    }


def _source_identity(source: str) -> dict:
    if not _is_local(source):
        return {"hub": source}
    path = _local_file(source)
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _tokenizer_identity(spec: str) -> str:
    kind, arg = _parse_tokenizer(spec)
    if kind == "hf" and _is_local(arg):
        # A local tokenizer.json can be edited in place, so key on its content.
        return f"hf:sha256={hashlib.sha256(_tokenizer_file(arg).read_bytes()).hexdigest()}"
    return spec


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[:40]


# ---------------------------------------------------------------------------------------------
# Sources


def _split_documents(config: DataConfig) -> tuple[Iterable[str], Iterable[str]]:
    """(train, validation) documents: hub splits, a separate file, or a single file's tail."""
    if config.val_source is not None:
        train = _whole_source(config.source, "train", config.text_column)
        return train, _whole_source(config.val_source, "validation", config.text_column)
    if not _is_local(config.source):
        train = _hub_documents(config.source, "train", config.text_column)
        return train, _hub_documents(config.source, "validation", config.text_column)
    units, one_document = _read_units(_local_file(config.source), config.text_column)
    train, val = _tail_split(units, config.val_fraction, config.source)
    return _as_documents(train, one_document), _as_documents(val, one_document)


def _whole_source(source: str, split: str, column: str) -> Iterable[str]:
    if not _is_local(source):
        return _hub_documents(source, split, column)
    return _as_documents(*_read_units(_local_file(source), column))


def read_local(path: str | Path, text_column: str = "text") -> list[str]:
    """Documents of a local .txt / .jsonl / .parquet file, as the pipeline reads them."""
    return _as_documents(*_read_units(_local_file(str(path)), text_column))


def _is_local(source: str) -> bool:
    """A path (existing, with a known suffix, or explicitly relative/absolute), not a hub id."""
    return (
        Path(source).expanduser().exists()
        or source.endswith(LOCAL_SUFFIXES + (".json",))
        or source.startswith(("/", "./", "../", "~"))
    )


def _local_file(source: str) -> Path:
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
    with tempfile.TemporaryDirectory() as hf_cache:
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


# ---------------------------------------------------------------------------------------------
# Spooling: documents go to disk once, then are read twice (tokenizer training and encoding)
# without holding a streamed hub split in memory.

_SPOOL_SCHEMA = pa.schema([("text", pa.large_string())])


def _spool(docs: Iterable[str], path: Path, max_bytes: int | None) -> tuple[int, int]:
    """Write documents to an Arrow file, stopping at max_bytes; return (documents, bytes)."""
    n_docs = n_bytes = 0
    batch: list[str] = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, _SPOOL_SCHEMA) as writer:
        for doc in docs:
            size = len(doc.encode())
            truncated = max_bytes is not None and n_bytes + size > max_bytes
            if truncated:  # cut on a character boundary so the cap holds exactly
                doc = doc.encode()[: max_bytes - n_bytes].decode("utf-8", "ignore")
                size = len(doc.encode())
            if doc:
                batch.append(doc)
                n_docs, n_bytes = n_docs + 1, n_bytes + size
            if len(batch) == _SPOOL_BATCH or (truncated and batch):
                _write_spool_batch(writer, batch)
                batch = []
            if truncated:
                break
        if batch:
            _write_spool_batch(writer, batch)
    return n_docs, n_bytes


def _write_spool_batch(writer: pa.ipc.RecordBatchFileWriter, batch: list[str]) -> None:
    writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=_SPOOL_SCHEMA))


def _read_spool(path: Path) -> Iterator[list[str]]:
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i).column(0).to_pylist()


def _encode_spool(tok: Tokenizer, eos: int, spool: Path, out: Path, dtype: np.dtype) -> int:
    n_tokens = 0
    with out.open("wb") as f:
        for batch in _read_spool(spool):
            ids = encode_documents(tok, batch, eos, dtype)
            ids.tofile(f)
            n_tokens += ids.size
    return n_tokens


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _parse_tokenizer(spec: str) -> tuple[str, str | int | None]:
    kind, _, arg = spec.partition(":")
    if spec == "char":
        return "char", None
    if kind == "bpe" and arg.isdigit() and int(arg) >= 257:
        return "bpe", int(arg)
    if kind == "hf" and arg:
        return "hf", arg
    raise DataError(
        f"tokenizer {spec!r} is not one of 'bpe:N' (N >= 257: 256 bytes + eos), 'char', "
        "'hf:NAME' (pretrained name or path to a tokenizer.json / its directory)"
    )


def build_tokenizer(spec: str, train_texts: Iterable[str | list[str]]) -> Tokenizer:
    """The tokenizer for a spec; 'bpe:N' is trained on train_texts (strings or batches of them)."""
    kind, arg = _parse_tokenizer(spec)
    if kind == "char":
        return _byte_tokenizer()
    if kind == "bpe":
        tok = _byte_level(Tokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=arg,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
            show_progress=False,
        )
        tok.train_from_iterator(train_texts, trainer)
        return tok
    return _pretrained_tokenizer(arg)


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte, token id == byte value, eos = 256."""
    # ByteLevel pre-tokenization maps byte b to the printable character _byte_chars()[b]; a BPE
    # model with exactly those 256 symbols and no merges then emits one token per byte.
    vocab = {char: byte for byte, char in enumerate(_byte_chars())}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode table, the one the ByteLevel pre-tokenizer uses."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _pretrained_tokenizer(name: str) -> Tokenizer:
    if _is_local(name):
        path = _tokenizer_file(name)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise DataError(f"{path}: not a valid tokenizer.json ({err})") from err
    else:
        fix = "pass hf:<path to tokenizer.json or its directory>, or use bpe:N / char"
        if hub_offline():
            raise DataError(f"cannot fetch tokenizer {name!r}: HF_HUB_OFFLINE is set; {fix}")
        try:
            tok = Tokenizer.from_pretrained(name)
        except Exception as err:  # network errors surface as OSError or the Rust bare Exception
            raise DataError(f"cannot fetch tokenizer {name!r} from the hub ({err}); {fix}") from err
    # Documents are concatenated into one stream, so padding/truncation settings must not apply.
    tok.no_padding()
    tok.no_truncation()
    return tok


def _tokenizer_file(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found; pass hf:<tokenizer.json or its directory>")
    return path


def eos_id(tok: Tokenizer) -> int:
    """The tokenizer's end-of-document id, adding <|endoftext|> if it has none."""
    for token in _EOS_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    tok.add_special_tokens([EOS_TOKEN])
    return tok.token_to_id(EOS_TOKEN)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_documents(
    tok: Tokenizer, docs: list[str], eos: int, dtype: np.dtype = np.dtype(np.uint32)
) -> np.ndarray:
    """Token ids of documents, each followed by eos, as one flat array."""
    # encode_batch_fast (tokenizers >= 0.21) skips offset tracking, ~3x faster on long documents.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode(docs, add_special_tokens=False)  # no [CLS]/[SEP] around each document
    ids = itertools.chain.from_iterable((*enc.ids, eos) for enc in encodings)
    return np.fromiter(ids, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Batches


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _require_tokens(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    needed = seq_len + 1
    if len(tokens) < needed:
        where = f" ({tokens.filename})" if getattr(tokens, "filename", None) else ""
        raise DataError(
            f"{what} split{where} has {len(tokens)} tokens but one sequence needs seq_len + 1 = "
            f"{needed}: use a smaller seq_len or a bigger source file"
        )


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class WindowSampler:
    """Random training windows of seq_len + 1 tokens for one rank.

    batch(step, micro_step) is a pure function of (seed, rank, world_size, step, micro_step):
    resuming at a step replays exactly, with no sampler state to checkpoint.
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, micro_batch: int, rank: int, world_size: int, seed: int
    ):
        _require_tokens(tokens, seq_len, "training")
        _check_rank(rank, world_size)
        if micro_batch < 1 or seed < 0:
            raise ValueError(f"need micro_batch >= 1 and seed >= 0, got {micro_batch} and {seed}")
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [micro_batch, seq_len]; y is x shifted left by one token."""
        # Draw the whole global batch and keep this rank's rows: ranks never share a start within
        # a step, and the global stream depends on world_size only via micro_batch * world_size.
        rng = np.random.default_rng([self.seed, step, micro_step])
        n_starts = len(self.tokens) - self.seq_len
        global_batch = self.micro_batch * self.world_size
        starts = rng.choice(n_starts, size=global_batch, replace=global_batch > n_starts)
        mine = starts[self.rank * self.micro_batch : (self.rank + 1) * self.micro_batch]
        return _gather(self.tokens, mine, self.seq_len)


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ordered, non-overlapping windows over a split: window i predicts tokens i*seq_len+1 ..
    (i+1)*seq_len, so every target token is scored at most once. max_tokens caps the targets.

    Rank r takes a contiguous block of equally many windows (up to world_size - 1 trailing
    windows are dropped) so all ranks run the same number of batches: under ZeRO-3 every
    forward pass is a collective.
    """
    _require_tokens(tokens, seq_len, "evaluation")
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    per_rank = n_windows // world_size
    if per_rank == 0:
        raise DataError(
            f"evaluation split has {len(tokens)} tokens: {n_windows} windows of seq_len {seq_len} "
            f"cannot give each of {world_size} ranks one; use a smaller seq_len or more validation text"
        )
    return _eval_iter(tokens, seq_len, batch_size, rank * per_rank, per_rank)


def _eval_iter(
    tokens: np.ndarray, seq_len: int, batch_size: int, first: int, count: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for lo in range(first, first + count, batch_size):
        windows = np.arange(lo, min(lo + batch_size, first + count))
        yield _gather(tokens, windows * seq_len, seq_len)
