"""The training loop one Ray Train worker runs: a DeepSpeed engine over a quantized model.

Every rank trains on its own windows of the corpus; rank 0 alone writes to MLflow, through a
`tracking.Tracker`. Checkpoints are DeepSpeed checkpoints handed to `ray.train.report`, and a
restarted worker resumes from `ray.train.get_checkpoint()` at the same step and data position
(the sampler is a pure function of the step). At the end rank 0 leaves the trial's artifacts
(the latent model and the packed file), measures them, and writes the run's `final/` summary.
Under ZeRO-3 every read of the weights happens inside a gather of the partitioned parameters.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ternarylm.core import metrics as M
from ternarylm import tracking
from ternarylm.model.stats import block_sparsity, layer_stats
from ternarylm.deploy.artifacts import ARTIFACT_PATH, save_trained
from ternarylm.config import TrialConfig
from ternarylm.data import PreparedData, WindowSampler, eval_batches, prepare_data
from ternarylm.deploy.inference import load_packed, tensor_bytes
from ternarylm.model.transformer import TernaryLM
from ternarylm.training.optim import TrainSchedule, param_groups
from ternarylm.deploy.packing import PACKED_ARTIFACT_PATH, pack_model, provenance
from ternarylm.model.plans import apply_plan
from ternarylm.model.quantizers import TERNARY_SCHEMES

if TYPE_CHECKING:  # the worker entry point calls this module, never the other way
    from ternarylm.training.worker import TrialRuntime

CHECKPOINT_TAG = "ckpt"
DIVERGED_TAG = "ternarylm.diverged"
ZERO_STAGE_TAG = "ternarylm.deepspeed.zero_stage"
"""The ZeRO stage the trial's engine ran (see `zero_stage`)."""
PACKED_FILE = "model.packed.safetensors"

# Dense bf16 peak of known accelerators, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def zero_stage(cfg: TrialConfig, bf16: bool) -> int:
    """The ZeRO stage the engine runs: the configured one, except that a single fp32 rank runs
    stage 0. Stages 1 and 2 partition optimizer state and gradients across ranks; one rank has
    nothing to partition, and stage 1's flat fp32 copies and per-parameter hooks cost about 8%
    of a `micro` CPU step (measured against stage 0). bf16 keeps its stage (DeepSpeed's bf16
    optimizer is built around it), and so does stage 3."""
    stage = cfg.train.zero_stage
    return 0 if stage in (1, 2) and cfg.num_workers == 1 and not bf16 else stage


def deepspeed_config(cfg: TrialConfig, bf16: bool) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * cfg.num_workers,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": zero_stage(cfg, bf16)},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_model(cfg: TrialConfig, vocab_size: int) -> tuple[TernaryLM, dict[str, str]]:
    """The trial's initial model under its plan, and the plan's layer formats: a function of
    the config alone (seeded), so every rank, and a cohort member, starts from these weights."""
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(vocab_size)
    model = TernaryLM(model_cfg)
    return model, apply_plan(model, cfg.plan, cfg.scheme, model_cfg.n_layers)


def bf16_of(cfg: TrialConfig) -> bool:
    """Whether the trial's engine computes in bf16 (`precision`, `auto` meaning on CUDA)."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cfg.use_gpu)


def prepare_deepspeed(device: torch.device) -> None:
    """Before `deepspeed.initialize` on `device`."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (`deepspeed_shm_comm`)
        # when its comm backend starts; only `inference_all_reduce` (DeepSpeed-Inference's
        # tensor parallelism) uses it, training reduces through torch.distributed. The build
        # took 36-41 s on a fresh machine, and again whenever processes with other environments
        # (Ray workers, plain ones) shared its torch-extension cache; marked unavailable, it is
        # never built. (Not on GPU: reading the table there checks every op builder, and the
        # CUDA backend has no such op.)
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def build_engine(cfg: TrialConfig, vocab_size: int, device: torch.device,
                 bf16: bool) -> tuple[Any, dict[str, str]]:
    """The trial's model under its plan, with its AdamW and schedule, in a DeepSpeed engine;
    returns the engine and the plan's layer formats. Needs torch.distributed initialised."""
    import deepspeed

    prepare_deepspeed(device)
    model, formats = build_model(cfg, vocab_size)
    model.to(device)
    # fused: one kernel per parameter in place of about ten; on a micro model on 2 CPU threads
    # 0.8 ms a step against 2.5 ms.
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=cfg.train.betas, fused=True)
    scheduler = TrainSchedule(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, bf16))
    return engine, formats


@dataclass
class WorkerPlace:
    """Where this Ray Train worker runs: its rank among `world`, device and precision."""

    rank: int
    world: int
    device: torch.device
    bf16: bool


def worker_place(cfg: TrialConfig) -> WorkerPlace:
    """This worker's rank and device, torch set up for them (a GPU, or the CPU's threads)."""
    # DeepSpeed picks its accelerator at import; without this it may probe for CUDA on CPU hosts.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
    import ray.train

    ctx = ray.train.get_context()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.use_gpu else torch.device("cpu")
    if cfg.use_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg.cpus_per_worker)
    return WorkerPlace(ctx.get_world_rank(), ctx.get_world_size(), device, bf16_of(cfg))


def restore(engine) -> tuple[dict[str, Any], list[str]]:
    """Load the worker group's newest whole checkpoint into `engine` (`resume`): its client
    state ({} if none) and a line per broken checkpoint quarantined on the way."""
    import ray.train

    return resume(engine, ray.train.get_checkpoint())


def open_tracker(runtime: TrialRuntime, rank: int, stage: int, step: int,
                 quarantined: list[str]) -> tracking.Tracker:
    """The trial's run as its loop records it: tagged with the ZeRO stage its engine ran (may
    differ from train.zero_stage), the checkpoints quarantined and the step a resumed launch
    started from."""
    log = tracking.MlflowTracker(runtime.tracking_uri, runtime.run_id, rank == 0, M.TRAIN_LOSS)
    log.set_tags({ZERO_STAGE_TAG: stage})
    if quarantined:
        log.set_tags({QUARANTINED_TAG: f"{'; '.join(quarantined)}; resumed from "
                                       f"{f'step {step}' if step else 'the start'}"})
    if step:
        log.set_tags({"ternarylm.resumed_from_step": step})
    return log


def launch_times(started: float, entered_at: float, runtime: TrialRuntime) -> dict[str, float]:
    """This launch's start-up times: worker entry to the loop (`started`, perf counter), and
    Ray Train's launch (the driver's fit() to `entered_at`, Unix time)."""
    launch = {M.WORKER_INIT_S: time.perf_counter() - started}
    if runtime.launched_at is not None:  # same clock on one machine; NTP-close across nodes
        launch[M.WORKER_START_S] = max(0.0, entered_at - runtime.launched_at)
    return launch


def run_worker(payload: dict[str, Any]) -> None:
    """What every Ray Train worker runs (through `ternarylm.training.worker.train_worker`): the trial's
    config and runtime arrive as objects, validated once by the driver."""
    started, entered_at = time.perf_counter(), time.time()
    cfg: TrialConfig = payload["trial"]
    runtime: TrialRuntime = payload["runtime"]
    place = worker_place(cfg)
    data = prepare_data(cfg.data)
    engine, formats = build_engine(cfg, data.vocab_size, place.device, place.bf16)
    state, quarantined = restore(engine)
    step = state.get("step", 0)
    log = open_tracker(runtime, place.rank, zero_stage(cfg, place.bf16), step, quarantined)
    loop = _Loop(cfg, engine, data, formats, place, log)
    loop.run(step, launch_times(started, entered_at, runtime))


def resume(engine, checkpoint) -> tuple[dict[str, Any], list[str]]:
    """Load the newest checkpoint that is whole into `engine`, from Ray Train's latest back
    through the older ones beside it; returns its client state ({} when none is) and a line per
    checkpoint found broken, which is renamed `<name>.corrupt` (kept for a look, never
    tried again). Ray Train would otherwise hand the broken one to every restarted worker."""
    broken = []
    for candidate in _checkpoints_newest_first(checkpoint):
        with candidate.as_directory() as d:
            problem = _unreadable(Path(d))
            if problem is None:
                _, client_state = engine.load_checkpoint(d, tag=CHECKPOINT_TAG)
                return client_state, broken
        target = f"{candidate.path}{CORRUPT_SUFFIX}"
        with contextlib.suppress(OSError):  # another rank renamed it first
            candidate.filesystem.move(candidate.path, target)
        broken.append(f"checkpoint {candidate.path} cannot be loaded ({problem}): renamed to "
                      f"{Path(target).name}")
    return {}, broken


CORRUPT_SUFFIX = ".corrupt"
QUARANTINED_TAG = "ternarylm.checkpoint_quarantined"
"""On a run whose newest checkpoint(s) could not be loaded: which, and where it resumed."""


def _checkpoints_newest_first(checkpoint) -> list:
    """Ray Train's latest checkpoint, then the older ones of the same run (its folder's other
    `checkpoint_<time>` entries, named so that they sort by time), newest first."""
    import pyarrow.fs
    import ray.train

    if checkpoint is None:
        return []
    fs, newest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = newest.rsplit("/", 1)
    older = sorted((info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(parent))
                    if info.type == pyarrow.fs.FileType.Directory
                    and info.base_name.startswith("checkpoint_")
                    and not info.base_name.endswith(CORRUPT_SUFFIX)
                    and info.base_name < name), reverse=True)
    return [checkpoint, *(ray.train.Checkpoint(path, filesystem=fs) for path in older)]


def _unreadable(directory: Path) -> str | None:
    """Why a DeepSpeed checkpoint folder cannot be loaded (None when every file of its tag is
    a whole torch archive): a truncated or overwritten file fails its zip directory or a CRC."""
    files = sorted((directory / CHECKPOINT_TAG).glob("*.pt"))
    if not files:
        return f"no {CHECKPOINT_TAG}/*.pt files"
    for f in files:
        try:
            with zipfile.ZipFile(f) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{f.name}: {e}"
        if bad is not None:
            return f"{f.name}: {bad} fails its checksum"
    return None


class _Loop:
    def __init__(self, cfg: TrialConfig, engine, data: PreparedData, formats: dict[str, str],
                 place: WorkerPlace, log: tracking.Tracker) -> None:
        self.cfg, self.engine, self.data, self.formats = cfg, engine, data, formats
        self.place, self.log = place, log
        self.rank, self.world, self.device = place.rank, place.world, place.device
        t = cfg.train
        self.sampler = WindowSampler(data.tokens("train"), cfg.seq_len, t.micro_batch,
                                     place.rank, place.world, cfg.seed)
        self.rate = Throughput(cfg, place, data.vocab_size)

    def run(self, step: int, launch: dict[str, float]) -> None:
        """Train from `step` to the end; `launch` holds this launch's start-up times, logged
        at the last step."""
        import ray.train

        t = self.cfg.train
        loop_start, eval_s = time.perf_counter(), 0.0
        self.log.set_tags({FINGERPRINTS_TAG: batch_fingerprints(self.sampler, step, self.place)})
        window_start, window_tokens = time.perf_counter(), 0
        while step < t.steps:
            loss = self._train_step(step)
            step += 1
            window_tokens += self.cfg.global_batch_tokens
            if not math.isfinite(loss):
                self._diverged(step, loss)
                return
            metrics: dict[str, float] = {"step": step}
            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.perf_counter() - window_start
                metrics |= self.rate.metrics(step, loss, self.engine.get_lr()[0],
                                             window_tokens / elapsed)
                window_start, window_tokens = time.perf_counter(), 0
            if step % t.eval_every == 0 or step == t.steps:
                eval_start = time.perf_counter()
                metrics |= self.evaluate(step)
                eval_s += time.perf_counter() - eval_start
            if step == t.steps:  # what this launch spent outside the training loop, for reports
                metrics |= launch | {M.TRAIN_LOOP_S: time.perf_counter() - loop_start,
                                     M.EVAL_S: eval_s}
            self.log.log(step, {k: v for k, v in metrics.items() if k != "step"})
            if step % t.checkpoint_every == 0 or step == t.steps:
                self.log.flush()  # before the checkpoint: a resume never leaves a gap
                if not self._checkpoint(step, metrics, {"step": step}):
                    return
            elif M.VAL_LOSS in metrics:  # Tune schedulers rank trials by it
                ray.train.report(metrics)
        self._finish(t.steps)

    def _finish(self, step: int) -> None:
        """The trial's artifacts, their measured sizes, then the run's `final/` summary."""
        started = time.perf_counter()
        with self._gathered():  # a collective: every rank takes part
            if self.rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    measured = export_model(Path(d), self.engine.module, self.cfg,
                                            self.formats, self.data, self.log)
                    self.log.log(step, measured | {
                        M.WORKER_EXPORT_S: time.perf_counter() - started})
        self.log.flush()
        self.log.log_summary()

    def _train_step(self, step: int) -> float:
        total = torch.zeros((), device=self.device)
        for micro in range(self.cfg.train.grad_accum):
            x, y = (b.to(self.device) for b in self.sampler.batch(step, micro))
            logits = self.engine(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                   label_smoothing=self.cfg.train.label_smoothing)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        total /= self.cfg.train.grad_accum
        if step + 1 == self.cfg.train.inject_nan_at_step:
            total.fill_(float("nan"))
        dist.all_reduce(total)  # every rank must agree on divergence
        return float(total) / self.world

    @torch.no_grad()
    def _mean_loss(self, split: str, max_tokens: int | None) -> tuple[float, float]:
        """Mean next-token loss over `split` in eval mode, windows shared out across ranks:
        plain, and with the training loss's label smoothing (what the paper's perplexity is)."""
        self.engine.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in eval_batches(self.data.tokens(split), self.cfg.seq_len, self.cfg.train.micro_batch,
                                 self.rank, self.world, max_tokens):
            logits = self.engine(x.to(self.device))
            sums += loss_sums(logits, y.to(self.device), self.cfg.train.label_smoothing)
        self.engine.train()
        dist.all_reduce(sums)
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])

    def _gathered(self):
        """Whole parameters on every rank while inside (ZeRO-3 partitions them: outside a
        gather a partitioned matrix has no elements); a collective, so every rank enters."""
        if self.cfg.train.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()),
                                                 modifier_rank=None)

    def evaluate(self, step: int) -> dict[str, float]:
        t = self.cfg.train
        val, val_smoothed = self._mean_loss("validation", t.eval_max_tokens)
        train, _ = self._mean_loss("train", t.train_sample_tokens)
        with self._gathered():
            return (eval_metrics(val, val_smoothed, train, self.data)
                    | weight_metrics(self.engine.module))

    def _checkpoint(self, step: int, metrics: dict[str, float],
                    client_state: dict[str, Any]) -> bool:
        """Save and report a checkpoint; False when the disk is full (the run then tagged)."""
        full = save_checkpoint(self.engine, metrics, client_state)
        if full is not None:
            self.log.set_tags({tracking.DISK_FULL_TAG: full})
        return full is None

    def _diverged(self, step: int, loss: float) -> None:
        import ray.train

        mark_diverged(self.log, step, loss)
        ray.train.report({"step": step, "diverged": 1.0, M.TRAIN_LOSS: loss})


FINGERPRINTS_TAG = "ternarylm.rank_batch_fingerprints"


def batch_fingerprints(sampler: WindowSampler, step: int, place: WorkerPlace) -> str:
    """A fingerprint of each rank's first batch (a collective): proof of disjoint data."""
    x, _ = sampler.batch(step, 0)
    digest = torch.tensor([int(hashlib.sha1(x.numpy().tobytes()).hexdigest()[:12], 16)],
                          device=place.device)  # NCCL gathers CUDA tensors only
    gathered = [torch.zeros_like(digest) for _ in range(place.world)]
    dist.all_gather(gathered, digest)
    return ",".join(f"{int(g):x}" for g in gathered)


class Throughput:
    """The progress metrics of a trial's step: loss, rate, tokens, FLOPs, memory."""

    def __init__(self, cfg: TrialConfig, place: WorkerPlace, vocab_size: int) -> None:
        self.cfg, self.place = cfg, place
        self.flops_per_token = cfg.model_config(vocab_size).flops_per_token(cfg.seq_len)
        self.peak_flops = _peak_flops(place.device)

    def metrics(self, step: int, loss: float, lr: float, tokens_per_s: float) -> dict[str, float]:
        tokens = step * self.cfg.global_batch_tokens
        flops_per_s = tokens_per_s * self.flops_per_token
        m = {M.TRAIN_LOSS: loss, M.TRAIN_LR: lr,
             M.TOKENS_PER_S: tokens_per_s, M.FLOPS_PER_S: flops_per_s,
             M.TOKENS: tokens, M.FLOPS: tokens * self.flops_per_token,
             M.PEAK_RSS: _peak_rss_bytes()}
        if self.peak_flops:
            m[M.MFU] = flops_per_s / (self.peak_flops * self.place.world)
        if self.place.device.type == "cuda":
            m[M.PEAK_CUDA] = torch.cuda.max_memory_allocated(self.place.device)
        return m


def loss_sums(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """[summed loss, summed loss with label smoothing, tokens] of one evaluation batch
    (logits [B, T, V], targets [B, T]), in float64 for the sums over a split."""
    logits, y = logits.flatten(0, 1).float(), y.flatten()
    return torch.stack([
        F.cross_entropy(logits, y, reduction="sum").double(),
        F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing).double(),
        torch.tensor(y.numel(), dtype=torch.float64, device=y.device)])


def eval_metrics(val: float, val_smoothed: float, train: float,
                 data: PreparedData) -> dict[str, float]:
    """An evaluation's metrics from its mean losses (validation, smoothed, training sample)."""
    val_ppl, train_ppl = math.exp(min(val, 80)), math.exp(min(train, 80))
    return {M.VAL_LOSS: val, M.VAL_PPL: val_ppl, M.VAL_LOSS_SMOOTHED: val_smoothed,
            M.VAL_BPB: val / math.log(2) / data.bytes_per_token("validation"),
            M.TRAIN_SAMPLE_LOSS: train, M.TRAIN_SAMPLE_PPL: train_ppl,
            M.TRAIN_VAL_RATIO: val_ppl / train_ppl}


def weight_metrics(model: TernaryLM) -> dict[str, float]:
    """Sparsity, effective bits, scale drift and latent size of the (whole) weights."""
    rows = layer_stats(model)
    m = {M.LATENT_BYTES: 4 * sum(p.numel() for p in model.parameters())}
    ternary = [r for r in rows if r["format"] in TERNARY_SCHEMES]
    if ternary:
        numel = sum(r["numel"] for r in ternary)
        m[M.SPARSITY] = sum(r["zero_fraction"] * r["numel"] for r in ternary) / numel
        m[M.EFFECTIVE_BITS] = sum(r["effective_bits"] * r["numel"] for r in ternary) / numel
    m |= {M.block_sparsity(b): s for b, s in block_sparsity(rows).items()}
    learned = [r for r in rows if "scale_initial" in r]
    if learned:
        m[M.LEARNED_DRIFT] = sum(r["scale_mean"] / r["scale_initial"] for r in learned) / len(learned)
    return m


def save_checkpoint(engine, metrics: dict[str, float],
                    client_state: dict[str, Any]) -> str | None:
    """A DeepSpeed checkpoint of `engine` reported to Ray Train with `metrics` (a collective:
    every rank writes its shard, then every rank reports its directory). Returns None, or on a
    full disk why (where, the space it needs and what is free): the caller tags its run(s)
    with it (the driver fails them with this reason) and ends the loop, as Ray Train would
    restart failed workers on a disk that stays full. No report follows: Ray Train orders
    reports, and would wait for the failed one for ever."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        where = d
        try:
            engine.save_checkpoint(d, tag=CHECKPOINT_TAG, client_state=client_state)
            where = ray.train.get_context().get_storage().experiment_fs_path
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        except OSError as e:
            if not disk_full(e):
                raise
            free = shutil.disk_usage(where).free if os.path.isdir(where) else None  # not s3://
            room = f", {free / 2**20:.1f} MiB free" if free is not None else ""
            return (f"no space left on device at {where} for the step-{client_state['step']} "
                    f"checkpoint (it needs {_folder_bytes(Path(d)) / 2**20:.1f} MiB{room})")
    return None


def mark_diverged(log: tracking.Tracker, step: int, loss: float) -> None:
    """Record a diverged trial's last loss and the tag its driver reads (Ray keeps only
    checkpointed reports)."""
    log.log(step, {M.TRAIN_LOSS: loss})
    log.flush()
    log.set_tags({DIVERGED_TAG: f"loss became {loss} at step {step}"})


def export_model(directory: Path, model: TernaryLM, cfg: TrialConfig, formats: dict[str, str],
                 data: PreparedData, log: tracking.Tracker) -> dict[str, float]:
    """Log the final model (`model/`: latent weights, config, tokenizer) and its packed file
    (`packed/`, what `ternarylm pack` writes for it); returns the packed file's measured
    size on disk and the bytes its inference model holds once loaded."""
    tokenizer = data.tokenizer()
    model_dir = save_trained(directory / ARTIFACT_PATH, model, cfg, formats, tokenizer,
                             data.eos_id)
    log.log_artifact(model_dir, ARTIFACT_PATH)
    packed = pack_model(model, directory / PACKED_FILE, tokenizer, data.eos_id,
                        provenance=provenance(cfg))
    log.log_artifact(packed.path, PACKED_ARTIFACT_PATH)
    resident = tensor_bytes(load_packed(packed.path).model)
    return {M.PACKED_BYTES: packed.path.stat().st_size, M.PACKED_RESIDENT: resident}


def disk_full(error: OSError) -> bool:
    """Whether an OSError is a full disk (pyarrow's copies carry the errno only in the text)."""
    return error.errno == errno.ENOSPC or "No space left on device" in str(error)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
