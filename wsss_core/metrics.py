"""Segmentation metrics: a (C+1)-class confusion matrix accumulated over a whole split.

mIoU is the mean over classes present in the ground truth **or** the prediction of the split
(classes absent from both are NaN and left out), computed from the summed confusion matrix, not
averaged per image. Pixels whose target is ``ignore_index`` are not counted.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    a = np.asarray(x)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # a decoded PNG is read-only


class ConfusionMatrix:
    """Confusion matrix over ``num_classes`` labels (background included).

    Args:
        num_classes: number of labels, e.g. 21 for VOC (background + 20).
        ignore_index: target value that is not scored.

    ``matrix[t, p]`` counts pixels of target ``t`` predicted as ``p`` (int64, on the CPU).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Accumulate a prediction against its target; both integer, any equal shape.

        Raises:
            ValueError: shapes differ, or a non-ignored value is outside ``[0, num_classes)``.
        """
        p = _as_tensor(pred).reshape(-1).to(torch.int64)
        t = _as_tensor(target).reshape(-1).to(torch.int64)
        if p.shape != t.shape:
            raise ValueError(f"pred and target sizes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        keep = t != self.ignore_index
        p, t = p[keep], t[keep]
        n = self.num_classes
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"target has labels outside [0, {n}): {sorted(set(t.unique().tolist()) - set(range(n)))}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n):
            raise ValueError(f"prediction has labels outside [0, {n}) on scored pixels")
        counts = torch.bincount((t * n + p).cpu(), minlength=n * n)
        self.matrix += counts.reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix (e.g. from another worker) into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class matrix")
        self.matrix += other.matrix
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU, float64 [num_classes]; NaN where a class is in neither target nor prediction."""
        m = self.matrix.to(torch.float64)
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        """Mean IoU over the classes that appear in target or prediction."""
        return float(torch.nanmean(self.iou()))

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float(self.matrix.diag().sum()) / total if total else float("nan")

    def to_list(self) -> list[list[int]]:
        return self.matrix.tolist()

    @classmethod
    def from_list(cls, rows: list[list[int]], ignore_index: int = 255) -> ConfusionMatrix:
        cm = cls(len(rows), ignore_index)
        cm.matrix = torch.tensor(rows, dtype=torch.int64)
        return cm
