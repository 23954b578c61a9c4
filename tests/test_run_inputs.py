"""A trial's dataset inputs under concurrency: the trials of a study start together and log the
same token cache (same name and digest) into one MLflow store."""

from __future__ import annotations

import threading

from mlflow.tracking import MlflowClient

from ternarylm.training import run_inputs
from ternarylm.data import DataConfig, prepare_data

TRIALS = 4
ROUNDS = 6


def test_concurrent_trials_log_one_dataset(tmp_path, tinystories):
    """Every run gets both splits, all pointing at one dataset row per split: MLflow's
    `log_inputs` looks the dataset up, then inserts it, so trials starting together race on
    the datasets table's unique (experiment, name, digest)."""
    data = DataConfig(source=str(tinystories), tokenizer="char")
    prepared = prepare_data(data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for round_ in range(ROUNDS):  # a fresh experiment each round: a fresh race
        exp = client.create_experiment(f"race-{round_}")
        runs = [client.create_run(exp).info.run_id for _ in range(TRIALS)]
        barrier, errors = threading.Barrier(TRIALS), []

        def log(run_id: str) -> None:
            barrier.wait()
            try:
                run_inputs.log_datasets(uri, run_id, data, prepared)
            except Exception as e:  # collected: a thread's exception would not fail the test
                errors.append(f"{type(e).__name__}: {str(e)[:300]}")

        threads = [threading.Thread(target=log, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], (round_, errors)
        uuids = set()
        for run_id in runs:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            assert sorted(i.dataset.name.rsplit("/", 1)[1] for i in inputs) == [
                "train", "validation"]
            assert {i.dataset.digest for i in inputs} == {prepared.digest}
            uuids |= {(i.dataset.name, i.dataset.digest) for i in inputs}
        assert len(uuids) == 2
