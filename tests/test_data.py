"""Tests for ternarylm.data on the real sample texts in shared/data.

The data directory comes from $TERNARYLM_SHARED_DATA, default <repo>/../shared/data.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ternarylm import data
from ternarylm.data import cache
from ternarylm.data import (
    DataConfig,
    DataError,
    PreparedData,
    WindowSampler,
    build_tokenizer,
    eval_batches,
    prepare_data,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_sample.txt"
SHERLOCK = SHARED_DATA / "gutenberg" / "adventures_of_sherlock_holmes.txt"
_MISSING = "missing: set TERNARYLM_SHARED_DATA to the shared data directory"
needs_tinystories = pytest.mark.skipif(not TINYSTORIES.is_file(), reason=f"{TINYSTORIES} {_MISSING}")
needs_sherlock = pytest.mark.skipif(not SHERLOCK.is_file(), reason=f"{SHERLOCK} {_MISSING}")


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """TinyStories paragraphs, read independently of the code under test."""
    text = TINYSTORIES.read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def char_config(source: Path | str, tmp_path: Path, **kwargs) -> DataConfig:
    return DataConfig(source=str(source), tokenizer="char", cache_dir=str(tmp_path / "cache"), **kwargs)


def documents(prepared: PreparedData, split: str) -> list[str]:
    """Decode a char-tokenized split back into its documents (ids are bytes, eos is 256)."""
    ids = np.asarray(prepared.tokens(split))
    assert ids[-1] == prepared.eos_id, "every document, the last one included, ends with eos"
    ends = np.flatnonzero(ids == prepared.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e].astype(np.uint8).tobytes().decode() for s, e in zip(starts, ends)]


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------------------------------------
# Sources and splits


@needs_tinystories
def test_txt_tail_split_is_contiguous_and_deterministic(paragraphs, tmp_path):
    prepared = prepare_data(char_config(TINYSTORIES, tmp_path, val_fraction=0.1))
    train, val = documents(prepared, "train"), documents(prepared, "validation")

    # Paragraphs in file order: train is a prefix, validation the rest, nothing lost or moved.
    assert train + val == paragraphs
    assert 0 < len(val) < len(paragraphs) // 2
    sizes = [len(p.encode()) for p in paragraphs]
    val_bytes = sum(sizes[len(train) :])
    assert prepared.val_bytes == val_bytes and prepared.train_bytes == sum(sizes[: len(train)])
    # The shortest tail holding >= 10% of the bytes.
    assert val_bytes >= 0.1 * sum(sizes) > val_bytes - sizes[len(train)]
    assert prepared.val_tokens == len(prepared.tokens("validation")) == val_bytes + len(val)
    assert prepared.bytes_per_token("validation") == pytest.approx(val_bytes / (val_bytes + len(val)))

    again = prepare_data(char_config(TINYSTORIES, tmp_path / "other", val_fraction=0.1))
    assert again.path != prepared.path
    for split in data.SPLITS:
        np.testing.assert_array_equal(again.tokens(split), prepared.tokens(split))


@needs_sherlock
def test_gutenberg_book_is_one_document_without_licence(tmp_path):
    prepared = prepare_data(char_config(SHERLOCK, tmp_path))
    (train,), (val,) = documents(prepared, "train"), documents(prepared, "validation")
    assert train.startswith("The Adventures of Sherlock Holmes")
    assert "\ufeff" not in train and "PROJECT GUTENBERG" not in (train + val).upper()
    # Train then validation is the whole body in order, cut at a paragraph start.
    original = SHERLOCK.read_text(encoding="utf-8-sig")
    squash = " ".join  # compare modulo whitespace: paragraphs are rejoined with one blank line
    assert squash(train.split()) + " " + squash(val.split()) in squash(original.split())
    assert re.search(r"\n\s*\n" + re.escape(val.split("\n\n")[0]), original)
    assert 0.1 <= len(val.encode()) / (len(train.encode()) + len(val.encode())) < 0.12


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@needs_tinystories
def test_table_source_with_chosen_column(paragraphs, tmp_path, suffix):
    rows = [{"id": i, "story": p} for i, p in enumerate(paragraphs[:120])]
    path = write_table(tmp_path / f"stories{suffix}", rows)
    prepared = prepare_data(char_config(path, tmp_path, text_column="story", val_fraction=0.2))
    train, val = documents(prepared, "train"), documents(prepared, "validation")
    assert train + val == paragraphs[:120]
    assert len(val) >= 0.15 * 120


@needs_tinystories
def test_separate_validation_file(paragraphs, tmp_path):
    train_file = tmp_path / "train.txt"
    val_file = tmp_path / "val.txt"
    train_file.write_text("\n\n".join(paragraphs[:50]))
    val_file.write_text("\n\n".join(paragraphs[50:60]))
    prepared = prepare_data(char_config(train_file, tmp_path, val_source=str(val_file)))
    assert documents(prepared, "train") == paragraphs[:50]
    assert documents(prepared, "validation") == paragraphs[50:60]


@needs_tinystories
def test_max_train_bytes_caps_train_only(tmp_path):
    full = prepare_data(char_config(TINYSTORIES, tmp_path))
    capped = prepare_data(char_config(TINYSTORIES, tmp_path, max_train_bytes=10_000))
    assert capped.train_bytes == 10_000
    assert full.train_bytes > 10_000
    capped_docs, full_docs = documents(capped, "train"), documents(full, "train")
    # A prefix of the training documents, the last one cut short.
    assert capped_docs[:-1] == full_docs[: len(capped_docs) - 1]
    assert full_docs[len(capped_docs) - 1].startswith(capped_docs[-1])
    np.testing.assert_array_equal(capped.tokens("validation"), full.tokens("validation"))


# ---------------------------------------------------------------------------------------------
# Tokenizers


@needs_tinystories
def test_char_tokenizer_round_trip(paragraphs):
    tok = build_tokenizer("char", [])
    text = paragraphs[0] + "\n\nnaïve café, 東京, emoji 🙂\ttab"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == list(text.encode())  # one token per byte, id == byte value
    assert tok.decode(ids) == text
    assert tok.get_vocab_size() == 257 and data.eos_id(tok) == 256


@needs_tinystories
def test_bpe_is_trained_on_train_split_only(paragraphs, tmp_path):
    # A word repeated only in train gets merged into one token; one repeated only in the
    # validation tail must not, or the tokenizer has seen validation text.
    train = paragraphs[:100] + [" ".join(["Zorblax"] * 100)] * 20
    val = [" ".join(["Vexquor"] * 100)] * 20
    path = tmp_path / "mixed.txt"
    path.write_text("\n\n".join(train + val))
    val_share = sum(len(p.encode()) for p in val) / sum(len(p.encode()) for p in train + val)
    config = DataConfig(
        source=str(path), tokenizer="bpe:512", val_fraction=val_share - 1e-6, cache_dir=str(tmp_path)
    )
    prepared = prepare_data(config)
    tok = prepared.tokenizer()

    assert prepared.vocab_size == tok.get_vocab_size() == 512
    assert (prepared.path / "tokenizer.json").is_file()
    assert len(tok.encode(" Zorblax").ids) == 1
    assert len(tok.encode(" Vexquor").ids) > 2
    # Validation holds exactly the held-out paragraphs, and decodes back to them.
    decoded = tok.decode(np.asarray(prepared.tokens("validation")).tolist())
    assert decoded == "".join(val)


@needs_tinystories
def test_hf_tokenizer_from_local_file(paragraphs, tmp_path):
    tok = build_tokenizer("bpe:300", paragraphs[:100])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    config = DataConfig(
        source=str(TINYSTORIES), tokenizer=f"hf:{tmp_path / 'tok'}", cache_dir=str(tmp_path / "cache")
    )
    prepared = prepare_data(config)
    assert prepared.vocab_size == 300 and prepared.eos_id == tok.token_to_id("<|endoftext|>")
    head = np.asarray(prepared.tokens("train")[:200]).tolist()
    first = tok.encode(paragraphs[0]).ids
    assert head[: len(first) + 1] == first + [prepared.eos_id]


# ---------------------------------------------------------------------------------------------
# Cache


@needs_tinystories
def test_second_prepare_reuses_cache(tmp_path, monkeypatch):
    config = char_config(TINYSTORIES, tmp_path)
    first = prepare_data(config)
    stamp = (first.path / "meta.json").stat().st_mtime_ns

    def no_rebuild(*args):
        raise AssertionError("cache hit expected, but prepare_data rebuilt")

    monkeypatch.setattr(cache, "_build", no_rebuild)
    second = prepare_data(config)
    assert second == first
    assert (first.path / "meta.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.path.name]

    # Anything that changes the tokens changes the key.
    with pytest.raises(AssertionError, match="rebuilt"):
        prepare_data(char_config(TINYSTORIES, tmp_path, val_fraction=0.2))


@needs_tinystories
def test_cache_key_follows_local_file_changes(paragraphs, tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(paragraphs[:40]))
    before = prepare_data(char_config(path, tmp_path))
    path.write_text("\n\n".join(paragraphs[:41]))
    after = prepare_data(char_config(path, tmp_path))
    assert after.path != before.path
    assert after.train_bytes > before.train_bytes


def _build_concurrently(config: DataConfig, barrier, results) -> None:
    """Child process: build, wait until the other child has built too, then race to publish."""
    publish = cache._publish

    def racing_publish(build_dir, final):
        barrier.wait(timeout=120)
        won = publish(build_dir, final)
        results.put(("won", won))
        return won

    cache._publish = racing_publish
    prepared = prepare_data(config)
    results.put(("path", str(prepared.path), prepared.train_tokens))


def _build_at_once(configs: list[DataConfig]) -> list[tuple]:
    """Each config prepared by its own process, all building at the same time."""
    ctx = mp.get_context("spawn")  # a fresh interpreter each, like two Ray workers
    barrier, results = ctx.Barrier(len(configs)), ctx.Queue()
    procs = [ctx.Process(target=_build_concurrently, args=(c, barrier, results)) for c in configs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=180)
        assert proc.exitcode == 0
    return [results.get(timeout=5) for _ in range(2 * len(configs))]


@needs_tinystories
def test_concurrent_builds_yield_one_cache(tmp_path):
    """Two processes (two nodes on a shared filesystem) build one cache at once."""
    config = DataConfig(source=str(TINYSTORIES), tokenizer="bpe:300", cache_dir=str(tmp_path / "cache"))
    messages = _build_at_once([config, config])

    assert sorted(m[1] for m in messages if m[0] == "won") == [False, True]
    paths = {m[1] for m in messages if m[0] == "path"}
    assert len(paths) == 1
    cache = Path(paths.pop())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]  # no temp dirs left
    prepared = PreparedData.load(cache)
    assert {m[2] for m in messages if m[0] == "path"} == {prepared.train_tokens}
    assert len(prepared.tokens("train")) == prepared.train_tokens
    assert prepared.tokenizer().get_vocab_size() == 300


@needs_tinystories
def test_nodes_that_did_not_prepare_build_the_same_cache(tmp_path):
    """Two nodes that did not prepare the data (a trial's ranks on fresh autoscaled nodes) build
    it at once, each in its own local cache: the same cache name and byte-identical tokens,
    tokenizer and metadata, so every rank trains on one vocabulary and one token stream."""
    configs = [DataConfig(source=str(TINYSTORIES), tokenizer="bpe:300",
                          cache_dir=str(tmp_path / f"node{i}" / "cache")) for i in range(2)]
    messages = _build_at_once(configs)

    assert [m[1] for m in messages if m[0] == "won"] == [True, True]  # nothing shared
    first, second = sorted(Path(m[1]) for m in messages if m[0] == "path")
    assert first.name == second.name and first.parent != second.parent
    files = {p.name: p.read_bytes() for p in first.iterdir()}
    assert sorted(files) == ["meta.json", "tokenizer.json", "train.bin", "validation.bin"]
    assert files == {p.name: p.read_bytes() for p in second.iterdir()}
    prepared = PreparedData.load(first)
    assert len(prepared.tokens("train")) == prepared.train_tokens > 0
    for node in configs:  # no build folder left behind on either node
        assert [p.name for p in Path(node.cache_dir).iterdir()] == [first.name]


# ---------------------------------------------------------------------------------------------
# Sampling


def test_window_sampler_is_pure_and_rank_disjoint():
    tokens = np.arange(10_000, dtype=np.uint32)  # a window's first token is its start offset
    samplers = [WindowSampler(tokens, 32, micro_batch=4, rank=r, world_size=2, seed=7) for r in range(2)]
    x0, y0 = samplers[0].batch(step=5, micro_step=1)
    x1, _ = samplers[1].batch(step=5, micro_step=1)

    assert x0.shape == y0.shape == (4, 32) and x0.dtype == y0.dtype == torch.int64
    assert (y0 == x0 + 1).all()  # y is x shifted by one token
    assert set(x0[:, 0].tolist()).isdisjoint(x1[:, 0].tolist())

    # Resuming: a fresh sampler reproduces the batch; other steps, micro steps, seeds differ.
    again = WindowSampler(tokens, seq_len=32, micro_batch=4, rank=0, world_size=2, seed=7)
    assert (again.batch(5, 1)[0] == x0).all()
    assert not (samplers[0].batch(6, 1)[0] == x0).all()
    assert not (samplers[0].batch(5, 0)[0] == x0).all()
    other_seed = WindowSampler(tokens, seq_len=32, micro_batch=4, rank=0, world_size=2, seed=8)
    assert not (other_seed.batch(5, 1)[0] == x0).all()

    # Same global batch whatever the split over ranks.
    single = WindowSampler(tokens, seq_len=32, micro_batch=8, rank=0, world_size=1, seed=7)
    assert (single.batch(5, 1)[0] == np.concatenate([x0, x1])).all()


@needs_tinystories
def test_window_sampler_on_real_tokens(tmp_path):
    prepared = prepare_data(char_config(TINYSTORIES, tmp_path))
    tokens = prepared.tokens("train")
    x, y = WindowSampler(tokens, seq_len=64, micro_batch=3, rank=1, world_size=4, seed=0).batch(11)
    assert (x[:, 1:] == y[:, :-1]).all()
    assert int(x.max()) <= prepared.eos_id
    # Every row is a real window of the memory-mapped split.
    flat = np.asarray(tokens).tobytes()
    for row in np.asarray(x):
        assert row.astype(np.uint16).tobytes() in flat


def test_eval_batches_cover_split_without_overlap():
    tokens = np.arange(1_000, dtype=np.uint16)
    seq_len, world_size = 16, 3
    per_rank = []
    for rank in range(world_size):
        batches = list(eval_batches(tokens, seq_len, batch_size=5, rank=rank, world_size=world_size))
        assert all((y == x + 1).all() for x, y in batches)
        per_rank.append(torch.cat([y.flatten() for _, y in batches]).tolist())
        again = eval_batches(tokens, seq_len, batch_size=5, rank=rank, world_size=world_size)
        assert per_rank[-1] == torch.cat([y.flatten() for _, y in again]).tolist()  # fixed order

    assert len({len(t) for t in per_rank}) == 1  # same amount of work on every rank
    targets = [t for rank_targets in per_rank for t in rank_targets]
    assert targets == list(range(1, len(targets) + 1))  # contiguous, ordered, each once
    assert len(tokens) - 1 - len(targets) < world_size * seq_len

    capped = [y for _, y in eval_batches(tokens, seq_len, batch_size=5, max_tokens=100)]
    assert sum(y.numel() for y in capped) == 96


# ---------------------------------------------------------------------------------------------
# Bad input


@needs_tinystories
def test_short_split_error(paragraphs, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(paragraphs[:2]))
    prepared = prepare_data(char_config(path, tmp_path, val_fraction=0.3))
    n = prepared.val_tokens
    expected = rf"has {n} tokens but .*seq_len \+ 1 = {n + 5}.*smaller seq_len"
    with pytest.raises(DataError, match=expected) as err:
        eval_batches(prepared.tokens("validation"), seq_len=n + 4, batch_size=2)
    assert "validation.bin" in str(err.value)
    with pytest.raises(DataError, match=r"smaller seq_len or a bigger source file"):
        WindowSampler(prepared.tokens("train"), prepared.train_tokens, 1, rank=0, world_size=1, seed=0)


def test_hub_unreachable_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:  # at once: offline, nothing is retried
        prepare_data(DataConfig(cache_dir=str(tmp_path)))
    message = str(err.value)
    assert "roneneldan/TinyStories" in message
    assert all(option in message for option in (".txt", ".jsonl", ".parquet", "shared/data"))
    assert list(tmp_path.iterdir()) == []  # the failed build left nothing behind


@needs_tinystories
def test_hf_tokenizer_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"bert-base-uncased.*tokenizer\.json"):
        config = DataConfig(source=str(TINYSTORIES), tokenizer="hf:bert-base-uncased", cache_dir=str(tmp_path))
        prepare_data(config)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", r"empty"),
        ("blank.txt", b"\n \n\t\n", r"no text"),
        ("nul.txt", b"Once upon a time\x00\x01\x02", r"NUL bytes.*binary"),
        ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), r"not UTF-8"),
        ("nul.jsonl", b'{"text": "a"}\n\x00\x00\x00', r"NUL bytes"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": bro\n', r"cannot be read as \.jsonl"),
        ("broken.parquet", b"not a parquet file", r"cannot be read as \.parquet"),
        ("table.csv", b"text\nhello\n", r"unsupported file type '\.csv'"),
    ],
)
def test_bad_file_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        prepare_data(char_config(path, tmp_path))
    assert str(path) in str(err.value)


def test_missing_file_error(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: file not found"):
        prepare_data(char_config(path, tmp_path))


@needs_tinystories
def test_unknown_and_non_text_column_errors(paragraphs, tmp_path):
    rows = [{"story": p, "n": i} for i, p in enumerate(paragraphs[:10])]
    path = write_table(tmp_path / "rows.parquet", rows)
    with pytest.raises(DataError, match=r"no column 'text'; available columns: story, n"):
        prepare_data(char_config(path, tmp_path))
    with pytest.raises(DataError, match=r"column 'n' holds .*int64.*not text"):
        prepare_data(char_config(path, tmp_path, text_column="n"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokenizer": "bpe:abc"}, r"'bpe:abc' is not one of"),
        ({"tokenizer": "bpe:100"}, r"N >= 257"),
        ({"tokenizer": "word"}, r"'word' is not one of"),
        ({"tokenizer": "hf:"}, r"hf:NAME"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\)"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
        ({"max_train_bytes": 0}, r"max_train_bytes must be positive"),
    ],
)
def test_bad_config_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**kwargs)
