"""CPU inference of packed ternary models against FP32: file size, resident memory, decode speed.

For each size (random weights; the paper's 30,522-token vocabulary), writes the FP32 model and
the packed model (all_ternary absmean, int8 embedding and head: `ternarylm pack`'s defaults),
then measures, each in a fresh subprocess (`ternarylm.deploy.footprint`, shared with the paper-claims
report), resident memory per model and decode speed at batch 1 with a KV cache, the models
taking turns token by token. The packed model also runs on torch's int8 matmul (`int8 path`),
the alternative to our kernels.

    python benchmarks/inference.py [--json] [--sizes paper-132m small] [--tokens 48]

With --json the last line is {"sizes": [{"size", "fp32_bytes", "packed_bytes", "size_ratio",
"fp32_ms_per_token", "packed_ms_per_token", "speedup", ...}, ...]}.
"""

import os


import argparse
import json
import statistics
import tempfile
from pathlib import Path

from ternarylm.kernels import cpu
from ternarylm.deploy.footprint import (decode_times, resident_bytes, ternary_ratio,
                                 write_models)


def decode_speeds(fp32: Path, packed: Path, n_tokens: int, threads: int) -> dict:
    times = decode_times([fp32, packed, packed], n_tokens, threads, int8_path=[False, False, True])
    fp32_ms, packed_ms, int8_ms = (statistics.median(t) for t in times)
    return {"fp32_ms_per_token": round(fp32_ms, 2), "packed_ms_per_token": round(packed_ms, 2),
            "speedup": round(fp32_ms / packed_ms, 2),
            # The alternative: integer layers (ternary ones unpacked to int8) on torch._int_mm.
            "int8_path_ms_per_token": round(int8_ms, 2)}


def bench_size(size: str, plan: str, trits: bool, n_tokens: int, threads: list[int],
               directory: Path) -> dict:
    fp32, packed = write_models(size, plan, trits, directory)
    fp32_bytes, packed_bytes = fp32.stat().st_size, packed.stat().st_size
    fp32_rss, packed_rss = resident_bytes(fp32), resident_bytes(packed)
    int8_rss = resident_bytes(packed, use_kernels=False)
    speeds = {t: decode_speeds(fp32, packed, n_tokens, t) for t in threads}
    return {"size": size, "plan": plan, "trits": trits,
            "fp32_bytes": fp32_bytes, "packed_bytes": packed_bytes,
            "size_ratio": round(fp32_bytes / packed_bytes, 2),
            "ternary_layers_ratio": round(ternary_ratio(packed), 2),
            "fp32_rss_bytes": fp32_rss, "packed_rss_bytes": packed_rss,
            "rss_ratio": round(fp32_rss / packed_rss, 2), "int8_path_rss_bytes": int8_rss,
            **speeds[threads[0]], "threads": threads[0], "by_threads": speeds,
            "cpu_kernels": cpu.supports(cpu.TERNARY)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["paper-132m", "small"])
    parser.add_argument("--plan", default="all_ternary", help="precision plan preset")
    parser.add_argument("--trits", action="store_true", help="5 ternary codes per byte")
    parser.add_argument("--tokens", type=int, default=32, help="timed decode steps per model")
    # One thread first: on a shared machine a second thread mostly waits for a busy core at
    # every parallel region, which hides what the models cost; the second count uses both.
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()],
                        help="decode thread counts; the first one fills the top-level fields")
    parser.add_argument("--json", action="store_true", help="end with a JSON line of the results")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            row = bench_size(size, args.plan, args.trits, args.tokens, args.threads, Path(d))
            rows.append(row)
            print(f"{size}: file {row['fp32_bytes'] / 2**20:.1f} MiB fp32 -> "
                  f"{row['packed_bytes'] / 2**20:.1f} MiB packed ({row['size_ratio']}x; ternary "
                  f"layers {row['ternary_layers_ratio']}x); resident "
                  f"{row['fp32_rss_bytes'] / 2**20:.1f} -> {row['packed_rss_bytes'] / 2**20:.1f}"
                  f" MiB ({row['rss_ratio']}x; int8 path "
                  f"{row['int8_path_rss_bytes'] / 2**20:.1f} MiB)", flush=True)
            for threads, speed in row["by_threads"].items():
                print(f"  decode, {threads} thread(s): {speed['fp32_ms_per_token']:.2f} -> "
                      f"{speed['packed_ms_per_token']:.2f} ms/token ({speed['speedup']}x; int8 "
                      f"path {speed['int8_path_ms_per_token']:.2f})", flush=True)
    if args.json:
        print(json.dumps({"sizes": rows}))


if __name__ == "__main__":
    main()
