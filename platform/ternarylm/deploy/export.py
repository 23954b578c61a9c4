"""Leaving the platform: a finished trial as a Hugging Face checkpoint or a llama.cpp GGUF.

`--format hf` picks the architecture by `ModelConfig.block`: `llama` blocks become
`LlamaForCausalLM` (dequantized weights, float activations), `bitnet` blocks
`BitNetForCausalLM` with transformers' own BitNet quantization (see "BitNet" below).

Our decoder is Llama's: pre-norm RMSNorm (eps 1e-6), causal attention with RoPE, SwiGLU, no
biases. RoPE rotates halves (x[..., :D/2], x[..., D/2:]), exactly like transformers'
`rotate_half`, so q/k weights map to `LlamaForCausalLM` without any permutation (the tests
compare logits). llama.cpp's llama architecture rotates adjacent pairs instead, so the GGUF
writer permutes q/k rows the way llama.cpp's own convert_hf_to_gguf.py does for HF Llama.

Weights are exported DEQUANTIZED, the TriLM way: every quantized layer as codes x scales from
`plans.convert`, i.e. exactly the weights the training forward pass used, under the names the
layer table gives them (`LayerSpec.hf_name`, `LayerSpec.gguf_name`). What the
exported models do not do is quantize activations: stock Llama (and llama.cpp's llama graph)
runs on float activations, while our models quantize every quantized linear's input to
`activation_bits` per token. A model trained with activation quantization therefore gives
slightly different logits outside this project; one trained with `activation_bits: null`
gives the same ones (to float rounding).

GGUF: ternary layers whose rows are a multiple of 256 long (TQ1_0/TQ2_0's block) are stored as
TQ2_0 (2.06 bits) or TQ1_0 (1.69 bits) with the trained codes and one fp16 scale per block (the
layer's scale, or its row's): codes exactly, scales up to fp16 rounding. Everything else falls
back to f16 (or q8_0), norms to f32; `export_gguf` returns (and the CLI prints) which tensors
fell back and why. The tokenizer must be byte-level BPE with merges (llama.cpp's `gpt2` model
with the GPT-2 pre-tokenizer); anything else is refused with a one-line reason.

BitNet: transformers' `BitNetForCausalLM` with `quantization_config` {quant_method: bitnet,
linear_class: autobitlinear, quantization_mode: offline} turns every linear not listed in
`modules_to_not_convert` into `AutoBitLinear` (transformers/integrations/bitnet.py), whose
forward is F.linear(ActQuant(x), weight) * weight_scale, ActQuant being per-token absmax to
int8 ([-128, 127]) like our `activation_codes(x, 8)` (x * (127 / max) there, x / (max / 127)
here: equal but for float rounding). Our ternary layer stores its codes
{-1, 0, 1} as `weight` and its absmean gamma as `weight_scale` (shape [1]: one per matrix), so
transformers runs our forward pass, activation quantization included, to float rounding. The
other layouts run something else: `online` mode requantizes latent weights with
1 / mean|W| (no +EPS: a few codes at the 0.5 boundary flip) and the default `bitlinear` packs
4 rows per byte and truncates rows that are not a multiple of 4 (683 for width 256).
What AutoBitLinear cannot hold is refused: other schemes, per-row scales, activation bits
other than 8, int8/int4 layers and quantized embeddings. Float linears (a float head) are listed
in `modules_to_not_convert` and stay nn.Linear.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ternarylm.core.errors import UserError
from ternarylm.model.transformer import TernaryLM
from ternarylm.model.plans import ConvertedLayer, convert

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("tq2_0", "tq1_0", "f16", "f32")
FLOAT_TYPES = {"f16": np.float16, "f32": np.float32}
"""Types that store every matrix dequantized, in that float type."""
GGUF_FALLBACKS = ("f16", "q8_0")
RMS_NORM_EPS = 1e-6  # model.RMSNorm's default, used by every norm of TernaryLM
TERNARY_BLOCK = 256  # QK_K: elements per TQ1_0 / TQ2_0 block
Q8_BLOCK = 32

_WEIGHTS_NOTE = ("Weights are the trained ternary/integer codes times their scales "
                 "(dequantized, as TriLM releases its models). Stock Llama does not quantize "
                 "activations; ")

ARCHITECTURES = {"llama": "LlamaForCausalLM", "bitnet": "BitNetForCausalLM"}
"""The HF class `--format hf` writes for each `ModelConfig.block`."""
BITNET_SCHEME = "absmean"  # BitNet b1.58: one mean|W| scale per matrix
BITNET_ACTIVATION_BITS = 8  # AutoBitLinear's ActQuant is int8, fixed


class ExportError(UserError):
    """A model or tokenizer that cannot be exported to the asked format; the message says why."""


Layers = dict[str, ConvertedLayer]
"""A model's `plans.convert`: every weight by qualified name, with its HF and GGUF names."""


def _activation_bits(layers: Layers) -> int | None:
    bits = {layer.activation_bits for layer in layers.values()}
    bits.discard(None)
    return max(bits) if bits else None


def _tied(model: TernaryLM, layers: Layers) -> bool:
    """A tied head stays tied only when its dequantized weight equals the embedding's (both
    fp, or the same quantizer); otherwise both are written and the export is untied."""
    return bool(model.cfg.tie_head and torch.equal(layers["head"].dequantized(),
                                                   layers["embed"].dequantized()))


def _block(model: TernaryLM) -> str:
    return getattr(model.cfg, "block", "llama")


def quantization_note(layers: Layers) -> str:
    """What the exported Llama model does differently from ours: activations stay in float."""
    bits = _activation_bits(layers)
    if bits is None:
        return _WEIGHTS_NOTE + ("neither did this model (trained with activation quantization "
                                "off), so stock Llama reproduces its logits to float rounding.")
    return _WEIGHTS_NOTE + (f"the ternarylm model quantized the input of every quantized linear "
                            f"to {bits} bits per token (absmax), so logits here differ slightly "
                            f"from the trained model's.")


def hf_note(model: TernaryLM, layers: Layers) -> str:
    """The HF export's note (config.json, model card, CLI output): its class and what it does
    differently from ours."""
    if _block(model) == "bitnet":
        return bitnet_note(layers)
    return f"Exported as LlamaForCausalLM. {quantization_note(layers)}"


def bitnet_note(layers: Layers) -> str:
    """The BitNet export's note: it quantizes what ours quantizes, so only rounding differs."""
    if _activation_bits(layers) is None:  # no quantized linear at all (see bitnet_float_linears)
        return ("Exported as BitNetForCausalLM with float weights, as trained (no quantized "
                "layer): stock transformers reproduces its logits to float rounding.")
    return ("Exported as BitNetForCausalLM (transformers' bitnet quantization, AutoBitLinear, "
            "offline mode): every ternary linear stores its trained codes {-1, 0, 1} as `weight` "
            "and its absmean scale as `weight_scale`, and transformers quantizes its input to 8 "
            "bits per token (absmax) as the ternarylm model did, so logits equal the trained "
            "model's up to float rounding (an activation on an int8 rounding tie may get the "
            "neighbouring code). Float layers are in modules_to_not_convert. Loading needs the "
            "`accelerate` package; transformers compiles its quantizers with torch.compile.")


def _check_llama_blocks(model: TernaryLM) -> None:
    block = _block(model)
    if block != "llama":
        raise ExportError(f"only `llama` blocks (SwiGLU) map to llama.cpp's llama architecture; "
                          f"this model has {block!r} blocks, which it would run wrongly: export "
                          f"them with --format hf ({ARCHITECTURES.get(block, 'no HF class')})")


@dataclass
class _Source:
    trained: Any  # artifacts.TrainedModel
    source: str
    run: Any | None  # mlflow Run when the source is a run id


def _load(source: str | Path) -> _Source:
    from ternarylm.deploy.artifacts import load_trained, run_id_of

    trained = load_trained(source)
    run = None
    if (run_id := run_id_of(source)) is not None:
        from ternarylm import tracking

        run = tracking.client().get_run(run_id)
    return _Source(trained, str(source), run)


# ---------------------------------------------------------------------------------------------
# Hugging Face


@dataclass
class HFExport:
    path: Path
    tied: bool
    quantization_note: str
    files: list[str] = field(default_factory=list)
    architecture: str = "LlamaForCausalLM"
    """The transformers class written: `ARCHITECTURES[block]`."""

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "hf", "architecture": self.architecture,
                "tied": self.tied, "files": self.files,
                "quantization_note": self.quantization_note}


def llama_config(model: TernaryLM, eos_id: int, tied: bool):
    """transformers.LlamaConfig of our model (fp32, multi-head attention, default RoPE)."""
    from transformers import LlamaConfig

    cfg = model.cfg
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, head_dim=cfg.width // cfg.n_heads, hidden_act="silu",
        max_position_embeddings=cfg.seq_len, rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        tie_word_embeddings=tied, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
        architectures=["LlamaForCausalLM"], dtype="float32")


def bitnet_config(model: TernaryLM, eos_id: int, tied: bool, float_linears: list[str] | None):
    """transformers.BitNetConfig of our model (fp32, multi-head attention, default RoPE).

    float_linears: the HF modules that stay nn.Linear (`bitnet_float_linears`); every other
    linear becomes transformers' AutoBitLinear in offline mode. None: nothing is quantized, so
    no quantization_config (and no `accelerate` needed to load it).
    """
    from transformers import BitNetConfig

    cfg = model.cfg
    quantization = {} if float_linears is None else {"quantization_config": {
        "quant_method": "bitnet", "linear_class": "autobitlinear",
        "quantization_mode": "offline", "use_rms_norm": False,
        # Listed explicitly: a given list replaces transformers' default skips (lm_head).
        "modules_to_not_convert": float_linears}}
    # No head_dim: BitNetConfig has no such field; attention takes hidden_size // heads.
    return BitNetConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, hidden_act="relu2",
        max_position_embeddings=cfg.seq_len, rms_norm_eps=RMS_NORM_EPS,  # its default is 1e-5
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        tie_word_embeddings=tied, attention_bias=False, attention_dropout=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
        architectures=["BitNetForCausalLM"], dtype="float32", **quantization)


def bitnet_float_linears(layers: Layers) -> list[str] | None:
    """HF names of the model's float linears (None when no layer is quantized), after checking
    that every quantized layer is one AutoBitLinear runs as ours: ternary absmean (one scale per
    matrix) with 8-bit per-token activations. Raises ExportError, naming the first misfit."""
    misfits, floats, quantized = [], [], False
    for name, layer in layers.items():
        kind = layer.spec.kind
        if kind == "embedding" and layer.quantized is not None:
            misfits.append(f"the embedding is {layer.format}")  # BitNet's is a float table
        elif kind == "linear" and layer.quantized is not None:
            quantized = True
            bits = layer.activation_bits
            if layer.format != BITNET_SCHEME:
                misfits.append(f"{name} is {layer.format}")
            elif bits != BITNET_ACTIVATION_BITS:
                misfits.append(f"{name} quantizes activations to {bits} bits" if bits else
                               f"{name} does not quantize activations")
        elif kind == "linear":
            floats.append(layer.spec.hf_name.removesuffix(".weight"))
    if misfits:
        more = f" (and {len(misfits) - 1} more)" if len(misfits) > 1 else ""
        raise ExportError(
            f"cannot export to BitNetForCausalLM: {misfits[0]}{more}, but transformers' BitNet "
            f"runs only {BITNET_SCHEME} ternary linears with {BITNET_ACTIVATION_BITS}-bit "
            f"activations, float linears and a float embedding; train with scheme "
            f"{BITNET_SCHEME} and activation_bits {BITNET_ACTIVATION_BITS} (e.g. recipe "
            f"bitnet_b158), or keep this model in our format (`ternarylm pack`)")
    return floats if quantized else None


def hf_config(model: TernaryLM, layers: Layers, eos_id: int, tied: bool):
    """The transformers config of the class `ARCHITECTURES` picks for the model's block."""
    if _block(model) == "bitnet":
        return bitnet_config(model, eos_id, tied, bitnet_float_linears(layers))
    return llama_config(model, eos_id, tied)


def hf_state_dict(model: TernaryLM, layers: Layers) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of the model's HF class and whether the head stays tied to the embedding.

    LlamaForCausalLM: every weight dequantized (codes x scale). BitNetForCausalLM: float layers
    as they are, each ternary linear as AutoBitLinear's `weight` (the codes, as floats) and
    `weight_scale` (gamma, shape [1]), which it multiplies after the matmul. Names are the
    layer table's (`LayerSpec.hf_name`); a tied head (`_tied`) is left out.
    """
    bitnet = _block(model) == "bitnet"
    if bitnet:
        bitnet_float_linears(layers)  # refuses what AutoBitLinear would run differently
    state = {}
    for layer in layers.values():
        key = layer.spec.hf_name
        if bitnet and layer.quantized is not None:
            state[key] = layer.quantized.codes.float().contiguous()
            state[key.removesuffix("weight") + "weight_scale"] = (
                layer.quantized.scale.float().reshape(1))
        else:
            state[key] = layer.dequantized().contiguous()
    tied = _tied(model, layers)
    if tied:
        del state[layers["head"].spec.hf_name]
    return state, tied


def _hf_tokenizer(tokenizer, eos_id: int, seq_len: int):
    """Our tokenizer as a fast HF tokenizer whose plain call gives the ids training saw: training
    encodes without special tokens, so a post-processor (BERT's [CLS] ... [SEP]) is dropped."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.to_str())
    spec["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tok.id_to_token(eos_id),
                                   model_max_length=seq_len)


def _model_card(src: _Source, note: str) -> str:
    """README.md: what the model is, the activation caveat, the run's final metrics (when the
    source is a run) and the trial config."""
    trial = src.trained.trial
    block = _block(src.trained.model)
    lines = ["---", "library_name: transformers", "tags:", "- ternarylm", "- ternary",
             f"- {block}", "---", "",
             f"# {trial.run_name}", "",
             f"A {trial.size} decoder with `{block}` blocks trained by ternarylm with the "
             f"`{trial.scheme}` ternary scheme and the `{trial.plan.name}` precision plan, "
             f"exported as a `{ARCHITECTURES[block]}` checkpoint.", "",
             "## Quantization note", "", note, "", "## Source", "",
             f"- source: `{src.source}`" + (" (MLflow run)" if src.run is not None else ""), ""]
    if src.run is not None:
        metrics = src.run.data.metrics
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
        lines.append("")
    lines += ["## Trial config", "", "```json", json.dumps(trial.to_dict(), indent=1, default=str),
              "```", ""]
    return "\n".join(lines)


def export_hf(source: str | Path, out: str | Path) -> HFExport:
    """Write a LlamaForCausalLM or BitNetForCausalLM directory, by the model's block (config,
    safetensors, fast tokenizer, model card), that transformers' Auto classes load with no code
    of ours. Everything is built before `out` is touched: a refused model writes nothing."""
    from safetensors.torch import save_file

    src = _load(source)
    model, eos_id = src.trained.model, src.trained.eos_id
    if _block(model) not in ARCHITECTURES:
        raise ExportError(f"no Hugging Face class for {_block(model)!r} blocks; blocks "
                          f"exported: {', '.join(ARCHITECTURES)}")
    layers = convert(model)
    state, tied = hf_state_dict(model, layers)
    note = hf_note(model, layers)
    config = hf_config(model, layers, eos_id, tied)
    tok = _hf_tokenizer(src.trained.tokenizer, eos_id, model.cfg.seq_len)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    # Extra keys are kept as config attributes; rope_theta is also written flat for
    # transformers < 5, which does not read rope_parameters.
    meta = json.loads((out / "config.json").read_text())
    meta["rope_theta"] = float(model.cfg.rope_base)
    meta["quantization_note"] = note
    meta["ternarylm"] = {"source": str(source), "scheme": src.trained.trial.scheme,
                         "plan": dataclasses.asdict(src.trained.trial.plan),
                         "activation_bits": _activation_bits(layers),
                         "formats": src.trained.formats}
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    try:
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id,
                         pad_token_id=eos_id).save_pretrained(out)
    except Exception:  # an old transformers without it: generation defaults from config.json
        pass
    tok.save_pretrained(out)
    # transformers >= 5 names the class TokenizersBackend; the old name loads in every version.
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "README.md").write_text(_model_card(src, note))
    return HFExport(out, tied, note, sorted(p.name for p in out.iterdir()),
                    ARCHITECTURES[_block(model)])


# ---------------------------------------------------------------------------------------------
# GGUF


class TokenizerNotSupported(ExportError):
    """A tokenizer llama.cpp's llama architecture cannot represent."""


# llama.cpp token types (llama_token_type / gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer as llama.cpp's `gpt2` model.

    Refuses, with one line saying why, what llama.cpp would tokenize differently: other models
    (WordPiece, Unigram, WordLevel), a pre-tokenizer other than GPT-2's byte-level one, a
    normalizer, BPE options llama.cpp lacks, or no merges at all (a GGUF cannot hold an empty
    merges list: the writer drops it and llama.cpp requires the key).
    """
    spec = json.loads(tokenizer.to_str())
    m = spec.get("model") or {}
    kind = m.get("type")
    why = None
    if kind != "BPE":
        extra = (" (llama.cpp has WordPiece vocabularies only for BERT encoders, not for the "
                 "llama architecture)" if kind == "WordPiece" else "")
        why = f"its model is {kind}, not byte-level BPE{extra}"
    elif not _is_gpt2_pre_tokenizer(spec.get("pre_tokenizer")):
        why = (f"its pre-tokenizer {_describe(spec.get('pre_tokenizer'))} is not GPT-2's "
               f"byte-level one (ByteLevel, add_prefix_space false, use_regex true)")
    elif spec.get("normalizer") is not None:
        why = f"it has a normalizer ({_describe(spec['normalizer'])}) llama.cpp would not apply"
    elif m.get("continuing_subword_prefix") or m.get("end_of_word_suffix") or m.get("dropout"):
        why = "its BPE uses a subword prefix/suffix or dropout, which llama.cpp's gpt2 model lacks"
    elif not m.get("merges"):
        why = ("it has no BPE merges (a byte-per-token `char` tokenizer?): GGUF cannot store an "
               "empty tokenizer.ggml.merges and llama.cpp requires it; train with bpe:N")
    if why is not None:
        raise TokenizerNotSupported(f"cannot export this tokenizer to GGUF: {why}")
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in m["merges"]]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise TokenizerNotSupported(f"cannot export this tokenizer to GGUF: it has token id "
                                    f"{max(vocab.values())} beyond the model's vocabulary of "
                                    f"{vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, _NORMAL
    for i, added in tokenizer.get_added_tokens_decoder().items():
        types[i] = _CONTROL if added.special else _USER_DEFINED
    return tokens, types, merges


def _is_gpt2_pre_tokenizer(pre: dict | None) -> bool:
    if pre is not None and pre.get("type") == "Sequence" and len(pre["pretokenizers"]) == 1:
        pre = pre["pretokenizers"][0]
    return (pre is not None and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space", False) and pre.get("use_regex", True))


def _describe(part: dict | None) -> str:
    return "none" if part is None else str(part.get("type"))


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from half rotation (ours, HF Llama) to llama.cpp's adjacent pairs.

    Within each head, output row j < D/2 goes to 2j and row D/2 + j to 2j + 1: the same
    permutation llama.cpp's convert_hf_to_gguf.py applies to HF Llama's q_proj/k_proj.
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


@dataclass
class GGUFTensor:
    name: str
    source: str
    type: str
    shape: list[int]
    reason: str | None = None
    """Why a ternary layer fell back (None when stored as asked or not ternary)."""


@dataclass
class GGUFExport:
    path: Path
    type: str
    tensors: list[GGUFTensor]
    bytes: int
    ffn_padded_to: int | None = None
    """The MLP hidden size written, when `pad_ffn` widened it."""

    @property
    def fell_back(self) -> list[GGUFTensor]:
        return [t for t in self.tensors if t.reason is not None]

    def note(self) -> str:
        """One line per tensor that did not get the asked type for a reason worth knowing."""
        if self.type in FLOAT_TYPES:
            return f"every matrix stored as {self.type}, norms as f32"
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        lines = [", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " tensors"]
        if self.ffn_padded_to:
            lines.append(f"MLP hidden size padded with zeros to {self.ffn_padded_to}")
        lines += [f"fell back: {t.name} ({t.source}) -> {t.type}: {t.reason}"
                  for t in self.fell_back]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "type": self.type, "bytes": self.bytes,
                "tensors": {t.name: t.type for t in self.tensors},
                "ffn_padded_to": self.ffn_padded_to,
                "fell_back": {t.name: f"{t.type}: {t.reason}" for t in self.fell_back}}


def _ternary_rows(layer: ConvertedLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes [N, K] in {-1, 0, 1}, per-row scale [N]) of a layer TQ types can hold, else None."""
    q = layer.quantized
    if q is None or q.codes.dim() != 2 or not q.codes.numel() or int(q.codes.abs().max()) > 1:
        return None
    n = q.codes.shape[0]
    if q.scale.numel() not in (1, n):
        return None
    return q.codes, q.scale.float().reshape(-1).expand(n)


def _tq_bytes(codes: torch.Tensor, scale: torch.Tensor, qtype) -> np.ndarray:
    """TQ1_0 / TQ2_0 blocks holding exactly `codes`, each block's fp16 scale its row's scale."""
    import gguf
    from gguf import quants

    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    # Codes as floats in {-1, 0, 1}: llama's reference quantizer stores them exactly (its block
    # scale comes out 1, or 0 for an all-zero block); the scale is then overwritten. The fp16
    # scale is the last 2 bytes of a block in both types.
    data = quants.quantize(codes.float().numpy(), qtype)  # uint8 [N, K / 256 * block_bytes]
    blocks = data.reshape(codes.shape[0], -1, block_bytes)
    d = scale.numpy().astype(np.float16).view(np.uint8).reshape(-1, 1, 2)
    blocks[..., -2:] = d
    return blocks.reshape(data.shape)


def _pad_rows(t: torch.Tensor, n: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """t with n more rows: zeros, or copies of `fill`'s last row."""
    extra = (torch.zeros((n, *t.shape[1:]), dtype=t.dtype) if fill is None
             else fill[-1:].expand(n, *t.shape[1:]))
    return torch.cat([t, extra])


def export_gguf(source: str | Path, out: str | Path, type: str = "tq2_0",
                fallback: str = "f16", pad_ffn: bool = False) -> GGUFExport:
    """Write a llama-architecture GGUF: ternary layers as TQ2_0/TQ1_0 where their rows are a
    multiple of 256 long, the rest as `fallback` (f16 or q8_0), norms as f32; or, for type f16
    or f32, every matrix dequantized in that float type.

    pad_ffn: widen the MLP hidden size to a multiple of 256 with zero gate/up rows and zero down
    columns (silu(0) * 0 = 0: the same outputs), so that the down projection, whose rows are
    mlp_hidden long (683 for width 256, 2050 for paper-132m), is stored ternary too.
    """
    import gguf
    from gguf import quants

    if type not in GGUF_TYPES:
        raise ExportError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {type!r}")
    if fallback not in GGUF_FALLBACKS:
        raise ExportError(f"GGUF fallback must be one of {', '.join(GGUF_FALLBACKS)}, "
                          f"got {fallback!r}")
    src = _load(source)
    model, cfg = src.trained.model, src.trained.model.cfg
    _check_llama_blocks(model)
    # The tokenizer first: an unsupported one fails before anything is written.
    tokens, token_types, merges = gguf_vocab(src.trained.tokenizer, cfg.vocab_size)
    layers = convert(model)
    tied = _tied(model, layers)
    ffn = cfg.mlp_hidden
    if pad_ffn and type not in FLOAT_TYPES:
        ffn = -(-cfg.mlp_hidden // TERNARY_BLOCK) * TERNARY_BLOCK
    pad = ffn - cfg.mlp_hidden

    qtypes = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0,
              "tq1_0": gguf.GGMLQuantizationType.TQ1_0}
    file_type = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
                 "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                 "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "f32": gguf.LlamaFileType.ALL_F32}[type]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    trial = src.trained.trial
    writer.add_name(trial.run_name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.seq_len)
    writer.add_embedding_length(cfg.width)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_heads)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_rope_freq_base(float(cfg.rope_base))
    writer.add_rope_dimension_count(cfg.width // cfg.n_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    eos = src.trained.eos_id
    # Training documents are separated by eos; llama.cpp's BOS (not added by default) is eos too.
    writer.add_eos_token_id(eos)
    writer.add_bos_token_id(eos)
    writer.add_add_bos_token(False)
    note = quantization_note(layers)
    writer.add_string("ternarylm.quantization_note", note)
    writer.add_string("ternarylm.scheme", trial.scheme)
    writer.add_string("ternarylm.plan", json.dumps(dataclasses.asdict(trial.plan)))
    writer.add_int32("ternarylm.activation_bits", _activation_bits(layers) or 0)

    report: list[GGUFTensor] = []
    for name, layer in layers.items():
        if name == "head" and tied:
            continue
        gname, role = layer.spec.gguf_name, layer.spec.role
        w = layer.dequantized()
        ternary = _ternary_rows(layer)
        if role in ("q", "k"):
            w = permute_rope(w, cfg.n_heads)
            if ternary is not None:
                ternary = (permute_rope(ternary[0], cfg.n_heads),
                           permute_rope(ternary[1], cfg.n_heads))
        if pad and role in ("gate", "up"):  # zero output rows
            w = _pad_rows(w, pad)
            if ternary is not None:
                ternary = (_pad_rows(ternary[0], pad), _pad_rows(ternary[1], pad, ternary[1]))
        elif pad and role == "down":  # zero input columns
            w = _pad_rows(w.t(), pad).t().contiguous()
            if ternary is not None:
                ternary = (_pad_rows(ternary[0].t(), pad).t().contiguous(), ternary[1])
        shape = list(w.shape)
        reason = None
        if layer.spec.kind == "norm":
            writer.add_tensor(gname, w.numpy().astype(np.float32))
            report.append(GGUFTensor(gname, name, "f32", shape))
            continue
        if type in FLOAT_TYPES:
            writer.add_tensor(gname, w.numpy().astype(FLOAT_TYPES[type]))
            report.append(GGUFTensor(gname, name, type, shape))
            continue
        if ternary is not None:
            if w.shape[1] % TERNARY_BLOCK == 0:
                data = _tq_bytes(*ternary, qtypes[type])
                writer.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtypes[type])
                report.append(GGUFTensor(gname, name, type, shape))
                continue
            reason = (f"row length {w.shape[1]} is not a multiple of {TERNARY_BLOCK} "
                      f"({type.upper()}'s block)")
        elif layer.quantized is not None:
            reason = f"{layer.format} codes are not ternary"
        if fallback == "q8_0" and w.shape[1] % Q8_BLOCK == 0:
            data = quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, data, raw_shape=data.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            kind = "q8_0"
        else:
            writer.add_tensor(gname, w.numpy().astype(np.float16))
            kind = "f16"
        report.append(GGUFTensor(gname, name, kind, shape, reason))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFExport(out, type, report, out.stat().st_size, ffn if pad else None)

