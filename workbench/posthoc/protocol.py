"""The post-hoc protocol, scikit-learn's: a model fitted after training is built with its
settings, ``fit(...)`` learns from held-out data and returns ``self``, what it learned sits in
attributes ending in ``_``, ``apply(...)`` uses it, and ``to_dict()`` / ``from_dict(d)`` are
its record in the bundle.

Follow it: the calibrators (:class:`~workbench.posthoc.calibration.Calibrator`,
:class:`~workbench.posthoc.calibration.LabelCalibrator`,
:class:`~workbench.posthoc.site_calibration.SiteCalibrator`, whose learned ``map_`` is the
plain-data map a bundle stores), :class:`~workbench.posthoc.conformal.ConformalSets`,
:class:`~workbench.posthoc.conformal.MultiLabelConformal`,
:class:`~workbench.posthoc.ood.HeaderProfile`, :class:`~workbench.posthoc.ood.OODDetector` and
:class:`~workbench.posthoc.similar.EmbeddingIndex` (the last two keep their arrays beside
their record: ``arrays()`` and ``from_dict(d, arrays)``).
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
