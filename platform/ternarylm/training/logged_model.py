"""Every finished trial's model as an MLflow 3 logged model: a pyfunc over its packed file.

The driver logs it once the workers have left `packed/` on the run: it downloads that one file
(the packed model, a few percent of the latent weights) and logs a pyfunc model around it,
linked to the run (its Models column, the Models tab) and to the metrics at the trial's last
step. Loaded anywhere ternarylm is installed, with no network:

    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    model.predict(["Once upon a time"], params={"max_new_tokens": 40, "seed": 0})

runs `generate.generate_text` on the packed model (`inference.load_packed`). The latent
weights stay the run's `model/` artifact (for `pack`, `export`, GLUE): not copied again.
"""

from __future__ import annotations

import tempfile
from typing import Any

import mlflow
import mlflow.pyfunc
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import ternarylm
from ternarylm import tracking
from ternarylm.config import TrialConfig
from ternarylm.deploy.packing import PACKED_ARTIFACT_PATH
from ternarylm.training.train import PACKED_FILE

MODEL_TYPE = "ternarylm-packed"
SAMPLING = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 200, "top_p": 1.0, "seed": -1}
"""predict's params and their defaults (seed -1: unseeded; top_p 1: off)."""
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
    params=ParamSchema([ParamSpec(k, "long" if isinstance(v, int) else "double", v)
                        for k, v in SAMPLING.items()]))


class PackedTextModel(mlflow.pyfunc.PythonModel):
    """Text in, the prompt and its continuation out, one string per prompt."""

    # MLflow's own switch off type-hint validation (it warns at class definition of a predict
    # without hints): the signature is given when the model is logged (SIGNATURE).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from ternarylm.deploy.inference import load_packed

        self.packed = load_packed(context.artifacts["packed"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from ternarylm.deploy.generate import generate_text

        # A list of strings arrives as a one-column DataFrame (the signature's input).
        prompts = (list(model_input.iloc[:, 0]) if hasattr(model_input, "columns")
                   else list(model_input))
        p = SAMPLING | (params or {})
        sampling = {"temperature": float(p["temperature"]), "top_k": int(p["top_k"]) or None,
                    "top_p": float(p["top_p"]) if p["top_p"] < 1 else None,
                    "seed": int(p["seed"]) if p["seed"] >= 0 else None}
        return [str(prompt) + generate_text(self.packed, str(prompt), int(p["max_new_tokens"]),
                                            **sampling) for prompt in prompts]


def find_model(uri: str, run_id: str) -> Any | None:
    """The run's READY logged model, if it has one."""
    c = tracking.client(uri)
    run = c.get_run(run_id)
    found = c.search_logged_models([run.info.experiment_id],
                                   filter_string=f"source_run_id = '{run_id}'")
    return next((m for m in found if m.status == LoggedModelStatus.READY), None)


def log_trial_model(uri: str, run_id: str, cfg: TrialConfig) -> str:
    """Log the run's packed file as its logged model (once); returns the model id."""
    existing = find_model(uri, run_id)
    if existing is not None:
        return existing.model_id
    c = tracking.client(uri)
    run = c.get_run(run_id)
    # Created here, in the run's experiment (Model.log would use the process's active one).
    model = c.create_logged_model(
        run.info.experiment_id, name=cfg.run_name, source_run_id=run_id,
        params=run.data.params, model_type=MODEL_TYPE,
        tags={tracking.TRIAL_KEY_TAG: cfg.key(), "ternarylm.size": cfg.size,
              "ternarylm.scheme": cfg.scheme, "ternarylm.plan": cfg.plan.name})
    with tempfile.TemporaryDirectory() as d:
        packed = c.download_artifacts(run_id, f"{PACKED_ARTIFACT_PATH}/{PACKED_FILE}", d)
        with tracking.global_uri(uri):  # Model.log resolves the store from it
            info = Model.log(
                artifact_path=None, flavor=mlflow.pyfunc, run_id=run_id,
                model_id=model.model_id, step=cfg.train.steps, python_model=PackedTextModel(),
                artifacts={"packed": packed}, signature=SIGNATURE,
                # Given, not inferred: inference loads the model in a subprocess (seconds).
                pip_requirements=[f"ternarylm=={ternarylm.__version__}",
                                  f"torch=={torch.__version__.split('+')[0]}",
                                  f"mlflow=={mlflow.__version__}"])
    return info.model_id
