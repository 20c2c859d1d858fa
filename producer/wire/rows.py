"""Rows of several requests as one tensor and back: the first dimension is rows. Pure.

The client packs calls into one request with these (``producer.client.coalesce``), and the worker packs
requests into one model run (``worker.pipelines.tensor``): the same operation on both sides of the queue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Arrays = dict[str, npt.NDArray[Any]]


def concat_rows(parts: Sequence[Mapping[str, npt.NDArray[Any]]]) -> Arrays:
    """Concatenate named arrays along the first dimension (no copy for a single part)."""
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def split_rows(outputs: Mapping[str, npt.NDArray[Any]], rows: Sequence[int]) -> list[Arrays]:
    """Split named arrays back into one dict per part, by each part's row count.

    Raises:
        ValueError: when an array's first dimension is not the parts' total rows.
    """
    total = sum(rows)
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise ValueError(f"output {name!r} has shape {list(value.shape)}, expected first dimension {total}")
    if len(rows) == 1:
        return [dict(outputs)]
    bounds = np.cumsum(rows)[:-1]
    pieces = {name: np.split(value, bounds) for name, value in outputs.items()}
    return [{name: pieces[name][i] for name in outputs} for i in range(len(rows))]
