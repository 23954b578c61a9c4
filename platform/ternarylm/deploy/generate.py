"""Sampling text from a packed model: temperature, top-k and top-p, one token at a time."""

from __future__ import annotations

import torch

from ternarylm.core.errors import UserError
from ternarylm.deploy.inference import PackedLM, PackedModel


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top-p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]: temperature 0 is greedy; top-k, then top-p filtering."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        # Keep the most likely tokens until their mass reaches top_p (at least one token).
        sorted_probs, order = probs.sort(descending=True)
        sorted_probs[sorted_probs.cumsum(0) - sorted_probs >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: PackedLM, prompt: list[int], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None) -> list[int]:
    """Token ids continuing `prompt`, until eos (not returned), max_new_tokens or a full context.

    A prompt longer than the model's context keeps its last tokens.
    """
    check_sampling(temperature, top_k, top_p)
    if not prompt:
        raise UserError("the prompt needs at least one token")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    prompt = prompt[-model.cfg.seq_len:]
    cache = model.new_cache()
    logits = model(torch.tensor([prompt]), cache)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if token == eos_id:
            break
        out.append(token)
        if cache.length == model.cfg.seq_len:  # the context is full
            break
        logits = model(torch.tensor([[token]]), cache)[0, -1]
    return out


def generate_text(packed: PackedModel, prompt: str, max_new_tokens: int, **sampling) -> str:
    """The completion of a text prompt with a loaded packed model (`inference.load_packed`).

    The prompt follows an end-of-text token, as every training document does.
    """
    ids = [packed.eos_id, *packed.tokenizer.encode(prompt, add_special_tokens=False).ids]
    new = generate(packed.model, ids, max_new_tokens, eos_id=packed.eos_id, **sampling)
    return packed.tokenizer.decode(new)
