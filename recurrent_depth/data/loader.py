"""Token datasets as two aligned tensors, and a batch schedule that is a pure function of its position.

A `TokenDataset` holds `inputs` (N, L) and `labels` (N, L) (labels aligned with the logits, -100 ignored), plus
optional `answer_labels` (labels on answer tokens only, for exact-match accuracy). `batch_indices(position, ...)`
gives the rows of global batch number `position`: epoch e visits the rows in the order randperm(N, seed + e), so a
resumed run that knows its position reads exactly the batches an uninterrupted run would have read.
`curriculum_indices(position, ...)` is the same for a curriculum over difficulty (`levels`): only rows up to a maximum
level (rising with the position, `curriculum_level`) are drawn, again a pure function of the position.
`training_indices` picks between the two: the training loop's one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenDataset:
    inputs: Tensor  # (N, L) token ids
    labels: Tensor  # (N, L) next-token targets, -100 where no loss
    answer_labels: Tensor | None = None  # (N, L) targets on answer tokens only (prompt/answer data)
    levels: Tensor | None = None  # (N,) difficulty level of each row, where every example has one

    def __post_init__(self) -> None:
        if self.inputs.shape != self.labels.shape or self.inputs.ndim != 2:
            raise ValueError(f"inputs {tuple(self.inputs.shape)} and labels {tuple(self.labels.shape)} must be the "
                             "same (N, L) shape")
        if len(self) == 0:
            raise ValueError("the dataset is empty (no sequences after tokenisation and packing)")
        if self.levels is not None and self.levels.shape != (len(self),):
            raise ValueError(f"levels {tuple(self.levels.shape)} must hold one level per row ({len(self)})")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    def rows(self, index: Tensor) -> TokenDataset:
        answers = self.answer_labels[index] if self.answer_labels is not None else None
        levels = self.levels[index] if self.levels is not None else None
        return TokenDataset(self.inputs[index], self.labels[index], answers, levels)

    def split(self, n_val: int) -> tuple[TokenDataset, TokenDataset]:
        """The first N - n_val rows and the last n_val rows."""
        n = len(self) - n_val
        if n <= 0 or n_val <= 0:
            raise ValueError(f"cannot hold out {n_val} of {len(self)} sequences for validation")
        return self.rows(torch.arange(n)), self.rows(torch.arange(n, len(self)))


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The row order of one epoch: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(position: int, batch_size: int, n: int, seed: int) -> Tensor:
    """Row indices of global batch number `position` (batch_size rows; batches run across epoch boundaries)."""
    start = position * batch_size
    flat = torch.arange(start, start + batch_size)
    epochs = flat // n
    out = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = epoch_order(n, seed, e)[flat[sel] % n]
    return out


def curriculum_level(step: int, levels: Tensor, fraction: float, train_steps: int) -> int | None:
    """The highest level admitted at `step` of a `train_steps`-step run whose first `fraction` of steps ramp over
    the levels (lowest level first, each level admitted for an equal share of the ramp); None once every row is."""
    ramp = fraction * train_steps
    if fraction <= 0 or step >= ramp:
        return None
    distinct = levels.unique().tolist()  # sorted
    return int(distinct[min(len(distinct) - 1, int(step / ramp * len(distinct)))])


def curriculum_indices(position: int, batch_size: int, levels: Tensor, max_level: int, seed: int) -> Tensor:
    """Row indices of global batch number `position` drawn (without replacement within the batch, with replacement
    across batches) from the rows whose level is at most `max_level`."""
    admitted = torch.nonzero(levels <= max_level).flatten()
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (position + 1))
    if len(admitted) >= batch_size:
        return admitted[torch.randperm(len(admitted), generator=g)[:batch_size]]
    return admitted[torch.randint(len(admitted), (batch_size,), generator=g)]


def training_indices(position: int, batch_size: int, data: TokenDataset, seed: int, curriculum: float = 0.0,
                     train_steps: int = 0) -> Tensor:
    """Rows of training batch `position`: from the curriculum while its ramp lasts (`curriculum` > 0, the first
    `curriculum` fraction of `train_steps`; `data.levels` needed), else the epoch schedule of `batch_indices`."""
    level = None
    if curriculum:
        if data.levels is None:
            raise ValueError("a curriculum needs the dataset's row levels (every example's integer `level`)")
        level = curriculum_level(position, data.levels, curriculum, train_steps)
    if level is None:
        return batch_indices(position, batch_size, len(data), seed)
    return curriculum_indices(position, batch_size, data.levels, level, seed)


def eval_batches(data: TokenDataset, batch_size: int, max_batches: int) -> list[TokenDataset]:
    """Up to `max_batches` consecutive batches from the start of `data` (validation order is fixed)."""
    out = []
    for b in range(max_batches):
        if b * batch_size >= len(data):
            break
        out.append(data.rows(torch.arange(b * batch_size, min((b + 1) * batch_size, len(data)))))
    return out
