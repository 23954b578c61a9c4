"""Cohorts: trials of one shape trained together, stacked on a leading axis.

The exactness tests compare a cohort member with the same trial trained alone through the
solo path (`train.build_engine`: its model in a DeepSpeed engine with torch's fused AdamW and
DeepSpeed's gradient clipping)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ternarylm.config import TrialConfig
from ternarylm.data import WindowSampler, eval_batches, prepare_data
from ternarylm.member_optim import MemberAdamW
from ternarylm.stacked import StackedLM, member_batches, member_losses
from ternarylm.train import build_engine, build_model

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # after the stdlib
from train_step import init_single_process_group  # noqa: E402

STEPS = 30


def member(corpus: Path, seed: int, scheme: str, plan: str, **train) -> TrialConfig:
    return TrialConfig.from_dict({
        "size": "pico", "scheme": scheme, "plan": plan, "seed": seed, "seq_len": 32,
        "data": {"source": str(corpus), "tokenizer": "char"},
        # grad_clip 0.05: below every member's gradient norm, so clipping acts at every step.
        "train": {"steps": STEPS, "micro_batch": 4, "warmup_steps": 3, "grad_clip": 0.05,
                  "zero_stage": 0, "precision": "fp32", **train}})


@pytest.fixture
def cohort(tinystories) -> list[TrialConfig]:
    """fp, absmean, learned and an int plan (int8 boundary blocks), each with its own seed,
    learning rate, schedule, weight decay, betas and label smoothing."""
    return [
        member(tinystories, 0, "absmean", "fp", lr=3e-3),
        member(tinystories, 1, "absmean", "all_ternary", lr=5e-3, weight_decay=0.1,
               betas=[0.8, 0.95], label_smoothing=0.1),
        member(tinystories, 2, "learned", "all_ternary", lr=4e-3, schedule="wsd"),
        member(tinystories, 3, "absmean", "boundary_int8", lr=2e-3, schedule="two_stage",
               warmup_steps=2),
    ]


def val_loss(forward, tokens, seq_len: int) -> torch.Tensor:
    """Mean validation loss [M] (or [1]) of a forward from [B, T] ids to [M, B, T, V]."""
    sums, count = 0.0, 0
    for x, y in eval_batches(tokens, seq_len, 8, max_tokens=2048):
        logits = forward(x)
        sums = sums + member_losses(logits, y.expand(logits.shape[0], *y.shape)) * y.numel()
        count += y.numel()
    return sums / count


@torch.no_grad()
def solo_val_loss(trial: TrialConfig, data) -> float:
    """The trial trained alone, as a worker trains it (its DeepSpeed engine, one rank)."""
    init_single_process_group()
    engine, _ = build_engine(trial, data.vocab_size, torch.device("cpu"), False)
    sampler = WindowSampler(data.tokens("train"), trial.seq_len, trial.train.micro_batch, 0,
                            1, trial.seed)
    with torch.enable_grad():
        for step in range(STEPS):
            x, y = sampler.batch(step, 0)
            loss = F.cross_entropy(engine(x).flatten(0, 1).float(), y.flatten(),
                                   label_smoothing=trial.train.label_smoothing)
            engine.backward(loss)
            engine.step()
    engine.eval()
    return float(val_loss(lambda x: engine(x)[None], data.tokens("validation"),
                          trial.seq_len)[0])


def test_member_starts_from_the_solo_weights_and_batches(cohort, one_torch_thread):
    data = prepare_data(cohort[0].data)
    stacked = StackedLM(cohort, data.vocab_size)
    samplers = [WindowSampler(data.tokens("train"), t.seq_len, t.train.micro_batch, 0, 1,
                              t.seed) for t in cohort]
    x, _ = member_batches(samplers, 5, 0)
    for m, trial in enumerate(cohort):
        solo, formats = build_model(trial, data.vocab_size)
        assert formats == stacked.formats[m]
        expected = solo.state_dict()
        got = stacked.member_model(m).state_dict()
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), (m, name)
        solo_x, _ = samplers[m].batch(5, 0)
        assert torch.equal(x[m], solo_x)
        # The stacked forward gives member m the logits its own model gives.
        with torch.no_grad():
            assert torch.allclose(stacked(x)[m], solo(x[m]), rtol=1e-4, atol=1e-5), m


def test_member_trains_as_the_solo_trial(cohort, one_torch_thread):
    """After 30 steps with clipping active, each member's validation loss is the solo trial's
    within 0.2% relative."""
    data = prepare_data(cohort[0].data)
    stacked = StackedLM(cohort, data.vocab_size)
    optimizer = MemberAdamW(stacked, [t.train for t in cohort])
    samplers = [WindowSampler(data.tokens("train"), t.seq_len, t.train.micro_batch, 0, 1,
                              t.seed) for t in cohort]
    smoothing = [t.train.label_smoothing for t in cohort]
    clipped = []
    for step in range(STEPS):
        x, y = member_batches(samplers, step, 0)
        member_losses(stacked(x), y, smoothing).sum().backward()
        clipped.append(bool((optimizer.grad_norms() > 0.05).all()))
        optimizer.step()
        optimizer.zero_grad()
    assert all(clipped)
    stacked.eval()
    with torch.no_grad():
        cohort_loss = val_loss(lambda x: stacked(x.expand(len(cohort), *x.shape)),
                               data.tokens("validation"), cohort[0].seq_len)
    for m, trial in enumerate(cohort):
        solo = solo_val_loss(trial, data)
        print(f"member {m} {trial.scheme}/{trial.plan.name}: cohort {float(cohort_loss[m]):.6f} "
              f"solo {solo:.6f} rel {abs(float(cohort_loss[m]) - solo) / solo:.2e}")
        assert abs(float(cohort_loss[m]) - solo) / solo < 2e-3, m
