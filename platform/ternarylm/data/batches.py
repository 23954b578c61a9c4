"""Batches from a split's token array: random training windows and an ordered evaluation sweep."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ternarylm.data.sources import DataError


def _require_tokens(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    needed = seq_len + 1
    if len(tokens) < needed:
        where = f" ({tokens.filename})" if getattr(tokens, "filename", None) else ""
        raise DataError(
            f"{what} split{where} has {len(tokens)} tokens but one sequence needs seq_len + 1 = "
            f"{needed}: use a smaller seq_len or a bigger source file"
        )


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class WindowSampler:
    """Random training windows of seq_len + 1 tokens for one rank.

    batch(step, micro_step) is a pure function of (seed, rank, world_size, step, micro_step):
    resuming at a step replays exactly, with no sampler state to checkpoint.
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, micro_batch: int, rank: int, world_size: int, seed: int
    ):
        _require_tokens(tokens, seq_len, "training")
        _check_rank(rank, world_size)
        if micro_batch < 1 or seed < 0:
            raise ValueError(f"need micro_batch >= 1 and seed >= 0, got {micro_batch} and {seed}")
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [micro_batch, seq_len]; y is x shifted left by one token."""
        # Draw the whole global batch and keep this rank's rows: ranks never share a start within
        # a step, and the global stream depends on world_size only via micro_batch * world_size.
        rng = np.random.default_rng([self.seed, step, micro_step])
        n_starts = len(self.tokens) - self.seq_len
        global_batch = self.micro_batch * self.world_size
        starts = rng.choice(n_starts, size=global_batch, replace=global_batch > n_starts)
        mine = starts[self.rank * self.micro_batch : (self.rank + 1) * self.micro_batch]
        return _gather(self.tokens, mine, self.seq_len)


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ordered, non-overlapping windows over a split: window i predicts tokens i*seq_len+1 ..
    (i+1)*seq_len, so every target token is scored at most once. max_tokens caps the targets.

    Rank r takes a contiguous block of equally many windows (up to world_size - 1 trailing
    windows are dropped) so all ranks run the same number of batches: under ZeRO-3 every
    forward pass is a collective.
    """
    _require_tokens(tokens, seq_len, "evaluation")
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    per_rank = n_windows // world_size
    if per_rank == 0:
        raise DataError(
            f"evaluation split has {len(tokens)} tokens: {n_windows} windows of seq_len {seq_len} "
            f"cannot give each of {world_size} ranks one; use a smaller seq_len or more validation text"
        )
    return _eval_iter(tokens, seq_len, batch_size, rank * per_rank, per_rank)


def _eval_iter(
    tokens: np.ndarray, seq_len: int, batch_size: int, first: int, count: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for lo in range(first, first + count, batch_size):
        windows = np.arange(lo, min(lo + batch_size, first + count))
        yield _gather(tokens, windows * seq_len, seq_len)
