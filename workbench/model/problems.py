"""What is being learned: binary, multi-class, one-vs-rest or multi-label classification.

A study's label in the catalog is a string; several findings are joined with ``;``
(``nodule;effusion``) and a negative name (``normal``, ``no_finding``...) stands for the empty
set. The problem decides the output layer's meaning and the loss:

* ``binary`` / ``multiclass``: one label per study, softmax over K classes, cross-entropy
  (class-weighted by inverse frequency when ``--balance weights``).
* ``ovr``: one label per study, K independent sigmoids over the mutually exclusive classes,
  binary cross-entropy on the one-hot target; each class is its own detector.
* ``multilabel``: any number of findings per study, K sigmoids over the findings (the negative
  name is not a class: it is all zeros), binary cross-entropy with ``pos_weight`` = negatives /
  positives per finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.model.distributed import World, all_sum

PROBLEMS: tuple[str, ...] = ("auto", "binary", "multiclass", "ovr", "multilabel")
SIGMOID_PROBLEMS = frozenset({"ovr", "multilabel"})
NEGATIVE_NAMES = ("normal", "no_lesion", "negative", "no_finding")
LABEL_SEPARATOR = ";"


class ProblemError(WorkbenchError, ValueError):
    """Labels that do not fit the asked problem (e.g. two findings in a multi-class run)."""


def parse_label(label: str | None) -> tuple[str, ...]:
    """``"nodule;effusion"`` -> ("effusion", "nodule"); a negative name -> (); sorted, unique."""
    parts = {p.strip() for p in (label or "").split(LABEL_SEPARATOR) if p.strip()}
    return tuple(sorted(p for p in parts if p.lower() not in NEGATIVE_NAMES))


def is_negative(label: str | None) -> bool:
    return (label or "").strip().lower() in NEGATIVE_NAMES


@dataclass(frozen=True)
class Problem:
    """The resolved problem: its kind, the output classes (one per logit) and the negative
    name (the softmax class meaning "no finding", or the name of the empty set)."""

    kind: str
    classes: tuple[str, ...]
    negative: str | None

    @property
    def sigmoid(self) -> bool:
        return self.kind in SIGMOID_PROBLEMS

    def target(self, label: str | None) -> int | np.ndarray:
        """A study label as the loss wants it: a class index (softmax) or a (K,) 0/1 vector."""
        if not self.sigmoid:
            return self.classes.index(label) if label in self.classes else -1
        y = np.zeros(len(self.classes), dtype=np.float32)
        names = (label,) if self.kind == "ovr" else parse_label(label)
        for name in names:
            if name in self.classes:
                y[self.classes.index(name)] = 1.0
        return y

    def decide(self, probs: np.ndarray, thresholds: Sequence[float] | None) -> str:
        """The predicted label of one study from its (K,) probabilities.

        Softmax and one-vs-rest: the most probable class (the classes exclude each other).
        Multi-label: every finding at or above its threshold, joined with ``;``; none: the
        negative name.
        """
        if self.kind != "multilabel":
            return self.classes[int(np.argmax(probs))]
        t = thresholds if thresholds is not None else [0.5] * len(self.classes)
        found = [c for c, p, th in zip(self.classes, probs, t, strict=True) if p >= th]
        return LABEL_SEPARATOR.join(found) if found else (self.negative or "")


def resolve_problem(kind: str, raw_labels: Sequence[str | None]) -> Problem:
    """The problem for a cohort's study labels; ``auto`` is multi-label when any study has
    more than one finding, otherwise binary (two classes) or multi-class."""
    if kind not in PROBLEMS:
        raise ProblemError(f"--problem must be one of {', '.join(PROBLEMS)}, not {kind!r}")
    labels = [lab for lab in raw_labels if lab]
    multi = any(len(parse_label(lab)) > 1 for lab in labels)
    if kind == "auto":
        kind = "multilabel" if multi else "multiclass"
    if multi and kind != "multilabel":
        raise ProblemError(
            f"some studies have several labels: use --problem multilabel, not {kind}"
        )
    negatives = sorted({lab.strip() for lab in labels if is_negative(lab)})
    if kind == "multilabel":
        classes = tuple(sorted({c for lab in labels for c in parse_label(lab)}))
        if not classes:
            raise ProblemError("no study has a finding; nothing to learn")
        return Problem(kind, classes, negatives[0] if negatives else "no_finding")
    classes = tuple(sorted({lab for lab in labels if lab}))
    if len(classes) < 2:
        raise ProblemError(f"only one class ({classes[0] if classes else 'none'})")
    if kind == "multiclass" and len(classes) == 2:
        kind = "binary"  # the same softmax, named for what it is
    if kind == "binary" and len(classes) != 2:
        raise ProblemError(f"--problem binary needs 2 classes, the cohort has {len(classes)}")
    negative = next((c for c in classes if c.lower() in NEGATIVE_NAMES), None)
    return Problem(kind, classes, negative)


class Objective(nn.Module):
    """The training loss, normalised over the *global* batch.

    Returns ``sum_i w_i l_i / sum_i w_i`` over every rank's share of the batch, multiplied by
    the world size because DistributedDataParallel averages gradients over ranks: N ranks
    then take the step one process takes on the whole batch. ``w_i`` is the class weight of
    sample i (softmax) or 1 (sigmoid; imbalance is handled by ``pos_weight`` inside l_i).

    logits: (B, K); target: (B,) class indices or (B, K) 0/1 floats.
    """

    def __init__(
        self,
        problem: Problem,
        class_weight: torch.Tensor | None = None,
        pos_weight: torch.Tensor | None = None,
        world: World | None = None,
    ) -> None:
        super().__init__()
        self.sigmoid = problem.sigmoid
        self.world = world or World()
        self.class_weight: torch.Tensor | None
        self.pos_weight: torch.Tensor | None
        self.register_buffer("class_weight", class_weight)
        self.register_buffer("pos_weight", pos_weight)

    def describe(self, classes: Sequence[str]) -> dict[str, object]:
        """The loss as data, for the experiment record."""
        weights = self.pos_weight if self.sigmoid else self.class_weight
        name = "pos_weight" if self.sigmoid else "class_weight"
        return {
            "kind": "binary_cross_entropy_with_logits" if self.sigmoid else "cross_entropy",
            name: None if weights is None else dict(zip(classes, weights.tolist(), strict=True)),
        }

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.sigmoid:
            # (B, K) -> (B,): each study's loss is its mean over the K labels
            per = nn.functional.binary_cross_entropy_with_logits(
                logits, target.float(), pos_weight=self.pos_weight, reduction="none"
            ).mean(dim=1)
            w = torch.ones_like(per)
        else:
            per = nn.functional.cross_entropy(logits, target, reduction="none")
            w = self.class_weight[target] if self.class_weight is not None else torch.ones_like(per)
        total = all_sum(w.sum(), self.world)  # the global batch's weight, no gradient
        return (w * per).sum() / total * self.world.size


def make_objective(
    problem: Problem, targets: Sequence[int | np.ndarray], balance: str, world: World
) -> Objective:
    """The loss for ``problem`` with imbalance handled as ``balance`` asks.

    ``weights``: softmax classes weighted by inverse frequency; sigmoid labels get
    ``pos_weight = negatives / positives``. ``sampler`` / ``none``: unweighted (the sampler
    already balances what the network sees).
    """
    k = len(problem.classes)
    if problem.sigmoid:
        y = np.stack([np.asarray(t, dtype=np.float32) for t in targets])  # (N, K)
        pos = y.sum(axis=0)
        pw = (len(y) - pos) / np.maximum(pos, 1.0)
        pos_weight = torch.tensor(pw, dtype=torch.float) if balance == "weights" else None
        return Objective(problem, pos_weight=pos_weight, world=world)
    counts = np.bincount([int(t) for t in targets], minlength=k)
    cw = counts.sum() / np.maximum(counts, 1) / k
    class_weight = torch.tensor(cw, dtype=torch.float) if balance == "weights" else None
    return Objective(problem, class_weight=class_weight, world=world)


def validation_loss(problem: Problem, logits: np.ndarray, targets: np.ndarray) -> float:
    """Unweighted loss of (N, K) logits: cross-entropy or mean binary cross-entropy."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    y = torch.from_numpy(np.asarray(targets))
    if problem.sigmoid:
        return float(nn.functional.binary_cross_entropy_with_logits(z, y.float()))
    return float(nn.functional.cross_entropy(z, y.long()))


def sample_weights(problem: Problem, targets: Sequence[int | np.ndarray]) -> np.ndarray:
    """Per-sample draw weights for class-balanced sampling: every class (softmax) or every
    label combination (sigmoid) is drawn equally often in expectation."""
    keys = [
        tuple(np.asarray(t).astype(int).tolist()) if problem.sigmoid else int(t) for t in targets
    ]
    counts: dict[object, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return np.asarray([1.0 / counts[key] for key in keys], dtype=np.float64)
