"""Numbers as the workbench writes them to JSON: rounded, finite, plain Python types, sorted
keys. Reports, comparisons and consistency records share these so their files agree."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

DECIMALS = 6


def normalise(value: Any, decimals: int = DECIMALS) -> Any:
    """JSON-ready: floats rounded to ``decimals``, NaN / inf as None, tuples and arrays as
    lists, numpy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): normalise(v, decimals) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [normalise(v, decimals) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return round(v, decimals) if math.isfinite(v) else None
    return value


def dump_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
