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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ternarylm import metrics as M
from ternarylm import tracking
from ternarylm.analysis import block_sparsity, layer_stats
from ternarylm.artifacts import ARTIFACT_PATH, save_trained
from ternarylm.config import TrialConfig
from ternarylm.data import PreparedData, WindowSampler, eval_batches, prepare_data
from ternarylm.inference import load_packed, tensor_bytes
from ternarylm.model import TernaryLM
from ternarylm.optim import TrainSchedule, param_groups
from ternarylm.packing import PACKED_ARTIFACT_PATH, pack_model, provenance
from ternarylm.plans import apply_plan
from ternarylm.quantizers import TERNARY_SCHEMES

if TYPE_CHECKING:  # the worker entry point calls this module, never the other way
    from ternarylm.worker import TrialRuntime

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


def build_engine(cfg: TrialConfig, vocab_size: int, device: torch.device,
                 bf16: bool) -> tuple[Any, dict[str, str]]:
    """The trial's model under its plan, with its AdamW and schedule, in a DeepSpeed engine;
    returns the engine and the plan's layer formats. Needs torch.distributed initialised."""
    import deepspeed
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


def run_worker(payload: dict[str, Any]) -> None:
    """What every Ray Train worker runs (through `ternarylm.worker.train_worker`): the trial's
    config and runtime arrive as objects, validated once by the driver."""
    started, entered_at = time.perf_counter(), time.time()
    cfg: TrialConfig = payload["trial"]
    # DeepSpeed picks its accelerator at import; without this it may probe for CUDA on CPU hosts.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
    import ray.train

    runtime: TrialRuntime = payload["runtime"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.use_gpu else torch.device("cpu")
    if cfg.use_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg.cpus_per_worker)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cfg.use_gpu)

    data = prepare_data(cfg.data)
    engine, formats = build_engine(cfg, data.vocab_size, device, bf16)

    step, quarantined = resume(engine, ray.train.get_checkpoint())

    log = tracking.MlflowTracker(runtime.tracking_uri, runtime.run_id, rank == 0, M.TRAIN_LOSS)
    log.set_tags({ZERO_STAGE_TAG: zero_stage(cfg, bf16)})  # may differ from train.zero_stage
    if quarantined:
        log.set_tags({QUARANTINED_TAG: f"{'; '.join(quarantined)}; resumed from "
                                       f"{f'step {step}' if step else 'the start'}"})
    if step:
        log.set_tags({"ternarylm.resumed_from_step": step})
    loop = _Loop(cfg, engine, data, formats, rank, world, device, log)
    launch = {M.WORKER_INIT_S: time.perf_counter() - started}
    if runtime.launched_at is not None:  # same clock on one machine; NTP-close across nodes
        launch[M.WORKER_START_S] = max(0.0, entered_at - runtime.launched_at)
    loop.run(step, launch)


def resume(engine, checkpoint) -> tuple[int, list[str]]:
    """Load the newest checkpoint that is whole into `engine`, from Ray Train's latest back
    through the older ones beside it; returns its step (0 when none is) and a line per
    checkpoint found broken, which is renamed `<name>.corrupt` (kept for a look, never
    tried again). Ray Train would otherwise hand the broken one to every restarted worker."""
    broken = []
    for candidate in _checkpoints_newest_first(checkpoint):
        with candidate.as_directory() as d:
            problem = _unreadable(Path(d))
            if problem is None:
                _, client_state = engine.load_checkpoint(d, tag=CHECKPOINT_TAG)
                return client_state["step"], broken
        target = f"{candidate.path}{CORRUPT_SUFFIX}"
        with contextlib.suppress(OSError):  # another rank renamed it first
            candidate.filesystem.move(candidate.path, target)
        broken.append(f"checkpoint {candidate.path} cannot be loaded ({problem}): renamed to "
                      f"{Path(target).name}")
    return 0, broken


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
                 rank: int, world: int, device: torch.device, log: tracking.Tracker) -> None:
        self.cfg, self.engine, self.data, self.formats = cfg, engine, data, formats
        self.rank, self.world, self.device, self.log = rank, world, device, log
        t = cfg.train
        self.sampler = WindowSampler(data.tokens("train"), cfg.seq_len, t.micro_batch,
                                     rank, world, cfg.seed)
        self.model_cfg = engine.module.cfg
        self.flops_per_token = self.model_cfg.flops_per_token(cfg.seq_len)
        self.peak_flops = _peak_flops(device)

    def run(self, step: int, launch: dict[str, float]) -> None:
        """Train from `step` to the end; `launch` holds this launch's start-up times, logged
        at the last step."""
        import ray.train

        t = self.cfg.train
        loop_start, eval_s = time.perf_counter(), 0.0
        self._record_rank_batches(step)
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
                metrics |= self._train_metrics(step, loss, window_tokens / elapsed)
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
                if not self._checkpoint(step, metrics):
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
                    measured = self._export_model(Path(d))
                    self.log.log(step, measured | {
                        M.WORKER_EXPORT_S: time.perf_counter() - started})
        self.log.flush()
        self.log.log_summary()

    def _record_rank_batches(self, step: int) -> None:
        """Tag the run with a fingerprint of each rank's first batch: proof of disjoint data."""
        x, _ = self.sampler.batch(step, 0)
        digest = torch.tensor([int(hashlib.sha1(x.numpy().tobytes()).hexdigest()[:12], 16)],
                              device=self.device)  # NCCL gathers CUDA tensors only
        gathered = [torch.zeros_like(digest) for _ in range(self.world)]
        dist.all_gather(gathered, digest)
        self.log.set_tags({
            "ternarylm.rank_batch_fingerprints": ",".join(f"{int(g):x}" for g in gathered)})

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

    def _train_metrics(self, step: int, loss: float, tokens_per_s: float) -> dict[str, float]:
        tokens = step * self.cfg.global_batch_tokens
        flops_per_s = tokens_per_s * self.flops_per_token
        m = {M.TRAIN_LOSS: loss, M.TRAIN_LR: self.engine.get_lr()[0],
             M.TOKENS_PER_S: tokens_per_s, M.FLOPS_PER_S: flops_per_s,
             M.TOKENS: tokens, M.FLOPS: tokens * self.flops_per_token,
             M.PEAK_RSS: _peak_rss_bytes()}
        if self.peak_flops:
            m[M.MFU] = flops_per_s / (self.peak_flops * self.world)
        if self.device.type == "cuda":
            m[M.PEAK_CUDA] = torch.cuda.max_memory_allocated(self.device)
        return m

    @torch.no_grad()
    def _mean_loss(self, split: str, max_tokens: int | None) -> tuple[float, float]:
        """Mean next-token loss over `split` in eval mode, windows shared out across ranks:
        plain, and with the training loss's label smoothing (what the paper's perplexity is)."""
        self.engine.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in eval_batches(self.data.tokens(split), self.cfg.seq_len, self.cfg.train.micro_batch,
                                 self.rank, self.world, max_tokens):
            logits = self.engine(x.to(self.device)).flatten(0, 1).float()
            y = y.to(self.device).flatten()
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += F.cross_entropy(logits, y, reduction="sum",
                                       label_smoothing=self.cfg.train.label_smoothing).double()
            sums[2] += y.numel()
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
        val_ppl, train_ppl = math.exp(min(val, 80)), math.exp(min(train, 80))
        m = {M.VAL_LOSS: val, M.VAL_PPL: val_ppl, M.VAL_LOSS_SMOOTHED: val_smoothed,
             M.VAL_BPB: val / math.log(2) / self.data.bytes_per_token("validation"),
             M.TRAIN_SAMPLE_LOSS: train, M.TRAIN_SAMPLE_PPL: train_ppl,
             M.TRAIN_VAL_RATIO: val_ppl / train_ppl}
        with self._gathered():
            return m | self._weight_metrics()

    def _weight_metrics(self) -> dict[str, float]:
        """Sparsity, effective bits, scale drift and latent size of the (whole) weights."""
        rows = layer_stats(self.engine.module)
        m = {M.LATENT_BYTES: 4 * sum(p.numel() for p in self.engine.module.parameters())}
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

    def _checkpoint(self, step: int, metrics: dict[str, float]) -> bool:
        """Save and report a checkpoint; False when a disk is full (the run then tagged)."""
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            where = d
            try:
                # A collective: every rank writes its shard, then every rank reports its folder.
                self.engine.save_checkpoint(d, tag=CHECKPOINT_TAG, client_state={"step": step})
                where = ray.train.get_context().get_storage().experiment_fs_path
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            except OSError as e:
                if not disk_full(e):
                    raise
                self._disk_full(step, where, _folder_bytes(Path(d)))
                return False
        return True

    def _disk_full(self, step: int, where: str, needed: int) -> None:
        """Tag the run (the driver fails it with this reason); the caller ends the workers
        (Ray Train would restart failed ones on a disk that stays full). No report follows:
        Ray Train orders reports, and would wait for the failed one for ever."""
        free = shutil.disk_usage(where).free if os.path.isdir(where) else None  # not s3://...
        room = f", {free / 2**20:.1f} MiB free" if free is not None else ""
        self.log.set_tags({tracking.DISK_FULL_TAG: (
            f"no space left on device at {where} for the step-{step} checkpoint (it needs "
            f"{needed / 2**20:.1f} MiB{room})")})

    def _diverged(self, step: int, loss: float) -> None:
        import ray.train

        self.log.log(step, {M.TRAIN_LOSS: loss})
        self.log.flush()
        # The driver reads this tag: Ray keeps only checkpointed reports.
        self.log.set_tags({DIVERGED_TAG: f"loss became {loss} at step {step}"})
        ray.train.report({"step": step, "diverged": 1.0, M.TRAIN_LOSS: loss})

    def _export_model(self, directory: Path) -> dict[str, float]:
        """Log the final model (`model/`: latent weights, config, tokenizer) and its packed file
        (`packed/`, what `ternarylm pack` writes for it); returns the packed file's measured
        size on disk and the bytes its inference model holds once loaded."""
        tokenizer = self.data.tokenizer()
        model_dir = save_trained(directory / ARTIFACT_PATH, self.engine.module, self.cfg,
                                 self.formats, tokenizer, self.data.eos_id)
        self.log.log_artifact(model_dir, ARTIFACT_PATH)
        packed = pack_model(self.engine.module, directory / PACKED_FILE, tokenizer,
                            self.data.eos_id, provenance=provenance(self.cfg))
        self.log.log_artifact(packed.path, PACKED_ARTIFACT_PATH)
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
