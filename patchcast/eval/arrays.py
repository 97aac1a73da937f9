"""The array aliases every evaluation module types its numpy data with."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.integer[Any]]

__all__ = ["BoolArray", "FloatArray", "IntArray"]
