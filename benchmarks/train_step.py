"""Step time of simulated ternary training against full precision.

Builds the same model twice, once under the `fp` plan and once under `all_ternary` (absmean by
default), and times a full training step (forward, backward, AdamW) of each, interleaved so
that both see the same machine load: warmup steps first, then alternating timed steps, medians
reported. The goal is a ternary / FP ratio of at most 1.10.

    python benchmarks/train_step.py                      # CPU: mini and small, V=8192, T=256, B=8
    python benchmarks/train_step.py --json               # last line: one JSON object
    python benchmarks/train_step.py --device cuda        # bf16 autocast on a GPU
    python benchmarks/train_step.py --profile            # where the ternary step spends its time

On a machine other jobs are using, OpenMP's spinning threads make multi-threaded wall times
swing by several x; `--threads 1 --clock cpu` (CPU time of this process) stays within a few
percent, and OMP_WAIT_POLICY=PASSIVE steadies multi-threaded runs.
"""

from __future__ import annotations

import os
import sys

# This directory holds benchmarks/tokenize.py, which would shadow the standard library's
# `tokenize` (imported by inspect, hence by torch) when this file is run as a script.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from ternarylm.model import TernaryLM, model_config
from ternarylm.plans import apply_plan, preset
from ternarylm.quantizers import TERNARY_SCHEMES


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Trainer:
    """One model, its optimizer and a fixed batch; `step()` runs and times one training step."""

    def __init__(self, size: str, plan: str, scheme: str, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        cfg = model_config(size, vocab_size=args.vocab, seq_len=args.seq_len)
        torch.manual_seed(0)
        model = TernaryLM(cfg)
        apply_plan(model, preset(plan), scheme, cfg.n_layers)
        self.model = model.to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1,
                                     **({"fused": True} if self.device.type == "cuda" else {}))
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g)
        self.x, self.y = tokens[:, :-1].to(self.device), tokens[:, 1:].to(self.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" else nullcontext())
        self.times: list[float] = []
        # wall: elapsed time. cpu: CPU time of this process (all its threads), which other
        # processes competing for the cores inflate far less than wall time; use it with
        # --threads 1 on a shared machine (more threads add their spin-waiting to it).
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, record: bool = True) -> None:
        self._sync()
        start = self.clock()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.model.loss(self.x, self.y)
        loss.backward()
        self.opt.step()
        self._sync()
        if record:
            self.times.append(self.clock() - start)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(size: str, args: argparse.Namespace) -> dict:
    fp = Trainer(size, "fp", args.scheme, args)
    ternary = Trainer(size, "all_ternary", args.scheme, args)
    pair = (fp, ternary)
    for _ in range(args.warmup):
        for t in pair:
            t.step(record=False)
    for i in range(args.steps):
        for t in (pair if i % 2 == 0 else pair[::-1]):  # alternate which goes first
            t.step()
    row = {"size": size, "fp_step_s": round(fp.median, 5),
           "ternary_step_s": round(ternary.median, 5),
           "ratio": round(ternary.median / fp.median, 4),
           # the fastest steps: the least disturbed by other jobs on a shared machine
           "fp_min_s": round(min(fp.times), 5), "ternary_min_s": round(min(ternary.times), 5)}
    if not args.json:
        def spread(t: Trainer) -> str:
            return f"[{min(t.times):.3f}, {max(t.times):.3f}]"

        print(f"{size:>8}: fp {fp.median:.4f}s {spread(fp)}  ternary {ternary.median:.4f}s "
              f"{spread(ternary)}  ratio {row['ratio']:.3f}", flush=True)
    if args.profile:
        profile(ternary, fp, size)
    return row


def profile(ternary: Trainer, fp: Trainer, size: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if ternary.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if ternary.device.type == "cuda" else "self_cpu_time_total"
    for name, trainer in (("ternary", ternary), ("fp", fp)):
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                trainer.step(record=False)
        print(f"\n=== {size} {name}: 3 steps, top ops by self time ===", file=sys.stderr)
        print(prof.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["mini", "small"])
    parser.add_argument("--scheme", default="absmean", choices=TERNARY_SCHEMES)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=core_count(),
                        help="torch intra-op threads (default: the cores this process may use)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what a step's time is: elapsed (default) or process CPU time "
                             "(steadier on a machine shared with other jobs)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile 3 steps of each model (tables on stderr)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        parser.error("--clock cpu measures CPU time; use it with --device cpu")
    torch.set_num_threads(args.threads)

    if not args.json:
        print(f"device {args.device}, {args.threads} threads, torch {torch.__version__}; "
              f"V={args.vocab} T={args.seq_len} B={args.batch}; scheme {args.scheme}; {args.clock} "
              f"clock; medians of {args.steps} interleaved steps after {args.warmup} warmup",
              flush=True)
    rows = [measure(size, args) for size in args.sizes]
    if args.json:
        print(json.dumps({"sizes": rows, "device": args.device, "threads": args.threads,
                          "clock": args.clock, "scheme": args.scheme, "vocab": args.vocab,
                          "seq_len": args.seq_len,
                          "batch": args.batch, "steps": args.steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
