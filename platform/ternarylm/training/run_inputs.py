"""What a trial trained on, as its MLflow run's dataset inputs: one per split of the token cache.

Each input names the cache (source stem and tokenizer), carries the cache's digest
(`PreparedData.digest`, the hash of everything that changes its tokens), where the text came
from (a local file or a hub dataset), and a profile of the split (tokens, documents, bytes,
vocabulary), so that the UI's Dataset column and dataset pages say which data a trial saw.
"""

from __future__ import annotations

import json

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from ternarylm import tracking
from ternarylm.data import SPLITS, DataConfig, PreparedData
from ternarylm.data.cache import META_FILE
from ternarylm.data.sources import is_local, local_file

_SCHEMA = json.dumps({"mlflow_colspec": [{"type": "long", "name": "token_id"}]})


def _source(source: str, split: str) -> tuple[str, str]:
    """(source type, source JSON) as MLflow's dataset sources write them."""
    if is_local(source):
        return "local", json.dumps({"uri": local_file(source).resolve().as_uri()})
    return "hugging_face", json.dumps({"path": source, "split": split})


def dataset_inputs(data: DataConfig, prepared: PreparedData) -> list[DatasetInput]:
    """The train and validation splits of the trial's token cache as dataset inputs."""
    meta = json.loads((prepared.path / META_FILE).read_text())
    name = prepared.path.name.rsplit("-", 1)[0]
    inputs = []
    for split in SPLITS:
        source = data.val_source if split == "validation" and data.val_source else data.source
        source_type, source_json = _source(source, split)
        profile = {**meta["splits"][split], "split": split, "tokenizer": data.tokenizer,
                   "vocab_size": prepared.vocab_size, "cache": str(prepared.path)}
        dataset = Dataset(name=f"{name}/{split}", digest=prepared.digest,
                          source_type=source_type, source=source_json, schema=_SCHEMA,
                          profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    return inputs


def log_datasets(uri: str, run_id: str, data: DataConfig, prepared: PreparedData) -> None:
    """Log the data as the run's dataset inputs (a trial's, or its study's parent run's), once:
    a resumed run already has them.

    MLflow's `log_inputs` looks each dataset up in the run's experiment and inserts the missing
    ones in one transaction, so trials that start together all miss a dataset and all but one
    fail on the datasets table's unique (experiment, name, digest), their transaction rolled
    back. Each such failure means another run has just inserted one of these datasets: trying
    again (at most once per dataset) finds it and only links it to this run.
    """
    inputs = dataset_inputs(data, prepared)
    for retries_left in range(len(inputs), -1, -1):
        run = tracking.client(uri).get_run(run_id)
        logged = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
        new = [i for i in inputs if (i.dataset.name, i.dataset.digest) not in logged]
        if not new:
            return
        try:
            tracking.client(uri).log_inputs(run_id, datasets=new)
            return
        except MlflowException:
            if not retries_left:
                raise
