"""Operating points chosen on the calibration split, from calibrated probabilities."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve


def youden_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per label, the probability threshold maximising Youden's J (sensitivity + specificity
    - 1) on (n, K) probabilities and 0/1 targets; 0.5 where a label is absent or constant."""
    out = []
    for j in range(probs.shape[1]):
        yj = np.asarray(targets)[:, j]
        if yj.min() == yj.max():
            out.append(0.5)
            continue
        fpr, tpr, thr = roc_curve(yj, probs[:, j])
        best = int(np.argmax(tpr - fpr))
        out.append(float(np.clip(thr[best], 0.0, 1.0)))
    return out
