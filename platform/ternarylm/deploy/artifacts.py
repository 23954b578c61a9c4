"""The trained-model artifact: what a finished trial leaves in MLflow under `model/`.

A directory with the latent weights (`model.safetensors`, fp32), the trial config and resolved
layer formats (`ternarylm.json`), the tokenizer (`tokenizer.json`) and the per-layer table
(`layers.json`). Loading rebuilds the same quantized model the trial trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ternarylm.model.stats import layer_stats
from ternarylm.config import ConfigError, TrialConfig
from ternarylm.model.transformer import ModelConfig, TernaryLM
from ternarylm.model.plans import apply_plan

CONFIG_FILE = "ternarylm.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
ARTIFACT_PATH = "model"  # where trials log it in their MLflow run


@dataclass
class TrainedModel:
    model: TernaryLM
    trial: TrialConfig
    formats: dict[str, str]
    tokenizer: Tokenizer
    eos_id: int


def save_trained(directory: str | Path, model: TernaryLM, trial: TrialConfig,
                 formats: dict[str, str], tokenizer: Tokenizer, eos_id: int) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Clones: DeepSpeed keeps parameters as views into flat buffers, which safetensors refuses.
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    meta = {"model": asdict(model.cfg), "trial": trial.to_dict(), "formats": formats,
            "eos_id": eos_id}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=str))
    tokenizer.save(str(directory / TOKENIZER_FILE))
    (directory / "layers.json").write_text(json.dumps(layer_stats(model), indent=1))
    return directory


def run_id_of(source: str | Path) -> str | None:
    """The MLflow run id `source` names, or None when it is a local path (a trained-model
    directory, a packed file): the one answer for every command that takes either."""
    return None if Path(source).exists() else str(source)


def resolve_source(source: str) -> Path:
    """A local artifact directory as is, or an MLflow run id whose `model/` is downloaded."""
    path = Path(source)
    if run_id_of(source) is None:
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"{path} is not a trained-model directory: {CONFIG_FILE} is missing")
        return path
    import mlflow

    from ternarylm import tracking

    try:
        local = mlflow.artifacts.download_artifacts(run_id=source, artifact_path=ARTIFACT_PATH,
                                                    tracking_uri=tracking.tracking_uri())
    except Exception as e:
        raise ConfigError(f"{source!r} is neither a trained-model directory nor an MLflow run "
                          f"with a `{ARTIFACT_PATH}` artifact ({str(e).splitlines()[0][:200]})"
                          ) from None
    return Path(local)


def load_trained(source: str | Path) -> TrainedModel:
    """Rebuild the trial's quantized model with its trained weights, in eval mode on the CPU."""
    from safetensors.torch import load_file

    directory = resolve_source(str(source))
    meta = json.loads((directory / CONFIG_FILE).read_text())
    trial = TrialConfig.from_dict(meta["trial"])
    cfg = ModelConfig(**meta["model"])
    model = TernaryLM(cfg)
    formats = apply_plan(model, trial.plan, trial.scheme, cfg.n_layers)
    model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=True)
    model.eval()
    tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    return TrainedModel(model, trial, formats, tokenizer, meta["eos_id"])
