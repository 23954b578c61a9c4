"""The training loop of a cohort's Ray Train workers: one DeepSpeed engine over a `StackedLM`.

The members (trials of one shape, `ternarylm.training.cohort`) train in one batched forward and backward,
each with its own seed (initial weights and data order), schedule, weight decay, betas,
clipping and label smoothing (`MemberAdamW`), and its own plan and scheme (the stacked layers'
per-member quantizers). Everything recorded stays per member, written by the functions the solo
loop (`ternarylm.training.train`) uses: its MLflow run gets the same metrics at the same steps, its
`final/` summary, and its artifacts from `member_model(m)`, the plain TernaryLM it would be
alone, through the same export (so its packed file is what `ternarylm pack` writes for it).

A member whose loss stops being finite is frozen (no further updates), tagged diverged and
logged no more; the others go on. The cohort checkpoints as one engine; its client state holds
the step and the diverged members, so a restarted worker group resumes every member there.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ternarylm.core import metrics as M
from ternarylm import tracking
from ternarylm.config import TrialConfig
from ternarylm.data import PreparedData, WindowSampler, eval_batches, prepare_data
from ternarylm.training.member_optim import MemberAdamW
from ternarylm.training.stacked import StackedLM, member_batches, member_losses
from ternarylm.training.train import (FINGERPRINTS_TAG, Throughput, WorkerPlace, batch_fingerprints,
                             deepspeed_config, eval_metrics, export_model, launch_times,
                             loss_sums, mark_diverged, open_tracker, prepare_deepspeed, restore,
                             save_checkpoint, weight_metrics, worker_place)

if TYPE_CHECKING:  # the worker entry point calls this module, never the other way
    from ternarylm.training.worker import TrialRuntime


def build_cohort_engine(trials: list[TrialConfig], vocab_size: int, device: torch.device):
    """The members stacked in one DeepSpeed engine (ZeRO stage 0, fp32: `cohort.eligible`).
    DeepSpeed's gradient clipping is off: MemberAdamW clips each member by its own norm."""
    import deepspeed

    prepare_deepspeed(device)
    model = StackedLM(trials, vocab_size).to(device)
    optimizer = MemberAdamW(model, [t.train for t in trials])
    config = deepspeed_config(trials[0], False) | {"gradient_clipping": 0.0,
                                                   "zero_optimization": {"stage": 0}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def run_cohort_worker(payload: dict[str, Any]) -> None:
    """What every worker of a cohort runs (`ternarylm.training.worker.cohort_worker`)."""
    started, entered_at = time.perf_counter(), time.time()
    trials: list[TrialConfig] = payload["trials"]
    runtimes: list[TrialRuntime] = payload["runtimes"]
    place = worker_place(trials[0])
    data = prepare_data(trials[0].data)
    engine = build_cohort_engine(trials, data.vocab_size, place.device)
    state, quarantined = restore(engine)
    step, diverged = state.get("step", 0), set(state.get("diverged", []))
    for m in diverged:
        engine.optimizer.freeze(m)
    logs = [open_tracker(r, place.rank, 0, step, quarantined) for r in runtimes]
    loop = _CohortLoop(trials, engine, data, place, logs, diverged)
    loop.run(step, launch_times(started, entered_at, runtimes[0]))


class _CohortLoop:
    def __init__(self, trials: list[TrialConfig], engine, data: PreparedData,
                 place: WorkerPlace, logs: list[tracking.Tracker], diverged: set[int]) -> None:
        self.trials, self.engine, self.data, self.place, self.logs = (trials, engine, data,
                                                                      place, logs)
        self.cfg = trials[0]  # for what the members share: shape, steps, cadences
        self.model: StackedLM = engine.module
        self.samplers = [WindowSampler(data.tokens("train"), t.seq_len, t.train.micro_batch,
                                       place.rank, place.world, t.seed) for t in trials]
        self.rates = [Throughput(t, place, data.vocab_size) for t in trials]
        self.smoothing = [t.train.label_smoothing for t in trials]
        self.diverged = diverged

    @property
    def live(self) -> list[int]:
        return [m for m in range(len(self.trials)) if m not in self.diverged]

    def run(self, step: int, launch: dict[str, float]) -> None:
        """Train every member from `step` to the end, as `train._Loop.run` trains one."""
        import ray.train

        t = self.cfg.train
        loop_start, eval_s = time.perf_counter(), 0.0
        for sampler, log in zip(self.samplers, self.logs):
            log.set_tags({FINGERPRINTS_TAG: batch_fingerprints(sampler, step, self.place)})
        window_start, window_tokens = time.perf_counter(), 0
        while step < t.steps:
            losses = self._train_step(step)
            step += 1
            window_tokens += self.cfg.global_batch_tokens
            for m in self.live:
                if not math.isfinite(losses[m]):
                    self._diverged(m, step, losses[m])
            if not self.live:
                ray.train.report({"step": step, "diverged": 1.0})
                return
            metrics: dict[int, dict[str, float]] = {m: {} for m in self.live}
            if step % t.log_every == 0 or step == t.steps:
                rate = window_tokens / (time.perf_counter() - window_start)
                lrs = self.engine.optimizer.lrs()
                for m in self.live:
                    metrics[m] |= self.rates[m].metrics(step, losses[m], lrs[m], rate)
                window_start, window_tokens = time.perf_counter(), 0
            report = {"step": step, "members_live": float(len(self.live))}
            evaluated = step % t.eval_every == 0 or step == t.steps
            if evaluated:
                eval_start = time.perf_counter()
                evaluation = self.evaluate()
                eval_s += time.perf_counter() - eval_start
                for m, values in evaluation.items():
                    metrics[m] |= values
                    # The study's progress line of each member (`<metric>/<member>`).
                    report |= {f"{k}/{m}": values[k] for k in (M.VAL_LOSS, M.VAL_BPB)}
            if step == t.steps:  # the driver reads the loop's time from the last report
                report[M.TRAIN_LOOP_S] = time.perf_counter() - loop_start
                for m in self.live:
                    metrics[m] |= launch | {M.TRAIN_LOOP_S: report[M.TRAIN_LOOP_S],
                                            M.EVAL_S: eval_s}
            for m in self.live:
                self.logs[m].log(step, metrics[m])
            if step % t.checkpoint_every == 0 or step == t.steps:
                for log in self.logs:
                    log.flush()  # before the checkpoint: a resume never leaves a gap
                full = save_checkpoint(self.engine, report,
                                       {"step": step, "diverged": sorted(self.diverged)})
                if full is not None:  # every member's run fails with the reason
                    for log in self.logs:
                        log.set_tags({tracking.DISK_FULL_TAG: full})
                    return
            elif evaluated:
                ray.train.report(report)
        self._finish(t.steps)

    def _train_step(self, step: int) -> list[float]:
        """One optimizer step of every member; each member's loss, averaged over ranks."""
        total = torch.zeros(len(self.trials), device=self.place.device)
        for micro in range(self.cfg.train.grad_accum):
            x, y = (b.to(self.place.device)
                    for b in member_batches(self.samplers, step, micro))
            losses = member_losses(self.engine(x), y, self.smoothing)
            # Member m's loss depends on member m's weights only: the sum's gradient is each
            # member's own.
            self.engine.backward(losses.sum())
            self.engine.step()
            total += losses.detach()
        total /= self.cfg.train.grad_accum
        for m, trial in enumerate(self.trials):
            if step + 1 == trial.train.inject_nan_at_step:
                total[m] = float("nan")
        dist.all_reduce(total)  # every rank must agree on divergence
        return (total / self.place.world).tolist()

    @torch.no_grad()
    def _mean_losses(self, split: str, max_tokens: int | None) -> torch.Tensor:
        """`train.loss_sums` over `split` of every member, [M, 3]: every member sees the same
        windows (as each would alone), in one batched forward."""
        self.engine.eval()
        members = len(self.trials)
        sums = torch.zeros(members, 3, dtype=torch.float64, device=self.place.device)
        for x, y in eval_batches(self.data.tokens(split), self.cfg.seq_len,
                                 self.cfg.train.micro_batch, self.place.rank, self.place.world,
                                 max_tokens):
            logits = self.engine(x.to(self.place.device).expand(members, *x.shape))
            y = y.to(self.place.device)
            for m in self.live:
                sums[m] += loss_sums(logits[m], y, self.smoothing[m])
        self.engine.train()
        dist.all_reduce(sums)
        return sums

    def evaluate(self) -> dict[int, dict[str, float]]:
        t = self.cfg.train
        val = self._mean_losses("validation", t.eval_max_tokens)
        train = self._mean_losses("train", t.train_sample_tokens)
        out = {}
        for m in self.live:
            means = eval_metrics(float(val[m, 0] / val[m, 2]), float(val[m, 1] / val[m, 2]),
                                 float(train[m, 0] / train[m, 2]), self.data)
            out[m] = means | weight_metrics(self.model.member_model(m))
        return out

    def _diverged(self, m: int, step: int, loss: float) -> None:
        """Member m stops here (its run is marked FAILED by the driver); the others go on."""
        self.engine.optimizer.freeze(m)
        self.diverged.add(m)
        mark_diverged(self.logs[m], step, loss)

    def _finish(self, step: int) -> None:
        """Each live member's artifacts, their measured sizes, then its run's `final/` summary."""
        for m in self.live:
            started = time.perf_counter()
            if self.place.rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    measured = export_model(Path(d), self.model.member_model(m), self.trials[m],
                                            self.model.formats[m], self.data, self.logs[m])
                self.logs[m].log(step, measured | {
                    M.WORKER_EXPORT_S: time.perf_counter() - started})
            self.logs[m].flush()
            self.logs[m].log_summary()
