"""Sensitivity-guided plans: the bit budget is met exactly, the block made more sensitive gets
the high format, and the plan file loads back as the same plan."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ternarylm.orchestration.allocate import AllocateError, allocate, choose_blocks, loss_scores, write_plan
from ternarylm.deploy.artifacts import load_trained, save_trained
from ternarylm.cli import main
from ternarylm.config import TrialConfig
from ternarylm.data import prepare_data
from ternarylm.model.transformer import TernaryLM
from ternarylm.model.plans import PrecisionPlan, apply_plan
from ternarylm.model.quantizers import format_bits

TOKENS = 4096  # validation tokens per evaluation: enough to rank 4 blocks, fast on a CPU


def make_pilot(directory: Path, corpus: Path, plan: str = "all_ternary",
               edit: Callable[[TernaryLM], None] | None = None, scheme: str = "absmean") -> Path:
    """A trained-model directory as a trial leaves it, with a constructed (untrained) model."""
    trial = TrialConfig.from_dict({"size": "pico", "plan": plan, "scheme": scheme, "seq_len": 64,
                                   "data": {"source": str(corpus), "tokenizer": "char"}})
    data = prepare_data(trial.data)
    torch.manual_seed(0)
    model = TernaryLM(trial.model_config(data.vocab_size))
    if edit is not None:
        with torch.no_grad():
            edit(model)
    formats = apply_plan(model, trial.plan, trial.scheme, model.cfg.n_layers)
    return save_trained(directory, model, trial, formats, data.tokenizer(), data.eos_id)


def scale_block(block: int, factor: float) -> Callable[[TernaryLM], None]:
    """Multiply one block's linear weights: its quantization error then weighs most."""
    def edit(model: TernaryLM) -> None:
        for p in model.blocks[block].parameters():
            if p.ndim == 2:
                p.mul_(factor)
    return edit


def dense_block(block: int) -> Callable[[TernaryLM], None]:
    """Give one block weights of equal magnitude: absmean ternary codes then have no zeros."""
    def edit(model: TernaryLM) -> None:
        for p in model.blocks[block].parameters():
            if p.ndim == 2:
                p.copy_(0.02 * torch.sign(p))
    return edit


@pytest.fixture(scope="module")
def pilot(tinystories, tmp_path_factory) -> Path:
    return make_pilot(tmp_path_factory.mktemp("pilot"), tinystories, edit=scale_block(2, 20.0))


def block_average_bits(plan: PrecisionPlan, source: Path) -> float:
    """Parameter-weighted storage bits of the block linears, from the plan's resolved formats."""
    trained = load_trained(source)
    table = trained.model.cfg.layer_table()
    formats = plan.resolve(table, trained.model.cfg.n_layers, trained.trial.scheme)
    weights = {s.name: s.numel for s in table if s.kind == "linear" and s.block is not None}
    return sum(format_bits(formats[n]) * w for n, w in weights.items()) / sum(weights.values())


def test_loss_signal_prefers_the_sensitive_block(pilot: Path, one_torch_thread):
    a = allocate(pilot, 3.5, max_tokens=TOKENS)  # int8 (8 bits) on 1 of 4 ternary (2) blocks
    assert max(a.scores, key=a.scores.get) == 2
    assert a.plan.blocks == {0: "ternary", 1: "ternary", 2: "int8", 3: "ternary"}
    assert a.average_bits == 3.5 and block_average_bits(a.plan, pilot) == 3.5
    assert a.base_loss is not None and a.scores[2] > 0
    # the pilot's embedding, head and activation bits are kept
    assert (a.plan.embedding, a.plan.head, a.plan.activation_bits) == ("fp", "fp", 8)


def test_loss_scores_leave_the_model_as_loaded(pilot: Path, one_torch_thread):
    trained = load_trained(pilot)
    before = {n: m.weight_quantizer for n, m in trained.model.named_modules()
              if hasattr(m, "weight_quantizer")}
    loss_scores(trained, "int8", "ternary", max_tokens=1024)
    after = {n: m.weight_quantizer for n, m in trained.model.named_modules()
             if hasattr(m, "weight_quantizer")}
    assert all(after[n] is q for n, q in before.items())


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_every_reachable_budget_is_met_exactly(k: int):
    scores = {0: 0.1, 1: 0.4, 2: 0.3, 3: 0.2}
    params = dict.fromkeys(scores, 12256)
    budget = 2 + k * (8 - 2) / 4
    chosen = choose_blocks(scores, params, budget, 8, 2)
    assert chosen == sorted(sorted(scores, key=scores.get, reverse=True)[:k])
    assert (8 * k + 2 * (4 - k)) / 4 == budget


def test_unreachable_budget_takes_the_largest_below():
    scores = {0: 0.1, 1: 0.4, 2: 0.3, 3: 0.2}
    params = dict.fromkeys(scores, 100)
    assert choose_blocks(scores, params, 4.9, 8, 2) == [1]  # 3.5 <= 4.9 < 5.0
    assert choose_blocks(scores, params, 5.0, 8, 2) == [1, 2]
    # unequal blocks: the most sensitive one does not fit, a smaller one does
    assert choose_blocks({0: 1.0, 1: 0.5}, {0: 300, 1: 100}, 3.5, 8, 2) == [1]


@pytest.mark.parametrize("budget, message", [
    (1.5, "--budget-bits 1.5 is outside [2, 8]"),
    (9, "--budget-bits 9 is outside [2, 8]"),
])
def test_budget_outside_the_formats_is_refused(budget, message):
    with pytest.raises(AllocateError, match=message.replace("[", r"\[").replace("]", r"\]")):
        choose_blocks({0: 1.0}, {0: 10}, budget, 8, 2)
    with pytest.raises(AllocateError, match="must have more bits"):
        choose_blocks({0: 1.0}, {0: 10}, 4, 2, 8)


def test_sparsity_signal_prefers_the_densest_block(tinystories, tmp_path: Path, one_torch_thread):
    source = make_pilot(tmp_path / "pilot", tinystories, edit=dense_block(1))
    a = allocate(source, 3.5, signal="sparsity")
    assert a.scores[1] == pytest.approx(1.0) and a.base_loss is None
    assert a.plan.blocks[1] == "int8" and list(a.plan.blocks.values()).count("int8") == 1


def test_int4_high_format_and_learned_scheme(tinystories, tmp_path: Path, one_torch_thread):
    source = make_pilot(tmp_path / "pilot", tinystories, scheme="learned",
                        edit=scale_block(2, 20.0))
    a = allocate(source, 3.0, high="int4", max_tokens=TOKENS)  # (4 - 2) * 2 / 4 = 1: 2 blocks
    assert a.average_bits == 3.0 and block_average_bits(a.plan, source) == 3.0
    assert a.plan.blocks[2] == "int4" and list(a.plan.blocks.values()).count("int4") == 2


def test_fp_pilot_is_refused(tinystories, tmp_path: Path, one_torch_thread):
    source = make_pilot(tmp_path / "pilot", tinystories, plan="fp")
    with pytest.raises(AllocateError, match="keeps blocks.0.attn.q in floating point"):
        allocate(source, 3.5, max_tokens=TOKENS)


def test_plan_file_round_trip(pilot: Path, tmp_path: Path, one_torch_thread):
    a = allocate(pilot, 3.5, signal="loss", max_tokens=TOKENS, name="mine")
    path = write_plan(a, tmp_path / "plan.yaml")
    assert "# block 2: score" in path.read_text()
    assert PrecisionPlan.from_config({"file": str(path)}) == a.plan
    assert PrecisionPlan.from_config(str(path)).name == "mine"


def test_cli_allocate(pilot: Path, tmp_path: Path, capsys, one_torch_thread):
    out = tmp_path / "plan.yaml"
    assert main(["allocate", str(pilot), "--budget-bits", "3.5", "--max-tokens", str(TOKENS),
                 "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["average_bits"] == 3.5 and result["plan"]["blocks"]["2"] == "int8"
    assert PrecisionPlan.from_config({"file": str(out)}).blocks[2] == "int8"


@pytest.mark.parametrize("argv, message", [
    (["--budget-bits", "1"], "--budget-bits 1 is outside [2, 8]"),
    (["--budget-bits", "4", "--high", "int16"], "unknown format 'int16'"),
    (["--budget-bits", "4", "--high", "fp"], "fp has none"),
    (["--budget-bits", "4", "--out", "/dev/null/plan.yaml"], "cannot write the plan"),
])
def test_cli_allocate_refuses(pilot: Path, tmp_path: Path, capsys, monkeypatch, argv, message, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    assert main(["allocate", str(pilot), "--max-tokens", "512", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing half made
