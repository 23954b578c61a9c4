"""Step time of simulated ternary training against full precision, on the worker's real step.

For each size, builds two DeepSpeed engines exactly as a Ray Train worker does
(`ternarylm.training.train.build_engine`: the trial's model under its plan, AdamW with the trial's
parameter groups and schedule, `deepspeed_config`, ZeRO stage 1, fp32 on CPU), one under the
`fp` plan and one under `all_ternary` (absmean by default), in a one-process gloo group. One
step is what `_Loop._train_step` runs: engine forward, cross-entropy, `engine.backward`,
`engine.step`. The two engines alternate step by step in one run (so both see the same machine
load), warmup steps first; medians and ternary / FP ratios are reported. Goal: ratio <= 1.10.

Shapes (batch x tokens per step, as a 2-CPU worker trains them; V = 256, a byte/char-level
vocabulary, where the floating-point head weighs least and fake quantization shows most):
    micro  12 x 64   (the shape of issue 16: width 128, 4 blocks)
    mini   12 x 128
    small   8 x 256

    python benchmarks/train_step.py                     # micro, mini, small on 2 threads
    python benchmarks/train_step.py --json              # last line: one JSON object
    python benchmarks/train_step.py --profile           # where each step spends its time

On a machine other jobs are using, OpenMP's spinning threads make multi-threaded wall times
swing; OMP_WAIT_POLICY=PASSIVE steadies them, and interleaving keeps the ratio fair.
"""

from __future__ import annotations

import os
import sys

# DeepSpeed picks its accelerator at import, as on a CPU worker.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse
import json
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ternarylm.config import TrialConfig
from ternarylm.model.quantizers import TERNARY_SCHEMES
from ternarylm.training.train import build_engine

# size -> (micro batch, sequence length) a 2-CPU worker trains it with.
SHAPES = {"micro": (12, 64), "mini": (12, 128), "small": (8, 256)}


def init_single_process_group() -> None:
    """A one-rank gloo group, what Ray Train gives a lone CPU worker."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


class Engine:
    """One trial's DeepSpeed engine and a fixed batch; `step()` runs and times one step."""

    def __init__(self, size: str, plan: str, args: argparse.Namespace) -> None:
        batch, seq_len = SHAPES[size]
        self.cfg = TrialConfig(size=size, scheme=args.scheme, plan=plan, seq_len=seq_len,
                               train={"micro_batch": batch, "steps": 10 ** 6},
                               cpus_per_worker=args.threads)
        self.engine, _ = build_engine(self.cfg, args.vocab, torch.device("cpu"), bf16=False)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, args.vocab, (batch, seq_len + 1), generator=g)
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        self.times: list[float] = []

    def step(self, record: bool = True) -> None:
        """One micro step of `ternarylm.training.train._Loop._train_step` (grad_accum = 1)."""
        start = time.perf_counter()
        logits = self.engine(self.x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), self.y.flatten(),
                               label_smoothing=self.cfg.train.label_smoothing)
        self.engine.backward(loss)
        self.engine.step()
        loss.item()  # the loop reads the loss every step
        if record:
            self.times.append(time.perf_counter() - start)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(size: str, args: argparse.Namespace) -> dict:
    fp, ternary = Engine(size, "fp", args), Engine(size, "all_ternary", args)
    pair = (fp, ternary)
    for _ in range(args.warmup):
        for e in pair:
            e.step(record=False)
    for i in range(args.steps):
        for e in (pair if i % 2 == 0 else pair[::-1]):  # alternate which goes first
            e.step()
    batch, seq_len = SHAPES[size]
    row = {"size": size, "batch": batch, "seq_len": seq_len,
           "fp_step_s": round(fp.median, 5), "ternary_step_s": round(ternary.median, 5),
           "ratio": round(ternary.median / fp.median, 4),
           # the fastest steps: the least disturbed by other jobs on a shared machine
           "fp_min_s": round(min(fp.times), 5), "ternary_min_s": round(min(ternary.times), 5)}
    if not args.json:
        print(f"{size:>6} {batch}x{seq_len}: fp {fp.median * 1e3:.2f} ms  ternary "
              f"{ternary.median * 1e3:.2f} ms  ratio {row['ratio']:.3f}  (min: fp "
              f"{min(fp.times) * 1e3:.2f}, ternary {min(ternary.times) * 1e3:.2f})", flush=True)
    if args.profile:
        profile(pair, size)
    return row


def profile(pair: tuple[Engine, Engine], size: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, engine in zip(("fp", "ternary"), pair):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                engine.step(record=False)
        print(f"\n=== {size} {name}: 10 steps, top ops by self CPU time ===", file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30),
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--scheme", default="absmean", choices=TERNARY_SCHEMES)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per engine")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per engine")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads (a worker's cpus_per_worker; default 2)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile 10 steps of each engine (tables on stderr)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    init_single_process_group()

    if not args.json:
        print(f"DeepSpeed engine step on CPU, {args.threads} threads, torch {torch.__version__}; "
              f"V={args.vocab}; scheme {args.scheme}; medians of {args.steps} interleaved steps "
              f"after {args.warmup} warmup", flush=True)
    rows = [measure(size, args) for size in args.sizes]
    if args.json:
        print(json.dumps({"sizes": rows, "threads": args.threads, "scheme": args.scheme,
                          "vocab": args.vocab, "steps": args.steps, "warmup": args.warmup}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
