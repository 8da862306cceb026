"""Pipelines: parse op specs, compose ops, and cut a pipeline into stages the tiler can run.

A spec is ``NAME`` or ``NAME:key=value,key=value``; a pipeline is a list of specs applied in
order.  The same pipeline travels as JSON: ``[{"op": "gaussian_blur", "params": {"ksize": 9}}]``.

``Pipeline.stages()`` groups steps so that each stage can be run tile by tile and give exactly
the whole-image result:

* ``TiledStage``  — a run of point and neighbourhood ops; its halo is the sum of their radii.
* ``ReduceStage`` / ``ApplyStage`` — the two phases of a global op with a statistic
  (per-tile histograms are summed, then applied per tile).
* ``ViewStage``   — crop, flip and quarter turns: a NumPy view made where the image is.
* ``WholeStage``  — ops that need the whole image at once (Canny, resize, rotate by an angle
  that is no quarter turn): one tile.
* ``ChainStage``  — from ``stages_for(shape)`` only: views, tiled ops, resizes and rotations
  fused into one tiled pass, each output strip computed from its exact input window
  (:mod:`mpi_imgproc.chain`).

Every stage has ``process(pixels) -> pixels`` and a JSON form, which is what engines, worker
processes and MPI ranks receive.

``Pipeline.output_shapes(shape)`` tells every step's output shape without running anything, and
``Pipeline.check_pixel_limit(shape, max_pixels)`` refuses an input with more pixels than a
limit, or a pipeline one of whose steps would output more, before any of that memory is spent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImgprocError, InvalidPipeline, LimitExceeded
from .ops import Op, apply_table, canonical_shape, check_image, get_op


def check_pixel_limit(shape: Sequence[int], max_pixels: int, what: str = "") -> None:
    """Raise LimitExceeded if an image of ``shape`` has more than ``max_pixels`` pixels (H·W).

    The message gives the size as width x height, preceded by ``what`` when given (``"input"``,
    ``"resize: output"``): ``"resize: output 60000x60000 has more than the server's limit of
    400000000 pixels (--max-pixels)"``.
    """
    height, width = int(shape[0]), int(shape[1])
    if height * width > max_pixels:
        name = f"{what} " if what else ""
        raise LimitExceeded(
            f"{name}{width}x{height} has more than the server's limit of {max_pixels} pixels "
            "(--max-pixels)"
        )


@dataclass(frozen=True)
class Step:
    """One op with its validated parameters."""

    op: Op
    params: Mapping[str, Any]

    @classmethod
    def create(cls, name: str, raw: Mapping[str, Any] | None = None) -> Step:
        """Look up ``name`` and validate ``raw`` parameters."""
        op = get_op(name)
        return cls(op, op.bind(raw))

    @property
    def halo(self) -> int:
        """Pixels of real neighbours each tile edge needs for this step."""
        return self.op.halo(self.params) if self.op.tileable else 0

    @property
    def is_view(self) -> bool:
        """Whether the step only re-indexes pixels: crop, flip, a quarter turn."""
        return self.op.is_view(self.params)

    def run(self, image: np.ndarray) -> np.ndarray:
        """Apply the step to an image or tile."""
        return self.op.run(image, self.params)

    def to_json(self) -> dict[str, Any]:
        """``{"op": name, "params": {...}}`` with every parameter spelled out."""
        return {"op": self.op.name, "params": dict(self.params)}

    def spec(self) -> str:
        """The step as a ``NAME:key=value`` string."""
        given = ",".join(f"{k}={v}" for k, v in self.params.items() if v is not None)
        return f"{self.op.name}:{given}" if given else self.op.name


def parse_spec(spec: str) -> Step:
    """Parse ``NAME`` or ``NAME:key=value,key=value`` into a validated step."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise InvalidPipeline(f"empty op spec {spec!r}")
    raw: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidPipeline(f"{name}: expected key=value, got {item!r} in spec {spec!r}")
        raw[key.strip()] = value.strip()
    return Step.create(name, raw)


class Pipeline:
    """An ordered list of steps, applied whole or cut into stages for tiling."""

    def __init__(self, steps: Iterable[Step]):
        self.steps: tuple[Step, ...] = tuple(steps)
        if not self.steps:
            raise InvalidPipeline("a pipeline needs at least one op")

    @classmethod
    def parse(cls, specs: Sequence[str]) -> Pipeline:
        """Build from ``--op`` strings, in order."""
        return cls(parse_spec(s) for s in specs)

    @classmethod
    def from_json(cls, data: Any) -> Pipeline:
        """Build from a JSON list whose items are spec strings or ``{"op", "params"}`` objects."""
        if isinstance(data, Mapping) and "ops" in data:
            data = data["ops"]
        if not isinstance(data, list):
            raise InvalidPipeline("a JSON pipeline must be a list of ops (or {'ops': [...]})")
        steps = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                steps.append(parse_spec(item))
            elif isinstance(item, Mapping) and isinstance(item.get("op"), str):
                params = item.get("params", {})
                if not isinstance(params, Mapping):
                    raise InvalidPipeline(f"pipeline item {i}: 'params' must be an object")
                steps.append(Step.create(item["op"], params))
            else:
                raise InvalidPipeline(
                    f"pipeline item {i}: expected a spec string or {{'op': NAME, 'params': {{}}}}"
                )
        return cls(steps)

    @classmethod
    def load(cls, path: str | Path) -> Pipeline:
        """Read a JSON pipeline file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidPipeline(f"pipeline file {path}: {exc}") from None
        return cls.from_json(data)

    def to_json(self) -> list[dict[str, Any]]:
        """The pipeline as a JSON-ready list (the protocol's form)."""
        return [s.to_json() for s in self.steps]

    def __repr__(self) -> str:
        return "Pipeline(" + " | ".join(s.spec() for s in self.steps) + ")"

    @property
    def halo(self) -> int:
        """Largest halo any tiled stage needs."""
        return max((s.halo for s in self.stages if isinstance(s, TiledStage)), default=0)

    def output_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """The shape after each step for an input of ``shape``, computed without running anything.

        One shape per step, in order, each canonical as ``Op.output_shape`` gives it (the last is
        the pipeline's result).  Raises what that step would raise for parameters that do not
        fit its input (a crop outside the image) and UnsupportedImage for a shape that is no
        image.
        """
        shapes = []
        current = canonical_shape(tuple(shape))
        for step in self.steps:
            current = step.op.output_shape(current, step.params)
            shapes.append(current)
        return shapes

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the pipeline's result for an input of ``shape`` (see ``output_shapes``)."""
        return self.output_shapes(shape)[-1]

    def check_pixel_limit(self, shape: Sequence[int], max_pixels: int) -> None:
        """Raise LimitExceeded if the input or any step's output has more than ``max_pixels``.

        Pixels are H·W (channels do not count).  The input is checked first, then the steps in
        order; the first one over the limit is named in the message with its output size, e.g.
        ``"resize: output 60000x60000 has more than the server's limit of 400000000 pixels
        (--max-pixels)"`` (``"input 30000x30000 ..."`` for the input).  Only LimitExceeded is
        raised: a step whose output shape cannot be known (its parameters do not fit, or the
        shape is no image) ends the check there, and running the pipeline reports that error.
        """
        check_pixel_limit(shape, max_pixels, "input")
        try:
            current = canonical_shape(tuple(shape))
        except ImgprocError:
            return
        for step in self.steps:
            try:
                current = step.op.output_shape(current, step.params)
            except ImgprocError:
                return
            check_pixel_limit(current, max_pixels, f"{step.op.name}: output")

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The reference: every op on the whole image, in one process, in order."""
        check_image(image)
        for step in self.steps:
            image = step.run(image)
        return image

    def stages_for(self, shape: Sequence[int]) -> tuple[Stage, ...]:
        """The stages for an input of ``shape``: as ``stages``, except that runs of views,
        tiled ops, resizes and rotations that contain a resize or a rotation by an angle that is
        no quarter turn, or a view and a tiled op, become one
        :class:`~mpi_imgproc.chain.ChainStage` each — a single tiled pass in which no step runs
        on the whole image (whether a resize or a rotation can join depends on its sizes and
        modes, see :mod:`mpi_imgproc.chain`)."""
        from .chain import ChainStage, chainable

        try:
            shapes = [canonical_shape(tuple(shape)), *self.output_shapes(shape)]
        except ImgprocError:  # parameters that do not fit: running says so, in step order
            return self.stages
        stages: list[Stage] = []
        run: list[Step] = []
        start = 0

        def close() -> None:
            has = {("view" if s.is_view else "tiled" if s.op.tileable else "resample")
                   for s in run}  # fmt: skip
            if "resample" in has or {"view", "tiled"} <= has:
                stages.append(ChainStage(tuple(run), shapes[start]))
            elif run:
                stages.extend(Pipeline(run).stages)
            run.clear()

        for i, step in enumerate(self.steps):
            if chainable(step, shapes[i], run):
                if not run:
                    start = i
                run.append(step)
                continue
            close()
            if chainable(step, shapes[i]):  # a quarter turn that starts a new chain
                start = i
                run.append(step)
            else:
                stages.extend(Pipeline([step]).stages)
        close()
        return tuple(stages)

    @cached_property
    def stages(self) -> tuple[Stage, ...]:
        """The steps grouped into stages that tile exactly (see the module docstring)."""
        stages: list[Stage] = []
        run: list[Step] = []
        for step in self.steps:
            if step.op.tileable:
                run.append(step)
                continue
            if run:
                stages.append(TiledStage(tuple(run)))
                run = []
            if step.is_view:
                stages.append(ViewStage(step))
            elif step.op.two_phase:
                stages.append(ReduceStage(step))
            else:
                stages.append(WholeStage((step,)))
        if run:
            stages.append(TiledStage(tuple(run)))
        return tuple(stages)


def crop_halo(result: np.ndarray, margins: Sequence[int]) -> np.ndarray:
    """Cut the halo off a region's result (a view)."""
    top, bottom, left, right = margins
    if not any(margins):
        return result
    h, w = result.shape[:2]
    return result[top : h - bottom, left : w - right]


class Stage:
    """A unit of tiled work: ``process`` maps one tile's pixels to its result."""

    halo = 0
    whole = False  # True: run on the whole image as one tile
    full_rows = False  # True: tiles must span whole rows (strips), see Op.full_rows

    def process(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run_tile(self, pixels: np.ndarray, margins: Sequence[int]) -> np.ndarray:
        """One tile: its region's result with the halo (``margins``) cut off.  A chain
        (:mod:`mpi_imgproc.chain`) maps its region to an output box of another size, and its
        ``margins`` are that placement."""
        return crop_halo(self.process(pixels), margins)

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class TiledStage(Stage):
    """Point and neighbourhood steps run back to back on a tile with their summed halo."""

    steps: tuple[Step, ...]

    @property
    def halo(self) -> int:  # type: ignore[override]
        return sum(s.halo for s in self.steps)

    @property
    def full_rows(self) -> bool:  # type: ignore[override]
        return any(s.op.full_rows for s in self.steps)

    def process(self, pixels: np.ndarray) -> np.ndarray:
        for step in self.steps:
            pixels = step.run(pixels)
        return pixels

    def to_json(self) -> dict[str, Any]:
        return {"stage": "tiled", "steps": [s.to_json() for s in self.steps]}


@dataclass(frozen=True)
class WholeStage(TiledStage):
    """Steps that need the whole image at once: run as a single tile."""

    whole = True

    @property
    def halo(self) -> int:  # type: ignore[override]
        return 0

    def to_json(self) -> dict[str, Any]:
        return {"stage": "whole", "steps": [s.to_json() for s in self.steps]}


@dataclass(frozen=True)
class ViewStage(Stage):
    """Crop, flip or a quarter turn: a view of the same pixels, made where the image is.

    It costs no task and no copy, and never runs on the whole image as a stage of its own:
    the next stage's tiles read through the view (a tile region is copied only when it is
    sent), so ``crop -> sharpen`` cuts the crop's tiles straight from the source.
    """

    step: Step

    def process(self, pixels: np.ndarray) -> np.ndarray:
        self.step.op.check_image(pixels)
        assert self.step.op.view is not None and self.step.is_view
        if pixels.ndim == 3 and pixels.shape[2] == 1:  # shaped as OpenCV's kernel shapes it
            return self.step.run(pixels)
        return self.step.op.view(pixels, **self.step.params)

    def to_json(self) -> dict[str, Any]:
        return {"stage": "view", "steps": [self.step.to_json()]}


@dataclass(frozen=True)
class ReduceStage(Stage):
    """Phase one of a global op: each tile yields a statistic; statistics are summed."""

    step: Step

    def process(self, pixels: np.ndarray) -> np.ndarray:
        self.step.op.check_image(pixels)
        return self.step.op.reduce(pixels)

    def applier(self, statistic: np.ndarray) -> ApplyStage:
        """Phase two, with the summed statistic."""
        return ApplyStage(self.step, np.asarray(statistic, dtype=np.int64))

    def to_json(self) -> dict[str, Any]:
        return {"stage": "reduce", "steps": [self.step.to_json()]}


@dataclass(frozen=True, eq=False)
class ApplyStage(Stage):
    """Phase two of a global op: apply the whole image's statistic to each tile."""

    step: Step
    statistic: np.ndarray

    @cached_property
    def table(self) -> np.ndarray:
        """The lookup table made once from the statistic, then shared by every tile."""
        return self.step.op.table(self.statistic, **self.step.params)

    def process(self, pixels: np.ndarray) -> np.ndarray:
        self.step.op.check_image(pixels)
        return apply_table(pixels, self.table)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": "apply",
            "steps": [self.step.to_json()],
            "statistic": self.statistic.tolist(),
        }


def stage_from_json(data: Mapping[str, Any]) -> Stage:
    """Rebuild a stage sent to a worker process or rank (parameters are re-validated)."""
    try:
        steps = tuple(Step.create(s["op"], s.get("params")) for s in data["steps"])
        kind = data["stage"]
    except (KeyError, TypeError) as exc:
        raise InvalidPipeline(f"malformed stage description: {exc}") from None
    if kind == "tiled":
        return TiledStage(steps)
    if kind == "whole":
        return WholeStage(steps)
    if kind == "reduce":
        return ReduceStage(steps[0])
    if kind == "view":
        return ViewStage(steps[0])
    if kind == "apply":
        return ApplyStage(steps[0], np.asarray(data["statistic"], dtype=np.int64))
    if kind == "chain":
        from .chain import ChainStage

        shape = data.get("shape")
        if not isinstance(shape, list) or not all(type(v) is int and v > 0 for v in shape):
            raise InvalidPipeline("malformed stage description: 'shape' must be positive ints")
        return ChainStage(steps, tuple(shape))
    raise InvalidPipeline(f"unknown stage kind {kind!r}")


@lru_cache(maxsize=256)
def stage_from_text(text: str) -> Stage:
    """``stage_from_json`` of a JSON string, cached: many tiles share one stage."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidPipeline(f"malformed stage description: {exc}") from None
    return stage_from_json(data)
