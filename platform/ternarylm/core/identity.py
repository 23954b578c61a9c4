"""Content keys: what makes two steps (a trial, a GLUE fine-tune, an lm-eval run) the same.

A step's key is the hash of its full resolved identity (every setting that defines its output,
defaults included) and of the version of the code's numerics for that kind of step, as Marin's
executor keys its steps. Hashing defaults too means a default that changes changes the key of
every config that relied on it; the version covers code that changes what a step computes
under unchanged settings. Bump a kind's entry of `NUMERICS_VERSIONS` in the commit that makes
such a change (a new kernel, optimizer, initialisation or data order): every store then trains
or evaluates that kind again instead of serving results of the old code.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

NUMERICS_VERSIONS = {
    # 2: keys hash every setting (before: only settings that differed from the defaults); the
    #    absmean scale summed in double and fused AdamW (absmean micro 3.455 -> 3.370 bpb).
    "trial": 2,
    # 2: GLUE keys carry the version.
    "glue": 2,
    # 1: lm-eval runs keyed by source run, tasks and every evaluation setting.
    "eval": 1,
}


def content_key(kind: str, identity: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over `identity` and the numerics version of `kind`."""
    blob = json.dumps({"kind": kind, "numerics_version": NUMERICS_VERSIONS[kind],
                       "identity": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
