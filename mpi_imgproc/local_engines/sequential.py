"""The reference engine: one tile after another in the calling thread."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..pipeline import Stage
from ..tiling import Box
from .base import Engine, process_tile


class SequentialEngine(Engine):
    """Processes tiles one at a time on one core; the baseline other engines are measured by."""

    name = "sequential"

    def __init__(self, workers: int | None = None):
        super().__init__(1)

    def run(
        self, stage: Stage, pieces: Sequence[np.ndarray], margins: Sequence[Box]
    ) -> list[np.ndarray]:
        return [process_tile(stage, p, m) for p, m in zip(pieces, margins)]
