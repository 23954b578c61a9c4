"""Standard evaluations: our models as an lm-evaluation-harness `LM` ("ternarylm").

`TernaryHarnessLM` scores requests with a trained model's latent weights (the quantized training
model, `artifacts.load_trained`) or with the packed CPU model (`inference.load_packed`: a packed
file, or a run/directory packed on the fly), implementing the harness's three request types:

  loglikelihood          log P(continuation | context) and whether it is the greedy choice
  loglikelihood_rolling  log P(text) over windows of the model's context (perplexity tasks)
  generate_until         greedy (or sampled) text until a stop string, eos or max_gen_toks

Every context starts with the end-of-text token, as every training document does (documents are
concatenated with eos between them), so an empty context is just [eos]. Contexts longer than the
model's seq_len keep their last tokens. Continuations are tokenized as the harness's HF models
do: `encode(context + continuation)` minus `encode(context)`, with the context's trailing spaces
moved to the continuation.

`evaluate` runs `lm_eval.simple_evaluate` on task names (hub tasks where the network reaches the
hub; tasks defined by YAML files under `include_path` work offline, e.g. `dataset_path: json`
with `dataset_kwargs.data_files` pointing at local jsonl files) and, when the source is an
MLflow run id, logs the results as a child run of it, as GLUE fine-tuning does: params
`eval.*`, metrics `eval/<task>/<metric>` and `results.json` under `eval/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer

from ternarylm.core import metrics as M
from ternarylm.core.errors import UserError
from ternarylm.core.identity import content_key

MODEL_NAME = "ternarylm"
EVAL_TASKS_TAG = "ternarylm.eval.tasks"
EVAL_SOURCE_TAG = "ternarylm.eval.source_run"
EVAL_KEY_TAG = "ternarylm.eval.key"
DEFAULT_MAX_GEN_TOKS = 256


class EvalError(UserError):
    """Evaluation settings or requests that cannot be run; the message says what to change."""


@dataclass
class EvalModel:
    """What the harness adapter needs of a model, whichever way it was loaded."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    """Token ids [B, T] -> logits [B, T, V]."""
    tokenizer: Tokenizer
    eos_id: int
    seq_len: int
    packed: Any | None = None
    """The PackedLM when packed (decoding then uses its KV cache)."""
    trained: Any | None = None
    """The TrainedModel when the latent weights are used."""
    source_run: str | None = None
    """MLflow run id the model comes from, if any: evaluations are logged under it."""
    description: dict[str, Any] = dataclasses.field(default_factory=dict)


def _logged_packed_file(run_id: str) -> Path | None:
    """The packed file `ternarylm pack RUN_ID` logged to the run (under packed/), if any."""
    import mlflow

    from ternarylm import tracking
    from ternarylm.deploy.packing import PACKED_ARTIFACT_PATH

    try:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=PACKED_ARTIFACT_PATH,
            tracking_uri=tracking.tracking_uri()))
    except Exception:  # no such artifact (or no such run: load_trained then says so)
        return None
    files = sorted(local.glob("*.safetensors")) if local.is_dir() else [local]
    return files[0] if files else None


def load_eval_model(source: str | Path, packed: bool = False, embedding_dtype: str = "int8",
                    device: str = "cpu") -> EvalModel:
    """Latent weights of a run id / trained-model directory, or its packed model (`packed`, or
    when `source` is a packed file): a run's logged packed file (`ternarylm pack RUN_ID`), else
    the run or directory packed on the fly to a temporary file, floating-point layers in
    `embedding_dtype` (`ternarylm pack`'s default int8; fp32 keeps logits as trained)."""
    from ternarylm.deploy.artifacts import load_trained, run_id_of
    from ternarylm.deploy.inference import load_packed
    from ternarylm.deploy.packing import pack_model

    source = str(source)
    if Path(source).is_file():
        pm = load_packed(source)
        prov = str(pm.config.get("provenance", {}).get("source", ""))
        # A file packed from a run names it; one packed from a directory has no run to log to.
        run = prov if re.fullmatch(r"[0-9a-f]{32}", prov) else None
        return _from_packed(pm, source, run)
    run = run_id_of(source)
    logged = _logged_packed_file(source) if packed and run is not None else None
    if logged is not None:
        out = _from_packed(load_packed(logged), source, run)
        out.description["file"] = f"{source}/packed/{logged.name}"
        return out
    trained = load_trained(source)
    if not packed:
        model = trained.model.to(device)
        cfg = model.cfg

        def forward(idx: torch.Tensor) -> torch.Tensor:
            return model(idx.to(device)).float().cpu()

        return EvalModel(forward, trained.tokenizer, trained.eos_id, cfg.seq_len, None, trained,
                         run_id_of(source), {"source": source, "weights": "latent",
                                              "scheme": trained.trial.scheme,
                                              "plan": trained.trial.plan.name,
                                              "size": trained.trial.size})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "model.packed.safetensors")
        pack_model(trained.model, path, trained.tokenizer, trained.eos_id,
                   embedding_dtype=embedding_dtype,
                   provenance={"source": source, "scheme": trained.trial.scheme})
        pm = load_packed(path)
    out = _from_packed(pm, source, run_id_of(source))
    out.description |= {"scheme": trained.trial.scheme, "plan": trained.trial.plan.name,
                        "size": trained.trial.size, "embedding_dtype": embedding_dtype}
    return out


def _from_packed(pm, source: str, run: str | None) -> EvalModel:
    model = pm.model

    def forward(idx: torch.Tensor) -> torch.Tensor:
        return model(idx).float()

    return EvalModel(forward, pm.tokenizer, pm.eos_id, model.cfg.seq_len, model, None, run,
                     {"source": source, "weights": "packed",
                      "embedding_dtype": pm.config.get("embedding_dtype")})


@register_model(MODEL_NAME)
class TernaryHarnessLM(LM):
    """lm-evaluation-harness model "ternarylm": `--model ternarylm --model_args
    source=RUN_ID_OR_DIR[,packed=True][,batch_size=8]` or `TernaryHarnessLM(model=EvalModel)`."""

    def __init__(self, source: str | None = None, packed: bool = False, batch_size: int = 8,
                 embedding_dtype: str = "int8", device: str = "cpu",
                 model: EvalModel | None = None, seed: int = 1234, **_ignored) -> None:
        super().__init__()
        if model is None:
            if source is None:
                raise EvalError("ternarylm harness model needs source=RUN_ID_OR_DIR")
            model = load_eval_model(source, bool(packed), embedding_dtype, device)
        if int(batch_size) < 1:
            raise EvalError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size, self.seed = model, int(batch_size), int(seed)

    # -- the harness's view -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.model.eos_id

    @property
    def max_length(self) -> int:
        return self.model.seq_len

    @property
    def tokenizer_name(self) -> str:
        return "ternarylm"

    def tok_encode(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids)

    # -- scoring ------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return [self.eot_token_id, *ctx], whole[len(ctx):]

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log P(continuation tokens), all greedy) of (context ids, continuation ids),
        the context nonempty; a window longer than seq_len keeps its last tokens."""
        L = self.max_length
        windows = []
        for ctx, cont in pairs:
            if not ctx:
                raise EvalError("a scored context needs at least one token (eos)")
            if len(cont) > L:
                raise EvalError(f"a continuation of {len(cont)} tokens does not fit the model's "
                                f"context of {L}")
            inp = (ctx + cont)[-(L + 1):][:-1]
            windows.append((inp, cont))
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            T = max(len(windows[i][0]) for i in chunk)
            idx = torch.full((len(chunk), T), self.eot_token_id, dtype=torch.long)
            for row, i in enumerate(chunk):  # right padding: causal, so it changes nothing
                idx[row, :len(windows[i][0])] = torch.tensor(windows[i][0])
            logprobs = F.log_softmax(self.model.forward(idx).float(), dim=-1)
            for row, i in enumerate(chunk):
                inp, cont = windows[i]
                n = len(cont)
                lp = logprobs[row, len(inp) - n:len(inp)]  # [n, V]: predictions of cont
                target = torch.tensor(cont)
                total = float(lp.gather(1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        out = self.score(pairs)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self.score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation ---------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            text = self.generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    @torch.inference_mode()
    def generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """The continuation of `context` up to (not including) the first stop string."""
        from ternarylm.deploy.generate import check_sampling, sample_next

        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens",
                                                                    DEFAULT_MAX_GEN_TOKS)))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        top_k, top_p = gen_kwargs.pop("top_k", None), gen_kwargs.pop("top_p", None)
        check_sampling(temperature, top_k, top_p)
        generator = torch.Generator().manual_seed(self.seed)
        L = self.max_length
        max_new = max(0, min(max_new, L - 1))
        ids = [self.eot_token_id, *self.tok_encode(context)][-(L - max_new):]
        new: list[int] = []
        cache = self.model.packed.new_cache() if self.model.packed is not None else None
        text = ""
        for step in range(max_new):
            if cache is not None:
                feed = ids if step == 0 else new[-1:]
                logits = self.model.packed(torch.tensor([feed]), cache)[0, -1]
            else:
                logits = self.model.forward(torch.tensor([ids + new]))[0, -1]
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if token == self.eot_token_id:
                break
            new.append(token)
            text = self.tok_decode(new)
            if any(stop in text for stop in until):
                break
        for stop in until:
            text = text.split(stop)[0]
        return text


# ---------------------------------------------------------------------------------------------
# Entry point


def _task_list(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [t for t in names if t]
    if not names:
        raise EvalError("no tasks given; pass --tasks T1,T2")
    return names


def _metrics(results: dict[str, Any]) -> dict[str, float]:
    """eval/<task>/<metric>[_<filter>] -> value, numbers only (the harness writes 'N/A')."""
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if math.isfinite(float(value)):
                out[M.lm_eval(task, name)] = float(value)
    return out


def _task_manager(names: list[str], include_path: str | Path | None):
    """The harness's task index: only `include_path` when it defines every task (indexing the
    harness's own thousands of task YAMLs takes seconds), else both."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in names):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


@dataclass
class EvalSettings:
    """How a study evaluates every finished trial (`study.eval`); `evaluate`'s options."""

    packed: bool = False
    """Evaluate the packed file (the deployable model) instead of the latent weights."""
    limit: int | float | None = None
    """Examples per task (a count, or a fraction below 1); None evaluates them all."""
    num_fewshot: int | None = None
    """Few-shot examples; None keeps each task's default."""
    include_path: str | None = None
    """Folder of task YAMLs for tasks defined on local files (offline)."""
    batch_size: int = 8
    """Sequences scored per forward pass."""

    def __post_init__(self) -> None:
        if self.limit is not None and not self.limit > 0:
            raise EvalError(f"study.eval.limit must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise EvalError(f"study.eval.batch_size must be >= 1, got {self.batch_size}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise EvalError(f"study.eval.include_path {self.include_path}: no such directory "
                            f"of task YAMLs")

    def check_tasks(self, tasks: list[str]) -> None:
        """Every task must be one lm-eval knows (here, or in include_path)."""
        _check_known(_task_list(tasks), self.include_path)


def _check_known(names: list[str], include_path: str | Path | None):
    """The task manager, once every name is a task it knows; EvalError naming the others."""
    manager = _task_manager(names, include_path)
    unknown = [t for t in names if not manager.match_tasks([t])]
    if unknown:
        hint = (f" (no YAML under {include_path} defines it)" if include_path
                else "; pass --include-path DIR for tasks defined in local YAML files")
        raise EvalError(f"unknown lm-eval task(s) {', '.join(unknown)}{hint}")
    return manager


def evaluate(source: str | Path, tasks: str | list[str], *, packed: bool = False,
             include_path: str | Path | None = None, limit: int | float | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, embedding_dtype: str = "int8",
             bootstrap_iters: int = 1000, device: str = "cpu", log: bool = True,
             model: EvalModel | None = None, force: bool = False) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on a trained model; a run id's results become a child
    MLflow run of it (`log=False` skips that), keyed by everything that defines them: a
    finished child with the same key is returned instead unless `force`. Returns a JSON-ready
    summary."""
    import lm_eval
    from datasets.exceptions import DatasetsError

    names = _task_list(tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"--include-path {include_path}: no such directory of task YAMLs")
    manager = _check_known(names, include_path)
    em = model or load_eval_model(source, packed, embedding_dtype, device)
    key = content_key("eval", {"source": em.source_run, "tasks": names,
                               "weights": em.description, "include_path": include_path,
                               "limit": limit, "num_fewshot": num_fewshot,
                               "batch_size": batch_size, "bootstrap_iters": bootstrap_iters})
    if log and em.source_run is not None and not force:
        done = _finished_eval(em.source_run, key)
        if done is not None:
            return done
    lm = TernaryHarnessLM(model=em, batch_size=batch_size)
    t0 = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot,
                                          limit=limit, task_manager=manager, log_samples=False,
                                          bootstrap_iters=bootstrap_iters)
    except (ConnectionError, DatasetsError) as err:  # a task's data is not reachable
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise EvalError(f"cannot load the data of task(s) {', '.join(names)}: {first}; hub "
                        f"tasks need the network, tasks on local files work offline "
                        f"(--include-path DIR of YAMLs with dataset_path: json)") from err
    seconds = time.perf_counter() - t0
    if results is None:  # only on non-zero ranks, which we never are
        raise EvalError("lm-eval returned no results")
    metrics = _metrics(results)
    summary = {"source": str(source), "tasks": names, "packed": em.packed is not None,
               "limit": limit, "num_fewshot": num_fewshot, "results": results["results"],
               "metrics": metrics, "seconds": round(seconds, 3), "run_id": None,
               "model": em.description}
    if log and em.source_run is not None:
        summary["run_id"] = _log_child_run(em, names, summary, results, key)
    return summary


def _finished_eval(source_run: str, key: str) -> dict[str, Any] | None:
    """The summary of the source run's finished evaluation with this key, if it has one."""
    from ternarylm import tracking

    uri = tracking.tracking_uri()
    experiment_id = tracking.client(uri).get_run(source_run).info.experiment_id
    run = tracking.finished_run(uri, experiment_id, EVAL_KEY_TAG, key, source_run)
    if run is None:
        return None
    return {"source": source_run, "tasks": run.data.tags[EVAL_TASKS_TAG].split(","),
            "metrics": {k: v for k, v in run.data.metrics.items()
                        if k.startswith(M.EVAL_PREFIX) and k != M.EVAL_SECONDS},
            "seconds": run.data.metrics.get(M.EVAL_SECONDS), "run_id": run.info.run_id,
            "skipped": True}


def _log_child_run(em: EvalModel, names: list[str], summary: dict[str, Any],
                   results: dict[str, Any], key: str) -> str:
    """The results as a run nested under the source run (`tracking.child_run`, as GLUE's)."""
    from mlflow.entities import Metric

    from ternarylm import tracking

    uri = tracking.tracking_uri()
    c = tracking.client(uri)
    parent = c.get_run(em.source_run)
    weights = "packed" if em.packed is not None else "latent"
    run_name = (f"{parent.info.run_name or em.source_run[:8]}-eval-"
                f"{'+'.join(names)[:60]}-{weights}")
    tags = {EVAL_TASKS_TAG: ",".join(names), EVAL_SOURCE_TAG: em.source_run, EVAL_KEY_TAG: key}
    with tracking.child_run(uri, parent.info.experiment_id, run_name, tags, em.source_run,
                            f"eval {','.join(names)}") as run_id:
        params = {"eval.tasks": ",".join(names), "eval.source_run": em.source_run,
                  "eval.weights": weights, "eval.limit": summary["limit"],
                  "eval.num_fewshot": summary["num_fewshot"],
                  **{f"eval.model.{k}": v for k, v in em.description.items()},
                  **{f"eval.version.{t}": v for t, v in results.get("versions", {}).items()}}
        tracking.log_params(uri, run_id, {k: "none" if v is None else v
                                          for k, v in params.items()})
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in summary["metrics"].items()]
        metrics.append(Metric(M.EVAL_SECONDS, summary["seconds"], now, 0))
        tracking.log_metrics(uri, run_id, metrics)
        with tempfile.TemporaryDirectory() as d:
            keep = {k: results[k] for k in ("results", "versions", "n-shot", "configs",
                                            "higher_is_better", "n-samples") if k in results}
            Path(d, "results.json").write_text(json.dumps(keep, indent=1, default=str))
            tracking.log_artifact(uri, run_id, Path(d, "results.json"), "eval")
    return run_id
