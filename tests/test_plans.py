"""Precision plans: presets and rules resolve to the formats they promise, bad plans are refused
with a message that says what is wrong, and the converter swaps modules without copying."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import yaml
import torch.nn as nn
from ternarylm.model.transformer import LayerSpec, ModelConfig, TernaryLM
from ternarylm.model.plans import PRESETS, PlanError, PrecisionPlan, apply_plan, preset
from ternarylm.model.quantizers import TERNARY_SCHEMES, QuantEmbedding, QuantLinear

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def names(n_layers: int) -> list[LayerSpec]:
    """The layer table of a small TernaryLM (what `resolve` reads)."""
    return ModelConfig(width=16, n_layers=n_layers, n_heads=2, vocab_size=32,
                       seq_len=8).layer_table()


def small_model(n_layers: int, tie_head: bool = False) -> TernaryLM:
    torch.manual_seed(0)
    return TernaryLM(ModelConfig(width=16, n_layers=n_layers, n_heads=2, vocab_size=32,
                                 seq_len=8, tie_head=tie_head))


def expected(n_layers: int, block_format: dict[int, str], head: str = "fp") -> dict[str, str]:
    """Every linear of block i gets block_format[i]; the head gets `head`."""
    out = {}
    for i in range(n_layers):
        for p in ATTN:
            out[f"blocks.{i}.attn.{p}"] = block_format[i]
        for p in MLP:
            out[f"blocks.{i}.mlp.{p}"] = block_format[i]
    out["head"] = head
    return out


def test_layer_table_linears_are_the_models():
    model = small_model(3)
    table = [s.name for s in names(3) if s.kind == "linear"]
    assert table == [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert set(table) == set(expected(3, dict.fromkeys(range(3), "fp")))


# --- presets -----------------------------------------------------------------------------------

def test_preset_names():
    assert set(PRESETS) == {"fp", "int8", "int4", "all_ternary", "all_ternary_int8_vocab",
                            "all_ternary_int4_vocab", "boundary_int8", "middle_ternary"}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_uniform_int_presets(fmt):
    plan = preset(fmt)
    assert plan.activation_bits == 8 and plan.embedding == "fp"
    got = plan.resolve(names(4), 4, "learned")
    assert got == expected(4, {i: fmt for i in range(4)})


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_all_ternary_vocab_presets(fmt):
    plan = preset(f"all_ternary_{fmt}_vocab")
    assert plan.embedding == fmt
    got = plan.resolve(names(4), 4, "twn")
    assert got == expected(4, {i: "twn" for i in range(4)}, head=fmt)
    model = small_model(2)
    formats = apply_plan(model, plan, "absmean", 2)
    assert formats["embed"] == fmt and model.embed.format == fmt and model.head.format == fmt


@pytest.mark.parametrize("n_layers", [12, 4])
def test_fp_preset(n_layers):
    plan = preset("fp")
    assert plan.activation_bits is None
    got = plan.resolve(names(n_layers), n_layers, "absmean")
    assert got == expected(n_layers, {i: "fp" for i in range(n_layers)})


@pytest.mark.parametrize("n_layers", [12, 4])
@pytest.mark.parametrize("scheme", TERNARY_SCHEMES)
def test_all_ternary_preset(n_layers, scheme):
    plan = preset("all_ternary")
    assert plan.activation_bits == 8
    got = plan.resolve(names(n_layers), n_layers, scheme)
    assert got == expected(n_layers, {i: scheme for i in range(n_layers)})


def test_boundary_int8_preset_12_layers():
    got = preset("boundary_int8").resolve(names(12), 12, "twn")
    fmt = {i: "int8" if i in (0, 1, 10, 11) else "twn" for i in range(12)}
    assert got == expected(12, fmt)
    assert got["blocks.1.mlp.down"] == "int8" and got["blocks.2.attn.q"] == "twn"
    assert got["blocks.9.mlp.up"] == "twn" and got["blocks.10.attn.o"] == "int8"


def test_boundary_int8_preset_4_layers_is_all_int8():
    # 2 first + 2 last blocks cover all 4 blocks
    got = preset("boundary_int8").resolve(names(4), 4, "absmean")
    assert got == expected(4, {i: "int8" for i in range(4)})


def test_middle_ternary_preset_12_layers():
    # outer thirds: 12 / 3 = 4 blocks at each end in int4, ternary in blocks 4..7
    got = preset("middle_ternary").resolve(names(12), 12, "learned")
    fmt = {i: "learned" if 4 <= i <= 7 else "int4" for i in range(12)}
    assert got == expected(12, fmt)


def test_middle_ternary_preset_4_layers():
    # 4 / 3 = 1.33 rounds to 1 block at each end: int4, ternary, ternary, int4
    got = preset("middle_ternary").resolve(names(4), 4, "absmean_channel")
    assert got == expected(4, {0: "int4", 1: "absmean_channel", 2: "absmean_channel", 3: "int4"})


def test_preset_returns_an_independent_copy():
    plan = preset("all_ternary")
    plan.blocks[0] = "int8"
    plan.overrides["head"] = "int8"
    plan.default = "fp"
    fresh = preset("all_ternary")
    assert fresh.blocks == {} and fresh.overrides == {} and fresh.default == "ternary"


# --- rules -------------------------------------------------------------------------------------

def test_attention_and_mlp_rules():
    plan = PrecisionPlan(attention="int8", mlp="fp")
    got = plan.resolve(names(4), 4, "absmean")
    for name, fmt in got.items():
        if ".attn." in name:
            assert fmt == "int8", name
        elif ".mlp." in name:
            assert fmt == "fp", name
    assert got["head"] == "fp"

    got = PrecisionPlan(default="int4", mlp="ternary").resolve(names(4), 4, "twn")
    assert {got[f"blocks.{i}.attn.{p}"] for i in range(4) for p in ATTN} == {"int4"}
    assert {got[f"blocks.{i}.mlp.{p}"] for i in range(4) for p in MLP} == {"twn"}


def test_boundary_blocks_override_attention_and_mlp_rules():
    plan = PrecisionPlan(attention="int4", first_k=1, last_k=0, boundary_format="fp")
    got = plan.resolve(names(4), 4, "absmean")
    assert got["blocks.0.attn.q"] == "fp" and got["blocks.0.mlp.up"] == "fp"
    assert got["blocks.1.attn.q"] == "int4" and got["blocks.1.mlp.up"] == "absmean"


def test_fractional_first_and_last_k():
    # 0.25 of 8 blocks = 2 at the start; 0.125 of 8 = 1 at the end
    got = PrecisionPlan(first_k=0.25, last_k=0.125).resolve(names(8), 8, "absmean")
    fmt = {i: "int8" if i in (0, 1, 7) else "absmean" for i in range(8)}
    assert got == expected(8, fmt)
    # rounded to the nearest block count: 0.3 * 12 = 3.6 -> 4, 0.1 * 12 = 1.2 -> 1
    got = PrecisionPlan(first_k=0.3, last_k=0.1).resolve(names(12), 12, "absmean")
    fmt = {i: "int8" if i in (0, 1, 2, 3, 11) else "absmean" for i in range(12)}
    assert got == expected(12, fmt)


def test_blocks_dict_overrides_boundaries_and_accepts_string_keys():
    plan = PrecisionPlan.from_config({"preset": "boundary_int8",
                                      "blocks": {"0": "fp", 5: "int4", "11": "ternary"}})
    assert plan.blocks == {0: "fp", 5: "int4", 11: "ternary"}
    got = plan.resolve(names(12), 12, "absmean")
    fmt = {i: "int8" if i in (1, 10) else "absmean" for i in range(12)}
    fmt.update({0: "fp", 5: "int4", 11: "absmean"})
    assert got == expected(12, fmt)


def test_overrides_glob_applied_last():
    plan = PrecisionPlan(blocks={2: "int8"},
                         overrides={"blocks.*.attn.o": "int4", "blocks.2.mlp.*": "fp"})
    got = plan.resolve(names(4), 4, "twn")
    for i in range(4):
        assert got[f"blocks.{i}.attn.o"] == "int4"
        assert got[f"blocks.{i}.attn.q"] == ("int8" if i == 2 else "twn")
        assert got[f"blocks.{i}.mlp.gate"] == ("fp" if i == 2 else "twn")


@pytest.mark.parametrize("scheme", TERNARY_SCHEMES)
def test_head_format_and_ternary_resolves_to_the_scheme(scheme):
    assert PrecisionPlan(head="ternary").resolve(names(2), 2, scheme)["head"] == scheme
    assert PrecisionPlan(head="int8").resolve(names(2), 2, scheme)["head"] == "int8"
    assert PrecisionPlan(overrides={"head": "ternary"}).resolve(
        names(2), 2, scheme)["head"] == scheme
    got = PrecisionPlan(default="ternary", boundary_format="ternary", first_k=1).resolve(
        names(2), 2, scheme)
    assert "ternary" not in got.values()


# --- refused plans -----------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"default": "int3"}, "unknown format 'int3' for default"),
    ({"attention": "ternery"}, "unknown format 'ternery' for attention"),
    ({"mlp": "bf16"}, "unknown format 'bf16' for mlp"),
    ({"head": "int16"}, "unknown format 'int16' for head"),
    ({"boundary_format": "int3"}, "unknown format 'int3' for boundary_format"),
    ({"embedding": "absmean"}, "unknown format 'absmean' for embedding"),
    ({"blocks": {3: "int5"}}, "unknown format 'int5' for block 3"),
    ({"overrides": {"head": "int5"}}, "unknown format 'int5' for override 'head'"),
    ({"blocks": {-1: "fp"}}, "block index -1 is negative"),
    ({"blocks": {"first": "fp"}}, "blocks must map block indices (integers) to formats"),
    ({"blocks": ["fp"]}, "blocks must map block indices (integers) to formats"),
    ({"first_k": -1}, "first_k must be a block count >= 0"),
    ({"last_k": "2"}, "last_k must be a block count >= 0"),
    ({"activation_bits": 1}, "activation_bits must be between 2 and 16"),
    ({"activation_bits": 32}, "activation_bits must be between 2 and 16"),
])
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(PlanError, match=re.escape(message)):
        PrecisionPlan.from_config(fields)


def test_unknown_preset():
    with pytest.raises(PlanError, match="unknown precision plan 'half_ternary'; presets: fp, "):
        PrecisionPlan.from_config("half_ternary")
    with pytest.raises(PlanError, match="unknown precision plan 'nope'"):
        PrecisionPlan.from_config({"preset": "nope"})


def test_unknown_field():
    with pytest.raises(PlanError, match=r"unknown field\(s\) defualt, first_n; known fields: "):
        PrecisionPlan.from_config({"defualt": "fp", "first_n": 2})


def test_not_a_mapping():
    with pytest.raises(PlanError, match="must be a preset name or a mapping"):
        PrecisionPlan.from_config(["fp"])


def test_block_index_out_of_range():
    plan = PrecisionPlan(name="p", blocks={12: "fp"})
    with pytest.raises(PlanError, match=r"block index 12 is out of range for a model with 12 "
                                        r"blocks \(0..11\)"):
        plan.resolve(names(12), 12, "absmean")
    plan.resolve(names(13), 13, "absmean")  # fine on a deeper model


def test_first_plus_last_too_large():
    plan = PrecisionPlan(name="wide", first_k=3, last_k=2)
    with pytest.raises(PlanError, match=r"'wide': first_k=3 \+ last_k=2 exceed the model's 4 "
                                        r"blocks"):
        plan.resolve(names(4), 4, "absmean")
    plan.resolve(names(5), 5, "absmean")  # exactly covering the model is allowed


def test_override_selecting_nothing():
    plan = PrecisionPlan(overrides={"blocks.*.attn.qkv": "fp"})
    with pytest.raises(PlanError, match=r"override 'blocks.\*.attn.qkv' selects no layer; names "
                                        r"look like 'blocks.0.attn.q'"):
        plan.resolve(names(2), 2, "absmean")


@pytest.mark.parametrize("scheme", ["int8", "fp", "ternary", "absmax"])
def test_unknown_scheme(scheme):
    with pytest.raises(PlanError, match=f"unknown ternary scheme '{scheme}'; choose one of "
                                        f"absmean, absmean_channel, twn, learned"):
        preset("all_ternary").resolve(names(2), 2, scheme)
    with pytest.raises(PlanError, match="unknown ternary scheme"):
        apply_plan(small_model(2), preset("all_ternary"), scheme, 2)


# --- serialisation -----------------------------------------------------------------------------

def test_to_flat():
    plan = PrecisionPlan(name="mine", attention="int8", first_k=2, blocks={3: "int4", 5: "fp"},
                         overrides={"head": "int8"}, activation_bits=None)
    flat = plan.to_flat()
    assert set(flat) == {f"plan.{f.name}" for f in dataclasses.fields(PrecisionPlan)}
    assert flat["plan.name"] == "mine" and flat["plan.default"] == "ternary"
    assert flat["plan.attention"] == "int8" and flat["plan.mlp"] == "none"
    assert flat["plan.first_k"] == 2 and flat["plan.last_k"] == 0
    assert flat["plan.blocks"] == "3=int4;5=fp"
    assert flat["plan.overrides"] == "head=int8"
    assert flat["plan.activation_bits"] == "none"
    for value in flat.values():
        assert isinstance(value, (str, int, float))


@pytest.mark.parametrize("source", [
    *PRESETS,
    {"name": "mix", "default": "int4", "mlp": "ternary", "first_k": 0.25, "last_k": 1,
     "boundary_format": "fp", "blocks": {2: "int2"}, "overrides": {"blocks.*.attn.v": "int8"},
     "embedding": "int8", "head": "ternary", "activation_bits": 4},
])
def test_round_trip(source):
    plan = PrecisionPlan.from_config(source)
    fields = dataclasses.asdict(plan)
    # as a YAML file would give them back: block keys as strings
    fields["blocks"] = {str(k): v for k, v in fields["blocks"].items()}
    again = PrecisionPlan.from_config(fields)
    assert again == plan
    assert again.to_flat() == plan.to_flat()
    assert PrecisionPlan.from_config(plan) is plan
    if isinstance(source, dict):
        for key, value in source.items():
            assert getattr(plan, key) == value


@pytest.mark.parametrize("spelling", ["mapping", "string"])
def test_plan_from_file(tmp_path, monkeypatch, spelling):
    fields = {"name": "from_file", "preset": "all_ternary", "blocks": {0: "int8", 3: "int4"},
              "head": "int8"}
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "mine.yaml").write_text(yaml.safe_dump(fields))
    monkeypatch.chdir(tmp_path)  # relative paths are taken from the working directory
    source = {"file": "plans/mine.yaml"} if spelling == "mapping" else "plans/mine.yaml"
    plan = PrecisionPlan.from_config(source)
    assert plan == dataclasses.replace(preset("all_ternary"), name="from_file",
                                       blocks={0: "int8", 3: "int4"}, head="int8")


@pytest.mark.parametrize("content, source, message", [
    (None, {"file": "missing.yaml"}, "precision plan file missing.yaml: cannot read it"),
    ("- fp\n", "plan.yaml", "plan.yaml must hold one mapping of plan fields"),
    ("a: [\n", "plan.yaml", "plan.yaml is not valid YAML"),
    ("defualt: fp\n", "plan.yaml", "plan.yaml: precision plan: unknown field(s) defualt"),
    ("file: other.yaml\n", "plan.yaml", "no nested `file:`"),
    ("default: fp\n", {"file": "plan.yaml", "head": "int8"}, "`file` must stand alone"),
])
def test_bad_plan_files_are_refused(tmp_path, monkeypatch, content, source, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "plan.yaml").write_text(content)
    with pytest.raises(PlanError, match=re.escape(message)):
        PrecisionPlan.from_config(source)


def test_from_config_preset_base_with_changes():
    plan = PrecisionPlan.from_config({"preset": "boundary_int8", "head": "int8", "last_k": 1})
    assert (plan.name, plan.first_k, plan.last_k, plan.head) == ("boundary_int8", 2, 1, "int8")
    assert preset("boundary_int8").last_k == 2  # the preset itself is unchanged


# --- converter ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", TERNARY_SCHEMES)
def test_apply_plan_swaps_modules(scheme):
    model = small_model(4)
    before = dict(model.named_parameters())
    plan = PrecisionPlan(first_k=1, boundary_format="int8", mlp="fp", activation_bits=4)
    formats = apply_plan(model, plan, scheme, 4)
    assert formats == plan.resolve(names(4), 4, scheme)
    for name, fmt in formats.items():
        module = model.get_submodule(name)
        if fmt == "fp":
            assert type(module) is nn.Linear, name
        else:
            assert type(module) is QuantLinear, name
            assert module.format == fmt and module.activation_bits == 4
            assert module.weight is before[f"{name}.weight"]  # the same parameter, not a copy
    assert type(model.get_submodule("blocks.0.attn.q")) is QuantLinear
    assert model.get_submodule("blocks.0.attn.q").format == "int8"
    assert model.get_submodule("blocks.1.attn.q").format == scheme
    assert type(model.get_submodule("blocks.1.mlp.up")) is nn.Linear
    assert type(model.embed) is nn.Embedding
    # state dict names of the original model are kept; a learned scale adds one entry per layer
    after = dict(model.named_parameters())
    extra = set(after) - set(before)
    assert set(before) <= set(after)
    if scheme in ("learned", "paretoq"):  # schemes with a trainable scale
        assert extra == {f"{n}.weight_quantizer.scale" for n, f in formats.items()
                         if f == scheme}
    else:
        assert extra == set()
    # the converted model runs
    out = model(torch.randint(0, 32, (2, 8)))
    assert out.shape == (2, 8, 32) and torch.isfinite(out).all()


def test_apply_plan_quantizes_the_embedding():
    model = small_model(2)
    table = model.embed.weight
    formats = apply_plan(model, PrecisionPlan(embedding="int8"), "absmean", 2)
    assert type(model.embed) is QuantEmbedding and model.embed.format == "int8"
    assert model.embed.weight is table and formats["embed"] == "int8"


def test_tied_head_stays_tied():
    model = small_model(2, tie_head=True)
    assert model.head.weight is model.embed.weight
    formats = apply_plan(model, PrecisionPlan(head="ternary", embedding="int8"), "absmean", 2)
    assert formats["head"] == "absmean" and formats["embed"] == "int8"
    assert type(model.head) is QuantLinear and type(model.embed) is QuantEmbedding
    assert model.head.weight is model.embed.weight
    n_unique = len({id(p) for p in model.parameters()})
    assert n_unique == len(list(model.parameters()))
    # one optimizer step later they are still one tensor
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, 32, (2, 8))
    model.loss(idx, idx).backward()
    opt.step()
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_fp_plan_changes_nothing():
    model = small_model(2)
    modules = {n: type(m) for n, m in model.named_modules()}
    apply_plan(model, preset("fp"), "absmean", 2)
    assert {n: type(m) for n, m in model.named_modules()} == modules
