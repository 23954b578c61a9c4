"""nanoGPT's own train.py beside `ternarylm train` (FP and all_ternary), in one sitting.

Same shape (4 layers x 128 wide, 4 heads, context 64, batch 12), budget (--iters steps, peak
lr 1e-3, linear warmup then cosine decay to a tenth), evaluation work (every 250 steps, 20
batches of 12 x 64 tokens on the validation split and 20 on the training split) and corpus (the
TinyStories sample in ../shared/data, as byte tokens split by ternarylm's own data pipeline: the
same train and validation tokens for both), on the CPU in fp32, one process each, interleaved
(nanoGPT, FP, ternary, then again for --repeats). The models differ as their code does: nanoGPT
is GPT-2 (GELU MLP 4x, LayerNorm, learned positions, tied head), ours is the paper's (SwiGLU,
RoPE, RMSNorm, untied head).

    python benchmarks/vs_nanogpt.py --nanogpt DIR [--iters 2000] [--repeats 1] [--json]

DIR is a checkout of karpathy/nanoGPT (nothing is fetched at run time). Per run: wall time of
the whole process, start-up (process start to the first training step), training-loop time
without evaluation, evaluation time, and the final validation bits per byte (nanoGPT's val loss
over 20 batches, ours over the same number of tokens). nanoGPT's phases are read from the time
its lines appear (iter and eval lines); ours from the trial's own metrics
(`time/worker_init_s`, `time/train_loop_s`, `time/eval_s`, `val/bpb`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE = SAMPLE / "tinystories" / "tinystories_sample.txt"
WIDTH, LAYERS, HEADS, CONTEXT, BATCH = 128, 4, 4, 64, 12  # ternarylm's `micro` size
LR, WARMUP, EVAL_EVERY, EVAL_BATCHES = 1e-3, 100, 250, 20
EVAL_TOKENS = EVAL_BATCHES * BATCH * CONTEXT


def fail(message: str) -> None:
    print(f"vs_nanogpt: error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare(corpus: Path, work: Path) -> float:
    """ternarylm's byte-token cache of the corpus, written as nanoGPT's dataset folder (uint16
    train.bin, val.bin and meta.pkl); returns the validation bytes per token."""
    from ternarylm.data import prepare_data
    from ternarylm.data.cache import DataConfig

    data = prepare_data(DataConfig(source=str(corpus), tokenizer="char",
                                   cache_dir=str(work / "cache")))
    folder = work / "nanogpt" / "data" / "tinystories_bytes"
    folder.mkdir(parents=True)
    vocab = 0
    for split, name in (("train", "train.bin"), ("validation", "val.bin")):
        tokens = np.asarray(data.tokens(split), dtype=np.int64)
        vocab = max(vocab, int(tokens.max()) + 1)
        tokens.astype(np.uint16).tofile(folder / name)
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab}))
    return data.bytes_per_token("validation")


def nanogpt_run(work: Path, iters: int, bytes_per_token: float) -> dict:
    """nanoGPT's train.py as its README runs it on a CPU, its lines timed as they appear."""
    args = ["--dataset=tinystories_bytes", "--device=cpu", "--compile=False", "--dtype=float32",
            f"--n_layer={LAYERS}", f"--n_head={HEADS}", f"--n_embd={WIDTH}",
            f"--block_size={CONTEXT}", f"--batch_size={BATCH}", "--gradient_accumulation_steps=1",
            f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--learning_rate={LR}",
            f"--min_lr={LR / 10}", f"--warmup_iters={WARMUP}", f"--eval_interval={EVAL_EVERY}",
            f"--eval_iters={EVAL_BATCHES}", "--log_interval=1", "--dropout=0.0",
            "--always_save_checkpoint=False", f"--out_dir={work / 'nanogpt-out'}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=work / "nanogpt",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stamps, evals, last_val = [], [], None  # iter lines' times; (start, end) of evaluations
    for line in proc.stdout:
        now = time.monotonic() - started
        if re.match(r"iter \d+: loss", line):
            stamps.append(now)
        elif m := re.match(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", line):
            evals.append((stamps[-1] if stamps else None, now))  # it ran since the last iter
            last_val = float(m.group(1))
    proc.wait()
    wall = time.monotonic() - started
    if proc.returncode != 0 or len(evals) < 2 or last_val is None:
        fail(f"nanoGPT's train.py failed (exit {proc.returncode}); run it by hand in "
             f"{work / 'nanogpt'} with: python train.py {' '.join(args)}")
    timed = [end - start for start, end in evals[1:]]
    # The step-0 evaluation runs before the first iteration, right after start-up: it is taken
    # to last as long as the others.
    first = statistics.median(timed)
    eval_s = first + sum(timed)
    startup = evals[0][1] - first
    loop = stamps[-1] - evals[0][1] - sum(timed)
    return {"engine": "nanoGPT", "wall_s": wall, "startup_s": startup, "loop_s": loop,
            "eval_s": eval_s, "val_bpb": last_val / math.log(2) / bytes_per_token}


def ours(plan: str, work: Path, iters: int, corpus: Path) -> dict:
    """`ternarylm train` with the same shape, budget and evaluation work."""
    config = {"size": "micro", "plan": plan, "scheme": "absmean", "seq_len": CONTEXT,
              "num_workers": 1, "cpus_per_worker": 2, "experiment": "vs-nanogpt",
              "data": {"source": str(corpus), "tokenizer": "char",
                       "cache_dir": str(work / "cache")},
              "train": {"steps": iters, "micro_batch": BATCH, "lr": LR, "schedule": "cosine",
                        "min_lr_ratio": 0.1, "warmup_steps": WARMUP, "eval_every": EVAL_EVERY,
                        "eval_max_tokens": EVAL_TOKENS, "train_sample_tokens": EVAL_TOKENS,
                        "checkpoint_every": iters, "log_every": 50},
              "storage_path": str(work / f"runs-{plan}")}
    path = work / f"{plan}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "TERNARYLM_HOME": str(work / f"home-{plan}"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / f'mlflow-{plan}.db'}"}
    started = time.monotonic()
    out = subprocess.run(["ternarylm", "train", "--config", str(path)], env=env,
                         capture_output=True, text=True)
    wall = time.monotonic() - started
    if out.returncode != 0:
        fail(f"ternarylm train ({plan}) failed: {out.stderr.strip().splitlines()[-1:]}")
    from ternarylm.core import metrics as M

    m = json.loads(out.stdout.strip().splitlines()[-1])["metrics"]
    eval_s = m.get(M.EVAL_S, 0.0)
    # Start-up: everything before the first step (the driver's set-up, Ray and Ray Train's
    # launch, the worker's own start).
    startup = wall - m[M.TRAIN_LOOP_S] - m.get(M.WORKER_EXPORT_S, 0.0) - m.get(M.FINISH_S, 0.0)
    return {"engine": f"ternarylm {plan}", "wall_s": wall, "startup_s": startup,
            "loop_s": m[M.TRAIN_LOOP_S] - eval_s, "eval_s": eval_s, "val_bpb": m[M.VAL_BPB]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", default=str(SAMPLE), help="a .txt corpus")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    checkout = Path(args.nanogpt)
    if not (checkout / "train.py").is_file() or not (checkout / "model.py").is_file():
        fail(f"--nanogpt {checkout} holds no nanoGPT train.py and model.py; pass a checkout "
             f"of karpathy/nanoGPT")
    if not Path(args.data).is_file():
        fail(f"--data {args.data} not found; pass a .txt corpus")
    if args.iters <= EVAL_EVERY or args.repeats < 1:
        fail(f"--iters must exceed {EVAL_EVERY} and --repeats be at least 1")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "nanogpt").mkdir()
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(checkout / name, work / "nanogpt" / name)
        bytes_per_token = prepare(Path(args.data), work)
        for r in range(args.repeats):
            for run in (lambda: nanogpt_run(work, args.iters, bytes_per_token),
                        lambda: ours("fp", work, args.iters, Path(args.data)),
                        lambda: ours("all_ternary", work, args.iters, Path(args.data))):
                row = run() | {"repeat": r}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for engine in dict.fromkeys(r["engine"] for r in rows):
        runs = [r for r in rows if r["engine"] == engine]
        summary[engine] = {k: statistics.median(r[k] for r in runs)
                           for k in ("wall_s", "startup_s", "loop_s", "eval_s", "val_bpb")}
    base = summary["nanoGPT"]
    print(f"{'engine':<22} {'wall s':>8} {'start s':>8} {'loop s':>8} {'eval s':>8} "
          f"{'val bpb':>8} {'wall/nanoGPT':>13}")
    for engine, s in summary.items():
        print(f"{engine:<22} {s['wall_s']:8.1f} {s['startup_s']:8.1f} {s['loop_s']:8.1f} "
              f"{s['eval_s']:8.1f} {s['val_bpb']:8.3f} {s['wall_s'] / base['wall_s']:13.2f}")
    fp, tern = summary["ternarylm fp"], summary["ternarylm all_ternary"]
    print(f"ternary/FP training loop: {tern['loop_s'] / fp['loop_s']:.2f}")
    if args.json:
        print(json.dumps({"runs": rows, "median": summary,
                          "fp_vs_nanogpt_wall": fp["wall_s"] / base["wall_s"],
                          "ternary_vs_fp_loop": tern["loop_s"] / fp["loop_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
