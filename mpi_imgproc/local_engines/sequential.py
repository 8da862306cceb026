"""The reference engine: one tile after another in the calling thread."""

from __future__ import annotations

from .base import Engine


class SequentialEngine(Engine):
    """Processes tiles one at a time on one core; the baseline other engines are measured by."""

    name = "sequential"

    def __init__(self, workers: int | None = None):
        super().__init__(1)
