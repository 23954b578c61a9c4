"""Deployment footprint of packed models against FP32: file bytes, resident memory, decode speed.

`describe` sizes a model under a plan without training it (parameters, FLOPs, fp32 and packed
bytes), from the code that writes the packed file.

Each measurement runs in a fresh subprocess (`python -m ternarylm.deploy.footprint`), so that neither
model's memory or caches help the other:
  resident memory  RSS after `load_packed` minus RSS before it, one process per model;
  peak memory      the peak RSS of a process that loads one model and decodes with it: the
                   whole process, runtime included, as a user of either model would see it;
  decode speed     ms per token at batch 1 with a KV cache, every model in one process,
                   taking turns token by token so that machine load hits all of them alike.
The FP32 model is a packed file too (`embedding_dtype="fp32"`, no plan): it runs in the same
inference code (fused projections, KV cache) with fp32 weights.

Used by `benchmarks/inference.py` and by the paper-claims report (`studies/claims.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ternarylm.deploy.inference import load_packed
from ternarylm.model.transformer import ModelConfig, TernaryLM
from ternarylm.deploy.packing import pack_model, packed_contents, packed_size, read_packed
from ternarylm.model.plans import PrecisionPlan, apply_plan
from ternarylm.model.quantizers import TERNARY_SCHEMES

PROMPT_TOKENS = 16
WARMUP_TOKENS = 4
INT8_PATH = ":int8"  # suffix of a path given to the decode child: run it without our kernels


def describe(cfg: ModelConfig, plan: PrecisionPlan, scheme: str) -> dict[str, Any]:
    """Parameter counts, FLOPs and memory of a model under a plan, built on the meta device.

    `packed_bytes` is the size of the file `ternarylm pack` writes with its default options
    (int8 embedding and head where training kept them in floating point), sized by the code
    that writes it; the real file adds its tokenizer's JSON and the trial's provenance.
    """
    with torch.device("meta"):
        model = TernaryLM(cfg)
        formats = apply_plan(model, plan, scheme, cfg.n_layers)
    counts = cfg.param_counts()
    ternary = sum(model.get_submodule(n).weight.numel() for n, f in formats.items()
                  if f in TERNARY_SCHEMES)
    packed = packed_size(*packed_contents(model, "", 0))
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    return {
        **counts,
        "ternary_weights": ternary,
        "flops_per_token": cfg.flops_per_token(),
        "fp32_bytes": fp32,
        "packed_bytes": packed,
        "packed_assumes": "ternarylm pack defaults (int8 embedding and head where the plan "
                          "keeps them in fp, 2-bit ternary codes); without the tokenizer JSON "
                          "and provenance a real file also holds",
        "compression": fp32 / packed,
        "formats": dict(sorted({f: sum(1 for v in formats.values() if v == f)
                                for f in set(formats.values())}.items())),
    }


def write_models(size: str, plan: str, trits: bool, directory: Path,
                 scheme: str = "absmean", seed: int = 0) -> tuple[Path, Path]:
    """The FP32 file and the packed file of one randomly initialised model of `size` (the
    paper's 30,522-token vocabulary): weights and speed do not depend on training."""
    from ternarylm.data import build_tokenizer, eos_id
    from ternarylm.model.transformer import model_config
    from ternarylm.model.plans import preset

    tokenizer = build_tokenizer("char", [])  # only stored: decoding here times token ids
    torch.manual_seed(seed)
    model = TernaryLM(model_config(size))
    fp32 = pack_model(model, directory / f"{size}-fp32.safetensors", tokenizer,
                      eos_id(tokenizer), embedding_dtype="fp32").path
    apply_plan(model, preset(plan), scheme, model.cfg.n_layers)
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


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "ternarylm.deploy.footprint", *args],
                         capture_output=True, text=True)
    if out.returncode:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
        raise RuntimeError(f"footprint measurement {' '.join(args)} failed: {last}")
    return json.loads(out.stdout.splitlines()[-1])


def resident_bytes(path: str | Path, use_kernels: bool = True) -> int:
    """Resident bytes that loading one packed file adds to a fresh process."""
    return _child(["--rss", str(path), *([] if use_kernels else ["--int8-path"])])["rss_bytes"]


def peak_decode_bytes(path: str | Path, n_tokens: int, threads: int) -> int:
    """Peak resident bytes of a fresh process that loads one packed file and decodes n_tokens
    at batch 1 with it (its whole lifetime: interpreter, torch and model)."""
    return _child(["--peak", str(path), "--tokens", str(n_tokens),
                   "--threads", str(threads)])["peak_rss_bytes"]


def decode_times(paths: list[str | Path], n_tokens: int, threads: int,
                 int8_path: list[bool] | None = None) -> list[list[float]]:
    """Per-token decode times (ms, batch 1, KV cache) of each model, taking turns every token
    in one fresh process; int8_path[i] runs model i on torch's int8 matmul, not our kernels."""
    int8_path = int8_path or [False] * len(paths)
    specs = [f"{p}{INT8_PATH if slow else ''}" for p, slow in zip(paths, int8_path)]
    return _child(["--decode", *specs, "--tokens", str(n_tokens),
                   "--threads", str(threads)])["ms"]


def _measure_rss(path: str, use_kernels: bool) -> dict:
    import psutil

    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    packed = load_packed(path, use_kernels)  # noqa: F841 (kept alive while measuring)
    gc.collect()
    return {"rss_bytes": process.memory_info().rss - before}


@torch.inference_mode()
def _measure_decode(specs: list[str], n_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    models = [load_packed(s.removesuffix(INT8_PATH), use_kernels=not s.endswith(INT8_PATH)).model
              for s in specs]
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
    return {"ms": times}


def main(argv: list[str] | None = None) -> None:
    """The child processes' entry point; prints one JSON line."""
    parser = argparse.ArgumentParser(description="(internal) one footprint measurement")
    parser.add_argument("--rss", help="resident bytes added by loading this packed file")
    parser.add_argument("--int8-path", action="store_true")
    parser.add_argument("--peak", help="peak RSS of decoding with this packed file")
    parser.add_argument("--decode", nargs="+", help=f"packed files (suffix {INT8_PATH}: int8 path)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rss:
        result = _measure_rss(args.rss, use_kernels=not args.int8_path)
    elif args.peak:
        import resource

        _measure_decode([args.peak], args.tokens, args.threads)
        # ru_maxrss is in KiB on Linux.
        result = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    else:
        result = _measure_decode(args.decode, args.tokens, args.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
