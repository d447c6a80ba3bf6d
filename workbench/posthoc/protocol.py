"""The post-hoc protocol, scikit-learn's: a model fitted after training is built with its
settings, ``fit(...)`` learns from held-out data and returns ``self``, what it learned sits in
attributes ending in ``_``, ``apply(...)`` uses it, and ``to_dict()`` / ``from_dict(d)`` are
its record in the bundle.

Follow it: :class:`~workbench.posthoc.conformal.ConformalSets`,
:class:`~workbench.posthoc.conformal.MultiLabelConformal`,
:class:`~workbench.posthoc.ood.HeaderProfile` and :class:`~workbench.posthoc.ood.OODDetector`
(whose arrays travel beside its record). Not yet: the calibration maps (fitted by
``fit_calibration`` and friends, applied by ``apply_calibration``) and the similar-case index
(built from its embeddings, saved as an array file).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, Self, runtime_checkable


@runtime_checkable
class PostHocModel(Protocol):
    """What every post-hoc model offers (see the module docstring)."""

    def fit(self, *args: Any, **kwargs: Any) -> Self: ...

    def apply(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], /) -> Self: ...
