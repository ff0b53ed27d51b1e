"""The benchmarks' statistics: percentiles of one run's samples and medians over repeated runs.

One definition for every benchmark, so a "p99" means the same thing in every table: numpy's
default (linear interpolation between the closest ranks), and ``None`` -- never a made-up
zero -- when there are no samples. Medians over repeats skip the runs that measured nothing
(``None``) and NaN. numpy is imported when a statistic is computed, not when this module is:
the child processes of ``bench.hops`` import the benchmark module and must not pay for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def pct(values: Any, q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` (a sequence or numpy array), or None when empty."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else None


def percentiles(values: Any, qs: Iterable[float]) -> dict[str, float | None]:
    """``{"p50": ..., "p99": ..., "max": ...}`` for each ``q`` in ``qs`` and the maximum; all None when empty."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    qs = tuple(qs)
    if arr.size == 0:
        return {f"p{q:g}": None for q in qs} | {"max": None}
    out: dict[str, float | None] = {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}
    out["max"] = float(arr.max())
    return out


def med(values: Iterable[Any]) -> float | None:
    """The median of ``values`` over repeated runs, skipping None and NaN; None when nothing is left."""
    import numpy as np

    vals = [v for v in values if v is not None and v == v]
    return float(np.median(vals)) if vals else None
