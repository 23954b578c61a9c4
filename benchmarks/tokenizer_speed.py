"""Tokenizer throughput on The Adventures of Sherlock Holmes.

Trains the tokenizer (default bpe:8192) on the book, then times encoding all of it with the
same code path prepare_data uses (the book is one document, so encoding runs on one thread).

    python benchmarks/tokenizer_speed.py [--json] [--tokenizer bpe:8192] [--repeats 5]

The text is found through $TERNARYLM_SHARED_DATA (default <repo>/../shared/data). With --json
the last line is a JSON object with tokens_per_s and tokenizer_train_s.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from ternarylm.data import build_tokenizer, encode_documents, eos_id, read_local

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="bpe:8192", help="tokenizer spec, as in DataConfig")
    parser.add_argument("--repeats", type=int, default=5, help="timed encoding passes (median is reported)")
    parser.add_argument("--json", action="store_true", help="end with a JSON line of the results")
    args = parser.parse_args()

    path = SHARED_DATA / "gutenberg" / "adventures_of_sherlock_holmes.txt"
    docs = read_local(path)
    n_bytes = sum(len(doc.encode()) for doc in docs)

    start = time.perf_counter()
    tok = build_tokenizer(args.tokenizer, docs)
    train_s = time.perf_counter() - start
    eos = eos_id(tok)

    encode_documents(tok, docs, eos)  # warm-up: first-call allocations and caches
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ids = encode_documents(tok, docs, eos)
        times.append(time.perf_counter() - start)
    encode_s = statistics.median(times)

    result = {
        "tokenizer": args.tokenizer,
        "vocab_size": tok.get_vocab_size(),
        "text_bytes": n_bytes,
        "tokens": int(ids.size),
        "tokenizer_train_s": round(train_s, 3),
        "encode_s": round(encode_s, 4),
        "tokens_per_s": round(ids.size / encode_s),
        "bytes_per_s": round(n_bytes / encode_s),
    }
    print(f"text        {path.name}: {n_bytes:,} bytes in {len(docs)} document(s)")
    print(f"tokenizer   {args.tokenizer} (vocab {result['vocab_size']}), trained in {train_s:.2f} s")
    print(f"encode      {ids.size:,} tokens in {encode_s:.3f} s (median of {args.repeats})")
    print(f"throughput  {result['tokens_per_s']:,} tokens/s, {n_bytes / encode_s / 1e6:.2f} MB/s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
