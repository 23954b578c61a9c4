"""Downstream evaluation: fine-tune a pretrained trial's model on GLUE MRPC, SST-2 or CoLA.

The trained model is loaded with its precision plan (its QuantLinear modules stay, so fine-tuning
is quantization-aware exactly like pretraining) and gets a new full-precision classification head
on the pooled final hidden states (mean over the real tokens, or the last real token; padding is
ignored). Dev metrics are computed with scikit-learn and always reported beside the
majority-class baseline: the most frequent label of the TRAIN split, predicted for every dev
example. On MRPC dev that baseline already scores F1 0.812, so an F1 alone says little.

`data`: the tasks, local TSV / hub loading, encoding and metrics; `model`: pooling and
GlueClassifier; `finetuning`: GlueSettings, `finetune`, `finetune_and_log` (an MLflow run nested
under the pretraining run) and `run_glue` (which also accepts a local trained-model directory).
"""

from ternarylm.evaluation.glue.data import (
    GLUE_DIR_ENV,
    HUB_DATASET,
    N_CLASSES,
    SPLITS,
    TASKS,
    GlueData,
    GlueDataError,
    GlueError,
    GlueTask,
    encode,
    glue_file,
    glue_metrics,
    load_glue,
    majority_baseline,
    majority_label,
    pad_batch,
    read_glue_tsv,
    resolve_data_dir,
    task_spec,
    truncate_pair,
)
from ternarylm.evaluation.glue.finetuning import (
    GLUE_KEY_TAG,
    GLUE_SOURCE_TAG,
    GLUE_TASK_TAG,
    GlueResult,
    GlueSettings,
    finetune,
    finetune_and_log,
    glue_key,
    layer_formats,
    predict,
    run_glue,
)
from ternarylm.evaluation.glue.model import POOLINGS, GlueClassifier, pool

__all__ = [
    "GLUE_DIR_ENV",
    "GLUE_KEY_TAG",
    "GLUE_SOURCE_TAG",
    "GLUE_TASK_TAG",
    "HUB_DATASET",
    "N_CLASSES",
    "POOLINGS",
    "SPLITS",
    "TASKS",
    "GlueClassifier",
    "GlueData",
    "GlueDataError",
    "GlueError",
    "GlueResult",
    "GlueSettings",
    "GlueTask",
    "encode",
    "finetune",
    "finetune_and_log",
    "glue_file",
    "glue_key",
    "glue_metrics",
    "layer_formats",
    "load_glue",
    "majority_baseline",
    "majority_label",
    "pad_batch",
    "pool",
    "predict",
    "read_glue_tsv",
    "resolve_data_dir",
    "run_glue",
    "task_spec",
    "truncate_pair",
]
