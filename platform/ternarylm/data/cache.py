"""Token cache: DataConfig -> one flat array of token ids per split, built once and shared.

prepare_data reads the source's (train, validation) documents, spools them to disk, trains or
loads the tokenizer on the training split only, and writes each split, documents separated by
the eos id, into a cache directory keyed by everything that affects the tokens. A build happens
beside its final path and is renamed into place whole, so concurrent builders never see half.
"""

from __future__ import annotations

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
from tokenizers import Tokenizer

from ternarylm.data.sources import DataError, is_local, local_file, split_documents
from ternarylm.data.tokenizer import (
    TOKENIZER_FILE,
    build_tokenizer,
    encode_documents,
    eos_id,
    parse_tokenizer,
    pretrained_tokenizer,
    token_dtype,
    tokenizer_file,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
META_FILE = "meta.json"
# Bump whenever reading, splitting or encoding changes, so stale caches are never reused.
FORMAT_VERSION = 1
_SPOOL_BATCH = 1024


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
    max_train_docs: int | None = None
    """Cap on training documents read, the first ones (the TernaryLM paper trains on the first
    60,000 TinyStories stories); None = all."""
    cache_dir: str = field(default_factory=_default_cache_dir)
    """Root of the token cache: $TERNARYLM_CACHE, else ~/.cache/ternarylm/tokens."""

    def __post_init__(self) -> None:
        parse_tokenizer(self.tokenizer)
        if not self.source.strip():
            raise DataError("source is empty: pass a hub dataset id or a .txt/.jsonl/.parquet file")
        if not self.text_column:
            raise DataError("text_column is empty: name the column that holds the text")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(
                f"val_fraction must be in (0, 1), got {self.val_fraction}: it is the share of a "
                "local file held out for validation (e.g. 0.1)"
            )
        for name in ("max_train_bytes", "max_train_docs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise DataError(f"{name} must be positive or None, got {value}")


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

    @property
    def digest(self) -> str:
        """The cache's identity, the end of its directory name: SHA-256 (first 16 hex digits)
        of everything that changes its tokens (`_cache_settings`: source path, size and mtime
        or hub id, tokenizer, split and cap settings, format version)."""
        return self.path.name.rsplit("-", 1)[1]

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
    kind, arg = parse_tokenizer(config.tokenizer)
    if kind == "char":
        return 257
    if kind == "bpe":
        return int(arg)
    if is_local(arg):
        tok = pretrained_tokenizer(arg)
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
    train_docs, val_docs = split_documents(
        config.source, config.val_source, config.text_column, config.val_fraction
    )
    if config.max_train_docs is not None:
        train_docs = itertools.islice(train_docs, config.max_train_docs)
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
        # Only when set, so that the caches made before this setting keep their names.
        **({"max_train_docs": config.max_train_docs} if config.max_train_docs else {}),
    }


def _source_identity(source: str) -> dict:
    if not is_local(source):
        return {"hub": source}
    path = local_file(source)
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _tokenizer_identity(spec: str) -> str:
    kind, arg = parse_tokenizer(spec)
    if kind == "hf" and is_local(arg):
        # A local tokenizer.json can be edited in place, so key on its content.
        return f"hf:sha256={hashlib.sha256(tokenizer_file(arg).read_bytes()).hexdigest()}"
    return spec


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[:40]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


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
