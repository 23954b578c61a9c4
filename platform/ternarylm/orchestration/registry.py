"""`ternarylm register STUDY`: a study's best models as versions of one registered model.

One version per cell (size, scheme, plan: its trial with the lowest final val bits per byte,
over seeds), or with `per="frontier"` one per point of the memory-quality frontier
(`frontier.frontier_points`). Each version is the trial's logged model (`logged_model`), tagged
with its cell, trial key and final metrics. A version is identified by its source run: a rerun
registers only models that have no version yet.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from ternarylm.analysis import frontier

from ternarylm.training import logged_model

from ternarylm import tracking
from ternarylm.core import metrics as M
from ternarylm.core.errors import UserError
from ternarylm.orchestration.lr_search import SEARCH_TAG
from ternarylm.orchestration.study import STUDY_TAG

PER = ("cell", "frontier")
TAGGED_METRICS = (M.VAL_BPB, M.VAL_LOSS, M.VAL_PPL, M.PACKED_BYTES, M.SPARSITY)


class RegisterError(UserError):
    """A study that cannot be registered; the message says why."""


def _row(run) -> dict[str, Any]:
    """A finished trial as a frontier row (the columns `frontier` reads)."""
    finals, tags = M.finals(run.data.metrics), run.data.tags
    return {"run": run, "status": run.info.status, "search": SEARCH_TAG in tags,
            "size": tags.get("ternarylm.size"), "scheme": tags.get("ternarylm.scheme"),
            "plan": tags.get("ternarylm.plan"), "seed": int(run.data.params.get("seed", 0)),
            "val_bpb": finals.get(M.VAL_BPB), "packed_bytes": finals.get(M.PACKED_BYTES)}


def study_rows(uri: str, experiment: str, study: str) -> list[dict[str, Any]]:
    """The study's finished trials (not its lr-search trials) with a bpb and a packed size."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    parent = exp and tracking.find_run(uri, exp.experiment_id, STUDY_TAG, study)
    if not parent:
        raise RegisterError(f"no study {study!r} in MLflow experiment {experiment!r} at {uri}; "
                            f"run it first (studies/scaling.py) or check --experiment")
    runs = c.search_runs([exp.experiment_id],
                         f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}' "
                         f"and attributes.status = 'FINISHED'", max_results=10000)
    rows = frontier.candidates([_row(r) for r in runs])
    if not rows:
        raise RegisterError(f"study {study!r} has no finished trials to register; "
                            f"run or finish it first")
    return rows


def chosen(rows: list[dict[str, Any]], per: str) -> dict[str, dict[str, Any]]:
    """{label: row}: the best trial of each cell, or each frontier point."""
    if per == "frontier":
        return {f"{r['size']}/{r['scheme']}/{r['plan']}/s{r['seed']}": r
                for r in frontier.frontier_points(rows)}
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        label = f"{r['size']}/{r['scheme']}/{r['plan']}"
        if label not in best or r["val_bpb"] < best[label]["val_bpb"]:
            best[label] = r
    return dict(sorted(best.items()))


def _link_version(c: MlflowClient, model_id: str, name: str, version: str) -> None:
    """List the version on its logged model (`mlflow.modelVersions`, the Models tab's
    registered-versions column) as `mlflow.register_model` and the server do; a direct SQL
    client's `create_model_version` does not."""
    entry = {"name": name, "version": str(version)}
    tags = c.get_logged_model(model_id).tags  # the server may have just listed it
    linked = json.loads(tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if entry not in linked:
        c.set_logged_model_tags(model_id,
                                {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})


def register_study(study: str, name: str | None = None, per: str = "cell",
                   experiment: str = "ternarylm", uri: str | None = None) -> dict[str, Any]:
    """Register the study's chosen models under `name` (default ternarylm-STUDY); returns the
    model's name and one entry per chosen trial (its version, and whether it is new)."""
    if per not in PER:
        raise RegisterError(f"--per must be one of {', '.join(PER)}, got {per!r}")
    uri = uri or tracking.tracking_uri()
    tracking.check_tracking(uri)
    picks = chosen(study_rows(uri, experiment, study), per)
    models = {label: logged_model.find_model(uri, r["run"].info.run_id)
              for label, r in picks.items()}
    missing = [label for label, m in models.items() if m is None]
    if missing:  # trials finished before models were logged
        raise RegisterError(f"study {study!r}: no logged model for {', '.join(missing)}; "
                            f"rerun the study to log them")
    name = name or f"ternarylm-{study}"
    c = tracking.client(uri)
    if not c.search_registered_models(f"name = '{name}'"):
        c.create_registered_model(name, tags={STUDY_TAG: study},
                                  description=f"Best models of the ternarylm study {study}")
    versions = {v.run_id: v for v in c.search_model_versions(f"name = '{name}'")}
    out = []
    for label, r in picks.items():
        run, model = r["run"], models[label]
        version, new = versions.get(run.info.run_id), False
        if version is None:
            finals = M.finals(run.data.metrics)
            tags = {"ternarylm.cell": label, tracking.TRIAL_KEY_TAG:
                    run.data.tags.get(tracking.TRIAL_KEY_TAG, ""), STUDY_TAG: study,
                    **{M.final(k): finals[k] for k in TAGGED_METRICS if k in finals}}
            with tracking.global_uri(uri):  # the store resolves the source through it
                version = c.create_model_version(name, f"models:/{model.model_id}",
                                                 run_id=run.info.run_id, tags=tags,
                                                 model_id=model.model_id)
            new = True
        _link_version(c, model.model_id, name, version.version)
        out.append({"cell": label, "run_id": run.info.run_id, "model_id": model.model_id,
                    "version": int(version.version), "new": new,
                    "val_bpb": r["val_bpb"], "packed_bytes": r["packed_bytes"]})
    return {"registered_model": name, "per": per, "versions": out}
