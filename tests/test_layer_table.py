"""One model description: the layer table (`ModelConfig.layer_table`) is the built model, every
backend reads it (a block variant registered here touches `model.BLOCKS` only), and `convert`
gives packing the bytes it wrote before the table existed."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn as nn

from ternarylm.orchestration.allocate import block_linears
from ternarylm.model.stats import layer_stats
from ternarylm.data import build_tokenizer, eos_id
from ternarylm.deploy.export import hf_state_dict
from ternarylm.deploy.inference import PackedLM, load_packed
from ternarylm.model.transformer import BLOCKS, ROLES, BlockSpec, ModelConfig, RMSNorm, TernaryLM, relu_squared
from ternarylm.deploy.packing import CONFIG_KEY, pack_model, pack_tensors, packed_contents
from ternarylm.model.plans import PrecisionPlan, apply_plan, convert, preset
from ternarylm.model.quantizers import FP


def small(block: str = "llama", tie_head: bool = False, n_layers: int = 2) -> ModelConfig:
    return ModelConfig(width=64, n_layers=n_layers, n_heads=4, vocab_size=96, seq_len=16,
                       tie_head=tie_head, block=block)


def weights(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of every module that holds a weight, in registration order."""
    return [(n, tuple(m.weight.shape)) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding, RMSNorm))]


@pytest.fixture
def plain(monkeypatch) -> str:
    """A block variant the library does not have: no gate projection (down(relu^2(up(x))))."""
    monkeypatch.setitem(BLOCKS, "plain", BlockSpec(relu_squared, sub_norms=False, gated=False))
    return "plain"


@pytest.mark.parametrize("block", [*BLOCKS, "plain"])
@pytest.mark.parametrize("tie_head", [False, True])
def test_the_table_is_the_built_model(block, tie_head, plain):
    cfg = small(block, tie_head)
    model = TernaryLM(cfg)
    assert [(s.name, s.shape) for s in cfg.layer_table()] == weights(model)
    assert cfg.param_counts()["params_total"] == sum(p.numel() for p in model.parameters())


def test_gguf_and_hf_names_are_llama_cpps_and_transformers():
    import gguf
    from transformers import BitNetConfig, BitNetForCausalLM

    enum = {"embedding": "TOKEN_EMBD", "attn_norm": "ATTN_NORM", "q": "ATTN_Q", "k": "ATTN_K",
            "v": "ATTN_V", "o": "ATTN_OUT", "attn_sub_norm": "ATTN_SUB_NORM",
            "mlp_norm": "FFN_NORM", "gate": "FFN_GATE", "up": "FFN_UP", "down": "FFN_DOWN",
            "mlp_sub_norm": "FFN_SUB_NORM", "norm": "OUTPUT_NORM", "head": "OUTPUT"}
    assert set(enum) == set(ROLES)
    for role, name in enum.items():
        template = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, name)]
        assert ROLES[role].gguf == template.replace("{bid}", "{i}") + ".weight", role
    cfg = small("bitnet")  # BitNet's names are Llama's plus the sub-norms
    hf_cfg = BitNetConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width,
                          intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layers,
                          num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads)
    with torch.device("meta"):
        hf = BitNetForCausalLM(hf_cfg)
    assert sorted(s.hf_name for s in cfg.layer_table()) == sorted(hf.state_dict())


def test_a_block_variant_touches_one_place(plain, tmp_path):
    """plans, packing, the packed model, HF and GGUF names, analysis and allocation all follow
    the table of a variant defined only by its `BLOCKS` entry."""
    cfg = small(plain)
    table = cfg.layer_table()
    assert not any(s.role == "gate" for s in table)
    linears = [s.name for s in table if s.kind == "linear"]
    torch.manual_seed(0)
    model = TernaryLM(cfg)
    plan = PrecisionPlan(mlp="int8", activation_bits=None)
    formats = apply_plan(model, plan, "absmean", cfg.n_layers)
    assert list(formats) == linears
    assert formats["blocks.1.mlp.up"] == "int8" and formats["blocks.1.attn.q"] == "absmean"

    layers = convert(model)
    assert list(layers) == [s.name for s in table]
    assert list(pack_tensors(model)[0]) == [s.name for s in table]
    assert set(hf_state_dict(model, layers)[0]) == {s.hf_name for s in table}
    assert not any("ffn_gate" in layer.spec.gguf_name for layer in layers.values())
    assert [r["layer"] for r in layer_stats(model)] == [n for n in linears if n != "head"]
    assert [len(v) for v in block_linears(model).values()] == [6, 6]  # q k v o up down

    tokenizer = build_tokenizer("char", [])
    path = pack_model(model, tmp_path / "plain.safetensors", tokenizer, eos_id(tokenizer),
                      embedding_dtype="fp32").path
    packed = load_packed(path).model
    assert isinstance(packed, PackedLM) and not packed.blocks[0].gated
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        assert torch.allclose(packed(idx), model(idx), atol=1e-4)


@pytest.mark.parametrize("plan", ["middle_ternary", "all_ternary_int8_vocab"])
@pytest.mark.parametrize("scheme", ["absmean_channel", "learned"])
def test_convert_is_what_the_forward_pass_uses(plan, scheme):
    cfg = small("bitnet", n_layers=4)
    torch.manual_seed(0)
    model = TernaryLM(cfg)
    formats = apply_plan(model, preset(plan), scheme, cfg.n_layers)
    layers = convert(model)
    for name, layer in layers.items():
        module = model.get_submodule(name)
        assert layer.format == formats.get(name, FP), name
        if layer.quantized is None:
            assert torch.equal(layer.dequantized(), module.weight), name
            continue
        assert torch.equal(layer.dequantized(),
                           module.weight_quantizer.dequantized(module.weight)), name
        assert layer.activation_bits == getattr(module, "activation_bits", None), name
        assert (layer.initial_scale is not None) == (layer.format == "learned"), name


# The packed file's structure (its config JSON, the layer table inside it included, and every
# tensor's name, dtype and shape) as ternarylm wrote it before the layer table and `convert`
# (commit 436ef1f), packed on the meta device: the format must not change. Values are not in it
# (initialisation's last bits may differ between CPUs); test_packing round-trips them exactly.
BEFORE_THE_TABLE = [
    ("llama", False, "boundary_int8", "absmean", "int8", False,
     "bab82c507f2e6c1c5aa07140886fd46c4a62f85d268358dc227b13dacf4cd3c5"),
    ("bitnet", True, "all_ternary_int4_vocab", "learned", "fp16", True,
     "81a766ad1d19f4c5ba5179e890e8bb959c930288d9347012821f5fe3e5f35a0a"),
    ("llama", True, "fp", "absmean", "fp32", False,
     "7eaa1e4f9b344a7ec01d3a4d9bdbe191265eff9684b7415385646579e978a7fb"),
]


def structure_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    h = hashlib.sha256(metadata[CONFIG_KEY].encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
    return h.hexdigest()


@pytest.mark.parametrize("block, tied, plan, scheme, embedding_dtype, trits, digest",
                         BEFORE_THE_TABLE)
def test_packing_from_convert_writes_the_same_format(block, tied, plan, scheme, embedding_dtype,
                                                     trits, digest):
    with torch.device("meta"):
        model = TernaryLM(small(block, tied, n_layers=4))
        apply_plan(model, preset(plan), scheme, 4)
    tensors, metadata = packed_contents(model, "", 0, embedding_dtype=embedding_dtype,
                                        trits=trits)
    assert structure_digest(tensors, metadata) == digest
