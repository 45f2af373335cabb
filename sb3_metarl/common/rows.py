"""The valid steps of a batch of episodes packed to the front of each task's rows (the learner skips the padding)."""

from dataclasses import dataclass

import torch as th


@dataclass(frozen=True)
class RowPacking:
    """
    Each task's valid steps (mask 1), in their stored order, moved to the front of its rows: K rows per task, K the
    largest number of valid steps of any task; a task with fewer fills its last rows with padding (mask 0). Every
    per-row computation (a forward pass, a log-likelihood, a KL) is the same on a packed row; only sums over rows
    add in another order (the last bits).
    """

    #: (B, K) the stored row (of E*H) of each packed row
    index: th.Tensor
    #: (B, K) 1 for a valid step, 0 for padding
    masks: th.Tensor
    #: the stored rows per task, E*H
    n_rows: int

    @staticmethod
    def of(masks: th.Tensor) -> "RowPacking | None":
        """:param masks: (B, E*H); :return: the packing, or None where it would not shorten the rows"""
        valid = masks > 0
        n_packed = int(valid.sum(1).max().item())
        if n_packed == masks.shape[1]:
            return None
        # a stable sort keeps each task's valid steps in their stored order, then its padding
        index = th.argsort((~valid).to(th.int8), dim=1, stable=True)[:, :n_packed]
        return RowPacking(index, masks.gather(1, index), masks.shape[1])

    def pack(self, values: th.Tensor) -> th.Tensor:
        """:return: ``values`` (B, E*H, ...) at the packed rows (B, K, ...)"""
        index = self.index.reshape(*self.index.shape, *[1] * (values.dim() - 2)).expand(-1, -1, *values.shape[2:])
        return values.gather(1, index)

    def unpack(self, values: th.Tensor) -> th.Tensor:
        """:return: per-row values (B, K) at their stored rows (B, E*H), zero at every padding step"""
        return values.new_zeros(values.shape[0], self.n_rows).scatter(1, self.index, values * self.masks)
