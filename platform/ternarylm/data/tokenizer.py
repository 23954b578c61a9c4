"""Tokenizers: byte-level BPE trained on the train split, one token per byte, or pretrained.

A spec is 'bpe:N', 'char' or 'hf:NAME|PATH'; every tokenizer has an end-of-document id (eos_id
adds <|endoftext|> when a pretrained one has none), which encode_documents appends after each
document.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ternarylm.data.sources import DataError, hub_offline, is_local

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# Special tokens that already mean "end of document" in common pretrained tokenizers.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


def parse_tokenizer(spec: str) -> tuple[str, str | int | None]:
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
    kind, arg = parse_tokenizer(spec)
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
    return pretrained_tokenizer(arg)


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


def pretrained_tokenizer(name: str) -> Tokenizer:
    if is_local(name):
        path = tokenizer_file(name)
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


def tokenizer_file(name: str) -> Path:
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
