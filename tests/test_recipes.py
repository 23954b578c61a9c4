"""Recipes: the BitNet block against transformers' BitNet, the optimiser groups and schedules
(learning rate and weight decay at the two-stage boundary), and a tiny model of every recipe
training on real text."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from ternarylm.config import ConfigError, TrainConfig, TrialConfig
from ternarylm.model.transformer import BLOCKS, ModelConfig, TernaryLM, model_config
from ternarylm.training.optim import (
    TrainSchedule,
    linear_warmup_decay,
    lr_factor,
    param_groups,
    weight_decay_at,
)
from ternarylm.model.plans import PrecisionPlan, apply_plan
from ternarylm.model.quantizers import TERNARY_SCHEMES
from ternarylm.model.recipes import RECIPES, RecipeError, recipe, recipe_overrides

# --- the BitNet block against transformers -----------------------------------------------------


def hf_name(ours: str) -> str:
    """Our parameter name -> transformers' BitNetForCausalLM name."""
    table = {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
             "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
             "attn.sub_norm": "self_attn.attn_sub_norm", "mlp.gate": "mlp.gate_proj",
             "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj",
             "mlp.sub_norm": "mlp.ffn_sub_norm"}
    module = ours.removesuffix(".weight")
    if module in table:
        return f"{table[module]}.weight"
    _, i, rest = module.split(".", 2)
    return f"model.layers.{i}.{table[rest]}.weight"


def hf_bitnet(cfg: ModelConfig):
    from transformers import BitNetConfig, BitNetForCausalLM

    hf_cfg = BitNetConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.seq_len,
        rms_norm_eps=1e-6, rope_theta=cfg.rope_base, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    return BitNetForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize("width, layers, heads", [(64, 2, 4), (96, 3, 6)])
def test_bitnet_block_shapes_and_count_match_transformers(width, layers, heads):
    pytest.importorskip("transformers")
    cfg = ModelConfig(width=width, n_layers=layers, n_heads=heads, vocab_size=97, seq_len=16,
                      block="bitnet")
    ours = dict(TernaryLM(cfg).named_parameters())
    theirs = dict(hf_bitnet(cfg).named_parameters())
    assert {hf_name(n): tuple(p.shape) for n, p in ours.items()} == {
        n: tuple(p.shape) for n, p in theirs.items()}
    total = sum(p.numel() for p in theirs.values())
    assert cfg.param_counts()["params_total"] == total == sum(p.numel() for p in ours.values())
    # the Llama block of the same dimensions lacks the sub-norms: width + hidden per block
    llama = dataclasses.replace(cfg, block="llama").param_counts()["params_total"]
    assert total - llama == layers * (width + cfg.mlp_hidden)


def test_bitnet_block_computes_what_transformers_computes():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig(width=64, n_layers=2, n_heads=4, vocab_size=97, seq_len=16, block="bitnet")
    ours = TernaryLM(cfg).eval()
    with torch.no_grad():  # norm gains away from 1, so a misplaced norm shows
        for name, p in ours.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    theirs = hf_bitnet(cfg)
    theirs.load_state_dict({hf_name(n): p for n, p in ours.state_dict().items()
                            if not n.startswith("rope_")})
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        expected = theirs(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the llama block with the same weights (minus sub-norms) does not
    llama = TernaryLM(dataclasses.replace(cfg, block="llama")).eval()
    llama.load_state_dict({n: p for n, p in ours.state_dict().items() if "sub_norm" not in n})
    with torch.no_grad():
        assert not torch.allclose(llama(idx), expected, atol=1e-3)


def test_unknown_block_is_refused():
    from ternarylm.model.transformer import ModelConfigError

    with pytest.raises(ModelConfigError, match="unknown block 'gpt2'; choose one of llama, bitnet"):
        ModelConfig(block="gpt2")


# --- parameter groups --------------------------------------------------------------------------

def test_param_groups_decay_matrices_only():
    cfg = model_config("pico", vocab_size=50, seq_len=8, block="bitnet")
    model = TernaryLM(cfg)
    apply_plan(model, PrecisionPlan.from_config("all_ternary"), "paretoq", cfg.n_layers)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    # every matrix, and only matrices: embedding, head and the 7 linears of each block
    assert decayed == {n for n, p in model.named_parameters()
                       if p.ndim == 2 and "weight_quantizer" not in n}
    assert len(decayed) == 2 + 7 * cfg.n_layers
    # norms (4 per BitNet block) and ParetoQ's per-row scales ([rows, 1] but not decayed)
    kept = {names[id(p)] for p in no_decay["params"]}
    assert sum(n.endswith("weight_quantizer.scale") for n in kept) == 7 * cfg.n_layers
    assert sum("norm" in n for n in kept) == 4 * cfg.n_layers + 1


# --- schedules ---------------------------------------------------------------------------------

def two_stage(**fields) -> TrainConfig:
    base = dict(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, schedule="two_stage",
                weight_decay=0.1)
    return TrainConfig(**{**base, **fields})


def drive(t: TrainConfig, steps: int) -> list[tuple[float, float]]:
    """(lr, weight decay of the decaying group) the optimizer uses at each step 0..steps-1."""
    w = nn.Parameter(torch.ones(3, 3))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": t.weight_decay}], lr=t.lr)
    schedule = TrainSchedule(opt, t)
    seen = []
    for _ in range(steps):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]))
        opt.step()
        schedule.step()
    return seen


def cosine(t: TrainConfig, step: int) -> float:
    """The cosine curve by hand: min + (1 - min) (1 + cos(pi (s - W) / (S - W))) / 2."""
    progress = (step - t.warmup_steps) / (t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def test_two_stage_lr_and_weight_decay_at_the_boundary():
    t = two_stage()
    seen = drive(t, 100)
    # stage 2 starts at step int(0.5 * 100) = 50
    lr49, wd49 = seen[49]
    lr50, wd50 = seen[50]
    assert lr49 == pytest.approx(1e-3 * cosine(t, 49))
    assert lr50 == pytest.approx(1e-3 * cosine(t, 50) * 2 / 3)
    # an abrupt drop: cos(49) and cos(50) differ by < 3 %, the LR by a third
    assert lr50 / lr49 == pytest.approx(2 / 3, rel=0.03)
    assert (wd49, wd50) == (0.1, 0.0)
    assert all(wd == 0.1 for _, wd in seen[:50]) and all(wd == 0.0 for _, wd in seen[50:])
    # warmup: (s + 1) / 10
    assert seen[0][0] == pytest.approx(1e-4) and seen[9][0] == pytest.approx(1e-3)
    # last step: the stage-2 curve near 2/3 of min_lr
    assert seen[99][0] == pytest.approx(1e-3 * cosine(t, 99) * 2 / 3)
    assert [lr for lr, _ in seen] == pytest.approx([1e-3 * lr_factor(t, s) for s in range(100)])


def test_weight_decay_boundary_of_its_own():
    # TriLM: LR drops at 1/2, weight decay goes at 2/3 (step int(2/3 * 90) = 60)
    t = two_stage(steps=90, weight_decay_stage2_at=2 / 3, stage2_weight_decay=0.0)
    seen = drive(t, 90)
    assert seen[44][0] > seen[45][0] * 1.4  # the LR drop at step 45
    assert [wd for _, wd in seen[44:47]] == [0.1, 0.1, 0.1]
    assert (seen[59][1], seen[60][1]) == (0.1, 0.0)
    assert weight_decay_at(t, 59) == 0.1 and weight_decay_at(t, 60) == 0.0


def test_the_optimizer_applies_the_scheduled_weight_decay():
    # With a zero gradient AdamW's step is pure decoupled decay: w <- w (1 - lr * wd).
    t = two_stage(steps=20, warmup_steps=2, stage2_at=0.5)
    w = nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": t.weight_decay}], lr=t.lr)
    schedule = TrainSchedule(opt, t)
    for step in range(20):
        before = w.detach().clone()
        w.grad = torch.zeros_like(w)
        opt.step()
        schedule.step()
        expected = before * (1 - t.lr * lr_factor(t, step) * weight_decay_at(t, step))
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)
        assert torch.equal(w.detach(), before) == (step >= 10)


def test_non_decaying_groups_stay_at_zero_and_resume_restores_the_schedule():
    t = two_stage(steps=40, warmup_steps=4)
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1},
                             {"params": [b], "weight_decay": 0.0}], lr=t.lr)
    schedule = TrainSchedule(opt, t)
    for _ in range(25):
        opt.step()
        schedule.step()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    state = torch.load(_saved(schedule.state_dict()), weights_only=True)  # plain data only
    # a restarted worker: fresh optimizer and schedule, then the checkpointed state
    opt2 = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1},
                              {"params": [b], "weight_decay": 0.0}], lr=t.lr)
    schedule2 = TrainSchedule(opt2, t)
    assert opt2.param_groups[0]["weight_decay"] == 0.1  # a fresh schedule starts in stage 1
    schedule2.load_state_dict(state)
    assert opt2.param_groups[0]["weight_decay"] == 0.0  # step 25 is in stage 2
    opt2.step()
    schedule2.step()
    opt.step()
    schedule.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(
        t.lr * lr_factor(t, 26))
    assert opt2.param_groups[0]["weight_decay"] == 0.0


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_cosine_and_wsd_schedules_keep_their_weight_decay():
    for schedule in ("cosine", "wsd"):
        t = TrainConfig(steps=50, warmup_steps=5, schedule=schedule, weight_decay=0.05)
        assert {wd for _, wd in drive(t, 50)} == {0.05}
    t = TrainConfig(steps=50, warmup_steps=5, schedule="wsd", decay_fraction=0.2,
                    min_lr_ratio=0.1)
    # stable until step 40, then linear to min: step 45 is half way -> 1 - 0.9 * 0.5
    assert lr_factor(t, 39) == 1.0 and lr_factor(t, 45) == pytest.approx(0.55)


def test_linear_warmup_decay_hand_values():
    # warmup 4 of 20: (s + 1) / 5 during warmup, then (20 - s) / 16
    assert [linear_warmup_decay(s, 4, 20) for s in (0, 3, 4, 12, 20, 25)] == pytest.approx(
        [0.2, 0.8, 1.0, 0.5, 0.0, 0.0])


@pytest.mark.parametrize("fields, message", [
    ({"schedule": "step"}, "train.schedule must be 'cosine', 'wsd' or 'two_stage'"),
    ({"schedule": "two_stage", "stage2_at": 1.0}, r"train.stage2_at must be a fraction of "
                                                  r"steps in \(0, 1\), got 1.0"),
    ({"weight_decay_stage2_at": 0.0}, r"train.weight_decay_stage2_at must be a fraction"),
    ({"stage2_lr_ratio": 1.5}, r"train.stage2_lr_ratio must be in \(0, 1\], got 1.5"),
    ({"stage2_weight_decay": -0.1}, "must be >= 0"),
    ({"schedule": "two_stage", "stage2_at": 0.05, "warmup_steps": 20},
     "starts stage 2 at step 10, inside the 20 warmup steps"),
])
def test_schedule_settings_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message) as e:
        TrainConfig(**{"steps": 200, **fields})
    assert "\n" not in str(e.value)


# --- recipes -----------------------------------------------------------------------------------

def test_every_recipe_is_a_valid_block_scheme_plan_and_training():
    for name, r in RECIPES.items():
        assert r.name == name and r.block in BLOCKS and r.scheme in TERNARY_SCHEMES
        PrecisionPlan.from_config(r.plan)
        TrainConfig(steps=100, warmup_steps=10, **r.train)
        assert not {"steps", "lr", "warmup_steps"} & set(r.train)
    assert recipe("bitnet_b158").block == "bitnet"
    assert PrecisionPlan.from_config(recipe("bitnet_b158").plan).activation_bits == 8
    assert PrecisionPlan.from_config(recipe("trilm").plan).activation_bits is None
    known = ", ".join(RECIPES)
    with pytest.raises(RecipeError, match=f"unknown recipe 'bitnet'; recipes: {known}"):
        recipe_overrides("bitnet")


def test_recipe_overrides_are_fresh_copies():
    a = recipe_overrides("trilm")
    a["train"]["weight_decay"] = 9.0
    a["plan"]["activation_bits"] = 4
    assert recipe_overrides("trilm")["train"]["weight_decay"] == 0.1
    assert recipe_overrides("trilm")["plan"]["activation_bits"] is None


def test_recipe_overrides_build_a_trial_config():
    if "block" not in {f.name for f in dataclasses.fields(TrialConfig)}:
        pytest.skip("TrialConfig has no `block` field yet (to be added beside `size`)")
    for name in RECIPES:
        o = recipe_overrides(name)
        trial = TrialConfig.from_dict({**o, "size": "tiny", "train": {
            "steps": 100, "warmup_steps": 10, **o["train"]}})
        assert trial.model_config(256).block == recipe(name).block
        assert trial.scheme == recipe(name).scheme


SEQ, BATCH, STEPS = 64, 16, 50


@pytest.fixture(scope="module")
def text(tinystories) -> np.ndarray:
    return np.frombuffer(tinystories.read_bytes(), dtype=np.uint8)  # bytes are the tokens


@pytest.mark.parametrize("name", list(RECIPES))
def test_tiny_model_of_each_recipe_trains(text, one_torch_thread, name):
    r = recipe(name)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = model_config("tiny", vocab_size=256, seq_len=SEQ, block=r.block)
    model = TernaryLM(cfg)
    formats = apply_plan(model, PrecisionPlan.from_config(r.plan), r.scheme, cfg.n_layers)
    assert (r.scheme in formats.values()) == (name != "fp")
    t = TrainConfig(steps=STEPS, warmup_steps=5, lr=3e-3, **r.train)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
    schedule = TrainSchedule(opt, t)
    losses = []
    for _ in range(STEPS):
        starts = rng.integers(0, len(text) - SEQ - 1, BATCH)
        batch = torch.from_numpy(np.stack([text[i:i + SEQ + 1] for i in starts]).astype(np.int64))
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # from a uniform guess over 256 bytes to clearly better than the unigram start
    assert abs(losses[0] - math.log(256)) < 0.3
    assert np.mean(losses[-10:]) < losses[0] - 1.5, (losses[0], losses[-10:])
    assert opt.param_groups[0]["weight_decay"] == weight_decay_at(t, STEPS)


@pytest.mark.parametrize("activation_bits", [None, 8])
def test_a_packed_bitnet_model_computes_what_training_computes(tmp_path, one_torch_thread,
                                                               activation_bits):
    from ternarylm.data import build_tokenizer, eos_id
    from ternarylm.deploy.inference import load_packed
    from ternarylm.deploy.packing import pack_model

    tokenizer = build_tokenizer("char", [])
    torch.manual_seed(0)
    cfg = model_config("tiny", vocab_size=tokenizer.get_vocab_size(), seq_len=32, block="bitnet")
    model = TernaryLM(cfg)
    plan = PrecisionPlan.from_config({"preset": "all_ternary", "activation_bits": activation_bits})
    apply_plan(model, plan, "absmean", cfg.n_layers)
    with torch.no_grad():  # sub-norm gains away from 1, so a skipped sub-norm shows
        for name, p in model.named_parameters():
            if "sub_norm" in name:
                p.uniform_(0.5, 1.5)
    path = pack_model(model.eval(), tmp_path / "bitnet.safetensors", tokenizer,
                      eos_id(tokenizer), embedding_dtype="fp32").path
    packed = load_packed(path).model
    idx = torch.randint(0, cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(idx), packed(idx)
    errors = sorted(float((got[i] - want[i]).norm() / want[i].norm()) for i in range(4))
    # without activation codes the two agree to float rounding; with them a rounding
    # difference upstream may flip an activation code now and then (as in test_packing)
    assert errors[-1] < (1e-4 if activation_bits is None else 1e-2), errors
    assert errors[1] < 1e-5, errors


def test_results_table_names_each_rows_recipe_in_a_recipe_study():
    from ternarylm.orchestration.results import markdown_table

    cols = ("size", "scheme", "plan", "seed", "lr", "N", "D", "status", "val_loss", "val_ppl",
            "val_bpb", "train_val_ratio", "sparsity", "packed_bytes")
    row = dict.fromkeys(cols, 1) | {"size": "nano", "scheme": "absmean", "plan": "all_ternary"}
    recipes = markdown_table([row | {"recipe": "bitnet_b158"}, row | {"recipe": "fp"}])
    assert recipes.splitlines()[0].startswith("| size | recipe | scheme |")
    assert "| nano | bitnet_b158 | absmean |" in recipes
    assert "recipe" not in markdown_table([row | {"recipe": None}])
