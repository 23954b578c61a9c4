"""CPU inference of packed ternary models against FP32: file size, resident memory, decode speed.

For each size (random weights; the paper's 30,522-token vocabulary), writes the FP32 model and
the packed model (all_ternary absmean, int8 embedding and head: `ternarylm pack`'s defaults),
then measures, each in a fresh subprocess so that neither model's memory or caches help the
other:
  resident memory  RSS after `load_packed` minus RSS before it, one process per model;
  decode speed     ms per token at batch 1 with a KV cache, both models in one process,
                   alternating token by token so that machine load hits both alike.
The FP32 model runs in the same inference code (fused projections, KV cache) with fp32 weights.

    python benchmarks/inference.py [--json] [--sizes paper-132m small] [--tokens 48]

With --json the last line is {"sizes": [{"size", "fp32_bytes", "packed_bytes", "size_ratio",
"fp32_ms_per_token", "packed_ms_per_token", "speedup", ...}, ...]}.
"""

import os
import sys

# benchmarks/tokenize.py shadows the stdlib module `tokenize` (imported by torch); drop this
# script's directory from the path so that imports find the real one.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

from ternarylm import cpu_kernels  # noqa: E402
from ternarylm.data import build_tokenizer, eos_id  # noqa: E402
from ternarylm.model import TernaryLM, model_config  # noqa: E402
from ternarylm.packing import load_packed, pack_model, read_packed  # noqa: E402
from ternarylm.plans import apply_plan, preset  # noqa: E402
from ternarylm.quantizers import TERNARY_SCHEMES  # noqa: E402

PROMPT_TOKENS = 16
WARMUP_TOKENS = 4


def write_models(size: str, plan: str, trits: bool, directory: Path) -> tuple[Path, Path]:
    """The FP32 file and the packed file of one randomly initialised model."""
    tokenizer = build_tokenizer("char", [])  # only stored: the benchmark decodes token ids
    torch.manual_seed(0)
    model = TernaryLM(model_config(size))
    fp32 = pack_model(model, directory / f"{size}-fp32.safetensors", tokenizer,
                      eos_id(tokenizer), embedding_dtype="fp32").path
    apply_plan(model, preset(plan), "absmean", model.cfg.n_layers)
    packed = pack_model(model, directory / f"{size}-packed.safetensors", tokenizer,
                        eos_id(tokenizer), trits=trits).path
    return fp32, packed


def ternary_ratio(path: Path) -> float:
    """FP32 bytes of the ternary layers over their packed bytes (codes and scales)."""
    config, tensors = read_packed(path)
    ternary = [n for n, e in config["layers"].items() if e["format"] in TERNARY_SCHEMES]
    numel = sum(torch.Size(config["layers"][n]["shape"]).numel() for n in ternary)
    stored = sum(tensors[f"{n}.{part}"].nbytes for n in ternary for part in ("codes", "scale"))
    return 4 * numel / stored


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


def measure_rss(path: str, use_kernels: bool) -> None:
    """(child) Resident bytes that loading one packed file adds to the process."""
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    packed = load_packed(path, use_kernels)  # noqa: F841 (kept alive while measuring)
    gc.collect()
    print(json.dumps({"rss_bytes": process.memory_info().rss - before}))


@torch.inference_mode()
def measure_decode(fp32: str, packed: str, n_tokens: int, threads: int) -> None:
    """(child) Median ms per decoded token of FP32, packed and packed on torch's int8 matmul,
    taking turns every token."""
    torch.set_num_threads(threads)
    models = [load_packed(fp32).model, load_packed(packed).model,
              load_packed(packed, use_kernels=False).model]
    ids = torch.randint(0, models[0].cfg.vocab_size, (PROMPT_TOKENS + WARMUP_TOKENS + n_tokens,),
                        generator=torch.Generator().manual_seed(0))
    caches = [m.new_cache() for m in models]
    for m, cache in zip(models, caches):
        m(ids[None, :PROMPT_TOKENS], cache)
    times: list[list[float]] = [[] for _ in models]
    for t in range(PROMPT_TOKENS, len(ids)):
        for m, cache, record in zip(models, caches, times):
            start = time.perf_counter()
            m(ids[None, t:t + 1], cache)[0, -1].argmax()
            if t >= PROMPT_TOKENS + WARMUP_TOKENS:
                record.append(1e3 * (time.perf_counter() - start))
    print(json.dumps({"ms_per_token": [statistics.median(r) for r in times]}))


def decode_speeds(fp32: Path, packed: Path, n_tokens: int, threads: int) -> dict:
    fp32_ms, packed_ms, int8_ms = child(["--decode", str(fp32), str(packed), "--tokens",
                                         str(n_tokens), "--threads", str(threads)])["ms_per_token"]
    return {"fp32_ms_per_token": round(fp32_ms, 2), "packed_ms_per_token": round(packed_ms, 2),
            "speedup": round(fp32_ms / packed_ms, 2),
            # The alternative: integer layers (ternary ones unpacked to int8) on torch._int_mm.
            "int8_path_ms_per_token": round(int8_ms, 2)}


def bench_size(size: str, plan: str, trits: bool, n_tokens: int, threads: list[int],
               directory: Path) -> dict:
    fp32, packed = write_models(size, plan, trits, directory)
    fp32_bytes, packed_bytes = fp32.stat().st_size, packed.stat().st_size
    fp32_rss = child(["--rss", str(fp32)])["rss_bytes"]
    packed_rss = child(["--rss", str(packed)])["rss_bytes"]
    int8_rss = child(["--rss", str(packed), "--int8-path"])["rss_bytes"]
    speeds = {t: decode_speeds(fp32, packed, n_tokens, t) for t in threads}
    return {"size": size, "plan": plan, "trits": trits,
            "fp32_bytes": fp32_bytes, "packed_bytes": packed_bytes,
            "size_ratio": round(fp32_bytes / packed_bytes, 2),
            "ternary_layers_ratio": round(ternary_ratio(packed), 2),
            "fp32_rss_bytes": fp32_rss, "packed_rss_bytes": packed_rss,
            "rss_ratio": round(fp32_rss / packed_rss, 2), "int8_path_rss_bytes": int8_rss,
            **speeds[threads[0]], "threads": threads[0], "by_threads": speeds,
            "cpu_kernels": cpu_kernels.supports(cpu_kernels.TERNARY)}


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
    parser.add_argument("--rss", help=argparse.SUPPRESS)
    parser.add_argument("--int8-path", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decode", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss:
        return measure_rss(args.rss, use_kernels=not args.int8_path)
    if args.decode:
        return measure_decode(*args.decode, args.tokens, args.threads[0])

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
