"""The CUDA path in one short run, for a machine with one GPU (H100/H200; ~6 minutes).

Trains paper-132m twice through the path users run (`ternarylm train`: Ray Train, a DeepSpeed
engine, bf16, ZeRO-1, NCCL), FP and all_ternary absmean, same data and batch, then packs the
ternary model and decodes with it on the CPU. Prints each figure as one JSON line, the last
line holding them all:

    python benchmarks/gpu_check.py [--steps 300] [--data FILE] [--wheels DIR] [--out DIR] [--json]
    python benchmarks/gpu_check.py --cpu-rehearsal --out DIR   # same script, pico, CPU, gloo

step time, tokens/s and MFU are the trial's own `perf/*` metrics (the last log window, no
evaluation inside), peak memory its `memory/peak_cuda_bytes`; ternary/FP is the ratio of the two
trials' step times. Installs what is missing itself: with --wheels, the set
`benchmarks/gpu_wheels.py` builds (the GPU machine has no registry), else `pip install -e .`.
Without a GPU it says so and exits 2, unless --cpu-rehearsal, which runs every step on the CPU
at the pico size (fp32, gloo) so that all but the GPU is known to work. With --out DIR (default
$OUT when set) each case's figures are appended to DIR/gpu_check.jsonl as soon as they exist: a
run cut short still returns what it measured. Runs `python -m ternarylm.cli`, not the console
script: on the GPU machine the package is on PYTHONPATH, not installed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE = SAMPLE / "tinystories" / "tinystories_sample.txt"


def ensure_installed(wheels: str | None) -> None:
    """ternarylm and what it needs importable here and in every process this starts (Ray's
    workers included, through PYTHONPATH): with --wheels, the set `gpu_wheels.py` built,
    unpacked with no index beside this checkout's package (the GPU machine has no registry and
    installs nothing system-wide); without, `pip install -e` where ternarylm is missing."""
    if wheels:
        site = Path(tempfile.gettempdir()) / "ternarylm-gpu-site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                        *map(str, sorted(Path(wheels).glob("*.whl")))], check=True)
        paths = [str(REPO / "platform"), str(site)]
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
        sys.path[:0] = paths
        return
    try:
        import ternarylm  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO)],
                       check=True)


CLI = [sys.executable, "-m", "ternarylm.cli"]


def trial_yaml(directory: Path, plan: str, data: str, steps: int, tokenizer: str,
               gpu: bool = True) -> Path:
    import yaml

    # The rehearsal keeps the GPU case's shape (same keys, one worker) at a size CPUs train.
    size, micro, cpus = ("paper-132m", 64, 4) if gpu else ("pico", 4, 1)
    config = {"size": size, "scheme": "absmean", "plan": plan, "seq_len": 256,
              "num_workers": 1, "cpus_per_worker": cpus, "use_gpu": gpu, "max_failures": 0,
              "experiment": "gpu-check", "name": f"gpu-check-{plan}",
              "data": {"source": data, "tokenizer": tokenizer},
              "train": {"steps": steps, "micro_batch": micro, "lr": 1.5e-3,
                        "precision": "bf16" if gpu else "fp32",
                        "zero_stage": 1, "warmup_steps": min(50, steps // 4),
                        "eval_every": steps, "checkpoint_every": steps,
                        "log_every": min(50, steps),
                        "eval_max_tokens": 65536, "train_sample_tokens": 16384},
              "storage_path": str(directory / "runs")}
    path = directory / f"{plan}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, env: dict) -> dict:
    out = subprocess.run([*CLI, "train", "--config", str(config)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"gpu_check: trial {config.stem} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def figures(result: dict, global_batch_tokens: int) -> dict:
    from ternarylm.core import metrics as M

    m = result["metrics"]
    return {"step_s": global_batch_tokens / m[M.TOKENS_PER_S],
            "tokens_per_s": m[M.TOKENS_PER_S], "mfu": m.get(M.MFU),
            "peak_cuda_bytes": m.get(M.PEAK_CUDA), "val_bpb": m[M.VAL_BPB],
            "worker_init_s": m.get(M.WORKER_INIT_S)}


def record(out_dir: Path | None, line: dict) -> None:
    """Print one figure line, and append it to out_dir/gpu_check.jsonl at once."""
    text = json.dumps(line)
    print(text, flush=True)
    if out_dir is not None:
        with open(out_dir / "gpu_check.jsonl", "a") as f:
            f.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data", default=str(SAMPLE), help="a .txt/.jsonl/.parquet corpus")
    parser.add_argument("--tokenizer", default="bpe:30522",
                        help="bpe:30522 has the paper's vocabulary size and needs no hub")
    parser.add_argument("--wheels", help="the wheel set benchmarks/gpu_wheels.py builds, for a "
                        "machine with no registry")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for gpu_check.jsonl, one line per case (default $OUT)")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="no CUDA: the same cases at the pico size on the CPU")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None and not out_dir.is_dir():
        print(f"gpu_check: error: --out {out_dir} is not a folder; create it or pass another",
              file=sys.stderr)
        return 2
    ensure_installed(args.wheels)
    import torch

    gpu = not args.cpu_rehearsal
    if gpu and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    if not Path(args.data).is_file():
        print(f"gpu_check: error: {args.data} not found; pass --data FILE", file=sys.stderr)
        return 2
    started = time.time()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        env = {**os.environ, "TERNARYLM_HOME": str(d / "home"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}
        out = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (rehearsal)"}
        record(out_dir, {"device": out["device"], "torch": torch.__version__})
        tokens = (64 if gpu else 4) * 256
        runs = {}
        for plan in ("fp", "all_ternary"):
            config = trial_yaml(d, plan, args.data, args.steps, args.tokenizer, gpu)
            runs[plan] = train(config, env)
            out[plan] = figures(runs[plan], tokens)
            record(out_dir, {plan: out[plan]})
        # The cohorts issue's case (several trials in one engine) goes here once it lands.
        out["ternary_fp_step_ratio"] = out["all_ternary"]["step_s"] / out["fp"]["step_s"]
        record(out_dir, {"ternary_fp_step_ratio": out["ternary_fp_step_ratio"]})
        packed = d / "packed.safetensors"
        subprocess.run([*CLI, "pack", runs["all_ternary"]["run_id"], "--out",
                        str(packed)], env=env, check=True, capture_output=True)
        from ternarylm.deploy.footprint import decode_times

        times = decode_times([packed], args.decode_tokens, threads=1)[0]
        out["packed_decode_ms_per_token_1_thread"] = sorted(times)[len(times) // 2]
        out["packed_bytes"] = packed.stat().st_size
        record(out_dir, {k: out[k] for k in ("packed_bytes",
                                             "packed_decode_ms_per_token_1_thread")})
    out["wall_s"] = time.time() - started
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
