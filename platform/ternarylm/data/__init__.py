"""Data pipeline: text source -> tokenizer -> cached token arrays -> per-rank (x, y) batches.

sources reads a Hugging Face hub dataset or a local .txt / .jsonl / .parquet file and holds out
validation (the hub's own split, a separate file, or a contiguous tail of a single file);
tokenizer trains or loads a tokenizer on the training split only; cache (prepare_data) writes
each split as one flat array of token ids, documents separated by the eos id, into a cache
directory keyed by everything that affects the tokens; batches (WindowSampler, eval_batches)
turn those arrays into random training windows and an ordered sweep of the validation split.
"""

from ternarylm.data.batches import WindowSampler, eval_batches
from ternarylm.data.cache import SPLITS, DataConfig, PreparedData, prepare_data, vocab_size
from ternarylm.data.sources import DataError, hub_offline, read_local
from ternarylm.data.tokenizer import EOS_TOKEN, build_tokenizer, encode_documents, eos_id, token_dtype

__all__ = [
    "EOS_TOKEN",
    "SPLITS",
    "DataConfig",
    "DataError",
    "PreparedData",
    "WindowSampler",
    "build_tokenizer",
    "encode_documents",
    "eos_id",
    "eval_batches",
    "hub_offline",
    "prepare_data",
    "read_local",
    "token_dtype",
    "vocab_size",
]
