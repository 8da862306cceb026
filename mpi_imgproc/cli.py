"""The ``mpi-imgproc`` command line.

Sub-commands: ``ops`` (list ops), ``run`` (the local reference, in this process), the cluster
client commands of :mod:`mpi_imgproc.client_cli` (``submit``, ``status``, ``cancel``, ``info``,
``keys``), ``gen-dataset`` (:mod:`mpi_imgproc.dataset`), ``verify``
(:mod:`mpi_imgproc.verify`), ``bench`` (:mod:`mpi_imgproc.bench`), ``compare``
(:mod:`mpi_imgproc.compare`) and ``web`` (:mod:`mpi_imgproc.web`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .bench import add_bench_command
from .client_cli import add_client_commands
from .dataset import add_dataset_command
from .errors import ImgprocError, describe
from .imageio import FORMATS, expand_inputs, output_path, read_image, write_image
from .local_engines import ENGINES, get_engine
from .ops import REGISTRY
from .pipeline import Pipeline
from .tiling import run_pipeline
from .web.command import add_web_command


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """``--op SPEC`` (repeatable, in order) and ``--pipeline FILE``."""
    parser.add_argument(
        "--op",
        action="append",
        default=[],
        metavar="SPEC",
        help="an op as NAME or NAME:key=value,...; repeat to chain (see `mpi-imgproc ops`)",
    )
    parser.add_argument("--pipeline", metavar="FILE", help="a JSON pipeline file instead of --op")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``-o OUTDIR`` and ``--format``."""
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUTDIR", help="folder of the outputs"
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="same", help="output format (same: as the input)"
    )


def pipeline_from_args(args: argparse.Namespace) -> Pipeline:
    """The pipeline named by ``--op`` flags or ``--pipeline``; exactly one of them."""
    if args.pipeline and args.op:
        raise ImgprocError("give --op flags or --pipeline, not both")
    if args.pipeline:
        return Pipeline.load(args.pipeline)
    if not args.op:
        raise ImgprocError("no op given: add --op NAME (see `mpi-imgproc ops`)")
    return Pipeline.parse(args.op)


def output_paths(files: Sequence[str], outdir: str, fmt: str) -> list[Path]:
    """Output path per input; two inputs writing the same output is an error."""
    paths = [output_path(f, outdir, fmt) for f in files]
    seen: dict[Path, str] = {}
    for source, path in zip(files, paths):
        if path in seen:
            raise ImgprocError(f"{seen[path]} and {source} would both be written to {path}")
        seen[path] = source
    return paths


def refuse_overwriting_inputs(files: Sequence[str], targets: Sequence[Path]) -> None:
    """ImgprocError naming the first output that is one of the inputs, before anything runs.

    Outputs are compared with every input by real path (symbolic links resolved) and, for
    outputs that exist already, by device and inode too (the same folder through another
    mount), so that ``-o`` naming the input folder with the same format cannot replace the
    originals.
    """
    by_path = {os.path.realpath(f): f for f in files}
    by_inode = {}
    for f in files:
        with contextlib.suppress(OSError):
            st = os.stat(f)
            by_inode[st.st_dev, st.st_ino] = f
    for target in targets:
        source = by_path.get(os.path.realpath(target))
        if source is None:
            with contextlib.suppress(OSError):
                st = os.stat(target)
                source = by_inode.get((st.st_dev, st.st_ino))
        if source is not None:
            raise ImgprocError(
                f"output {target} is the input {source}: writing it would replace the "
                "original; choose another output folder or --format"
            )


def cmd_ops(args: argparse.Namespace) -> int:
    """Print every op with its class, halo and parameters (``--json`` for machines)."""
    described = [op.describe() for op in REGISTRY.values()]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for d in described:
        halo = d["halo_at_defaults"]
        where = f"halo {halo} at defaults" if halo is not None else "whole-image statistic"
        if d["class"] == "geometric" or (d["class"] == "global" and not d["tiled"]):
            where = "runs on the whole image"
        print(f"{d['name']:<20} {d['class']:<14} {where}")
        print(f"    {d['doc']}")
        for p in d["params"]:
            extra = f" one of {', '.join(map(str, p['choices']))}" if "choices" in p else ""
            rng = ""
            if "minimum" in p or "maximum" in p:
                rng = f" [{p.get('minimum', '')}..{p.get('maximum', '')}]"
            if p.get("odd"):
                rng += " odd"
            print(f"    {p['name']}={p['default']} ({p['type']}{rng}{extra}): {p['doc']}")
        print(f"    depths: {', '.join(d['depths'])}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Process files in this process: the local reference the cluster is compared against."""
    pipeline = pipeline_from_args(args)
    args.files = expand_inputs(args.files)
    if not args.files:
        raise ImgprocError("no input files (check the paths, folders or globs)")
    outputs = output_paths(args.files, args.output, args.format)
    refuse_overwriting_inputs(args.files, outputs)
    failed = 0
    started = time.perf_counter()
    with get_engine(args.engine, args.workers) as engine:
        for source, target in zip(args.files, outputs):
            try:
                image = read_image(source)
                write_image(target, run_pipeline(pipeline, image, engine, args.tile))
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the rest
                failed += 1
                print(f"error: {source}: {describe(exc)}", file=sys.stderr)
    done = len(args.files) - failed
    elapsed = time.perf_counter() - started
    print(f"{done} of {len(args.files)} images written to {args.output} in {elapsed:.2f} s")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``mpi-imgproc`` parser."""
    parser = argparse.ArgumentParser(
        prog="mpi-imgproc", description="Exact, tiled image processing on an MPI cluster."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ops = sub.add_parser("ops", help="list the ops, their classes, halos and parameters")
    ops.add_argument("--json", action="store_true", help="print a JSON list")
    ops.set_defaults(func=cmd_ops)

    run = sub.add_parser("run", help="process files in this process (the local reference)")
    run.add_argument("files", nargs="+", metavar="FILE", help="files, folders or globs")
    run.add_argument(
        "--local", action="store_true", help="accepted for compatibility: run is always local"
    )
    add_output_options(run)
    add_pipeline_options(run)
    run.add_argument("--engine", choices=ENGINES, default="threads", help="local engine")
    run.add_argument("--tile", type=int, default=0, help="tile size in pixels; 0: whole image")
    run.add_argument("--workers", type=int, default=None, help="engine workers (default: cores)")
    run.set_defaults(func=cmd_run)

    add_client_commands(sub)
    for command in sub.choices.values():
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    add_bench_command(sub)
    from .verify import add_verify_command  # here: verify builds on this module's options

    add_dataset_command(sub)
    add_verify_command(sub)
    add_web_command(sub)
    from .compare import add_compare_command  # here: compare builds on this module's options

    add_compare_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpi-imgproc`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ImgprocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `mpi-imgproc ops | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
