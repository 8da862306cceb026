"""Turn bench samples into medians, fits, CSV, JSON, PNG plots and a Markdown report.

Nothing here measures: :mod:`mpi_imgproc.bench` produces a result (settings, machine, every
sample), and this module only reads it, so a saved ``samples.json`` can be re-reported.  The
arithmetic is in :mod:`mpi_imgproc.metrics`; the findings are sentences built from the measured
figures, with the reasons this project's design gives for them.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .metrics import (
    TiledWork,
    amdahl_fit,
    efficiency,
    fit_tile_model,
    gustafson_fit,
    karp_flatt,
    median,
    predict_tile_time,
    recommend_tile,
    speedup,
    throughput,
    tile_geometry,
)
from .pipeline import Pipeline, TiledStage

Row = dict[str, Any]

JOB_STAGES = ("queue", "decode", "split", "send", "compute", "receive", "merge", "encode")
STAGE_TIMES = [f"{stage}_s" for stage in JOB_STAGES]  # seconds, from the job's ``done`` stats
SAMPLE_COLUMNS = [
    "kind", "experiment", "engine", "op", "ranks", "workers", "workers_per_rank",
    "engine_workers", "cores_used", "oversubscribed", "in_flight", "tile", "height", "width",
    "images", "megapixels", "round", "wall_s", *STAGE_TIMES, "server_total_s", "tasks",
    "bytes_moved", "busy_max_s", "busy_mean_s", "maxrss_mb", "exact",
]  # fmt: skip
KEY_COLUMNS = [
    "kind", "experiment", "engine", "op", "ranks", "in_flight", "tile", "height", "width",
    "images",
]  # fmt: skip
STAGE_COLUMNS = [
    *STAGE_TIMES, "server_total_s", "busy_mean_s", "busy_max_s", "tasks", "bytes_moved",
    "maxrss_mb",
]  # fmt: skip
SUMMARY_COLUMNS = [
    *KEY_COLUMNS, "workers", "workers_per_rank", "engine_workers", "cores_used",
    "oversubscribed", "megapixels", "samples", "median_s", "min_s", "max_s", "reference_s",
    "speedup", "speedup_vs_opencv", "efficiency", "throughput_mp_s", "karp_flatt",
    *STAGE_COLUMNS,
]  # fmt: skip
PLOTS = (
    "speedup.png",
    "efficiency.png",
    "throughput_vs_tile.png",
    "stage_breakdown.png",
    "weak_scaling.png",
    "throughput_vs_size.png",
)


# -- medians, speedups and fits ---------------------------------------------------------------


def _workload(row: Row) -> tuple:
    return row["op"], row["height"], row["width"], row["images"]


def reference_medians(samples: Iterable[Row]) -> dict[tuple, dict[str, float]]:
    """Median seconds of each reference loop (``sequential``, ``opencv``) per op and workload."""
    times: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in samples:
        if row["kind"] == "reference":
            times[_workload(row)][row["engine"]].append(row["wall_s"])
    return {w: {name: median(t) for name, t in per.items()} for w, per in times.items()}


def summarise(samples: Sequence[Row]) -> list[Row]:
    """One row per case: medians, and speedup, efficiency and throughput against the
    sequential reference of the same op and images, measured in the same run."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in samples:
        groups[tuple(row.get(c, "") for c in KEY_COLUMNS)].append(row)
    refs = reference_medians(samples)
    return [_summary_row(rows, refs.get(_workload(rows[0]), {})) for rows in groups.values()]


def _summary_row(rows: list[Row], refs: dict[str, float]) -> Row:
    first = rows[0]
    walls = [r["wall_s"] for r in rows]
    out = {c: first.get(c, "") for c in KEY_COLUMNS}
    for c in ("workers", "workers_per_rank", "engine_workers", "cores_used", "oversubscribed"):
        out[c] = first[c]
    out.update(megapixels=first["megapixels"], samples=len(rows), median_s=median(walls))
    out.update(min_s=min(walls), max_s=max(walls), reference_s=refs.get("sequential"))
    for c in STAGE_COLUMNS:
        values = [r[c] for r in rows if r.get(c) not in (None, "")]
        out[c] = median(values) if values else None
    out.update(_ratios(out, refs))
    return out


def _ratios(row: Row, refs: dict[str, float]) -> Row:
    t = row["median_s"]
    seq, plain = refs.get("sequential"), refs.get("opencv")
    s = speedup(seq, t) if seq else None
    return {
        "speedup": s,
        "speedup_vs_opencv": speedup(plain, t) if plain else None,
        "efficiency": efficiency(s, row["cores_used"]) if s else None,
        "throughput_mp_s": throughput(row["megapixels"], t),
        "karp_flatt": karp_flatt(s, row["cores_used"]) if s and row["cores_used"] > 1 else None,
    }


def scaling_fits(summary: Sequence[Row]) -> list[Row]:
    """Amdahl's serial fraction per engine and op (strong), Gustafson's (weak)."""
    fits = []
    for experiment, fit in (("strong", amdahl_fit), ("weak", gustafson_fit)):
        groups: dict[tuple, list[Row]] = defaultdict(list)
        for row in _cluster(summary, experiment):
            groups[(row["engine"], row["op"])].append(row)
        for (engine, op), rows in groups.items():
            points = [(r["cores_used"], r["speedup"]) for r in rows if r["speedup"]]
            if not any(c > 1 for c, _ in points):
                continue
            f = fit([c for c, _ in points], [s for _, s in points])
            fits.append(_fit_row(experiment, engine, op, f, points))
    return fits


def _fit_row(experiment: str, engine: str, op: str, f: Any, points: list) -> Row:
    return {
        "experiment": experiment,
        "law": f.law,
        "engine": engine,
        "op": op,
        "serial_fraction": f.serial_fraction,
        "rmse": f.rmse,
        "cores_fitted": sorted({c for c, _ in points if c > 1}),
        "points": f.points,
        "limit": f.limit if f.law == "amdahl" and 0 < f.serial_fraction < 1 else None,
        "predicted": {str(n): f.predict(n) for n in (4, 16, 64)},
    }


def _cluster(summary: Iterable[Row], experiment: str) -> list[Row]:
    return [r for r in summary if r["kind"] == "cluster" and r["experiment"] == experiment]


# -- files ------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return round(value, 6) if isinstance(value, float) else value


def write_csv(rows: Iterable[Row], columns: Sequence[str], path: Path) -> Path:
    """Rows as CSV with a fixed column order (missing values empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
    return path


def write_json(data: Any, path: Path) -> Path:
    """Pretty JSON; infinities and NaN written as null, which JSON has no other word for."""
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")
    return path


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def write_all(result: Row, out: Path) -> list[Path]:
    """samples.csv, summary.csv, results.json, the plots and report.md, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(result["samples"])
    fits = scaling_fits(summary)
    written = [
        write_csv(result["samples"], SAMPLE_COLUMNS, out / "samples.csv"),
        write_csv(summary, SUMMARY_COLUMNS, out / "summary.csv"),
        write_json({**result, "summary": summary, "fits": fits}, out / "results.json"),
    ]
    plots = write_plots(summary, out)
    if result.get("job_stats"):  # one job of the largest cluster: utilisation and timeline
        plots += [p for p in plot_job_ranks(result["job_stats"], out) if p.suffix == ".png"]
    report = out / "report.md"
    report.write_text(markdown_report(result, summary, fits, [p.name for p in plots]))
    return written + plots + [report]


# -- plots -------------------------------------------------------------------------------------


RANKS = "mpiexec -n (ranks; rank 0 serves)"
RANKS_WEAK = "mpiexec -n (one image per worker rank)"


def write_plots(summary: list[Row], out: Path) -> list[Path]:
    """Every plot there is data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    strong, weak = _cluster(summary, "strong"), _cluster(summary, "weak")
    makers: dict[str, Callable[[Any], bool]] = {
        "speedup.png": lambda ax: _plot_scaling(ax, strong, "speedup", RANKS),
        "efficiency.png": lambda ax: _plot_scaling(ax, strong, "efficiency", RANKS),
        "throughput_vs_tile.png": lambda ax: _plot_tiles(ax, summary),
        "stage_breakdown.png": lambda ax: _plot_stages(ax, summary),
        "weak_scaling.png": lambda ax: _plot_scaling(ax, weak, "speedup", RANKS_WEAK),
        "throughput_vs_size.png": lambda ax: _plot_sizes(ax, summary),
    }
    ops = sorted({r["op"] for r in summary if r["kind"] == "cluster"})
    written = []
    for name, draw in makers.items():
        path = _figure(ops, draw, out / name)
        if path is not None:
            written.append(path)
    return written


def _figure(ops: list[str], draw: Callable[[Any], bool], path: Path) -> Path | None:
    """One subplot per op; ``draw(axes_by_op)`` says whether it drew anything."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(ops)), figsize=(5.2 * max(1, len(ops)), 4.2))
    axes = list(axes) if len(ops) > 1 else [axes]
    drew = draw(dict(zip(ops, axes)))
    if drew:
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path if drew else None


def _lines(rows: Iterable[Row], x: str, y: str) -> dict[str, tuple[list, list]]:
    """Per engine: x and y values sorted by x."""
    per: dict[str, list] = defaultdict(list)
    for r in rows:
        if r.get(y) is not None:
            per[r["engine"]].append((r[x], r[y]))
    return {e: tuple(map(list, zip(*sorted(pts)))) for e, pts in sorted(per.items())}


def _plot_scaling(axes: dict, rows: list[Row], metric: str, xlabel: str) -> bool:
    """``metric`` against ranks per engine, with each engine's ideal on this machine: its
    speedup equal to the cores it can use (efficiency 1)."""
    for op, ax in axes.items():
        mine = [r for r in rows if r["op"] == op]
        for engine, (xs, ys) in _lines(mine, "ranks", metric).items():
            (line,) = ax.plot(xs, ys, "o-", label=engine)
            ideal = _lines([r for r in mine if r["engine"] == engine], "ranks", "cores_used")
            ideal_ys = ideal[engine][1] if metric != "efficiency" else [1.0] * len(xs)
            ax.plot(xs, ideal_ys, "--", lw=1, color=line.get_color(), label=f"{engine} ideal")
        ax.xaxis.get_major_locator().set_params(integer=True)
        _label(ax, op, xlabel, f"{metric} vs sequential loop")
    return bool(rows)


def _plot_tiles(axes: dict, summary: list[Row]) -> bool:
    rows = _cluster(summary, "tiles")
    for op, ax in axes.items():
        mine = [r for r in rows if r["op"] == op]
        fixed = [dict(r, tile_px=int(r["tile"])) for r in mine if str(r["tile"]).isdigit()]
        for engine, (xs, ys) in _lines(fixed, "tile_px", "throughput_mp_s").items():
            (line,) = ax.plot(xs, ys, "o-", label=engine)
            for r in mine:
                if r["engine"] == engine and r["tile"] == "auto":
                    ax.axhline(
                        r["throughput_mp_s"],
                        color=line.get_color(),
                        ls="--",
                        lw=1,
                        label=f"{engine}, --tile auto",
                    )
        _log_ticks(ax, [r["tile_px"] for r in fixed], base=2)
        ranks = mine[0]["ranks"] if mine else "?"
        _label(ax, f"{op} (-n {ranks})", "tile size (px)", "throughput (Mpixel/s)")
    return bool(rows)


BREAKDOWN = (
    ("queue_s", "queue"),
    ("decode_s", "decode"),
    ("split_s", "split (rank 0)"),
    ("send_s", "send (rank 0)"),
    ("busy_mean_s", "compute (mean per worker)"),
    ("receive_s", "receive (rank 0)"),
    ("merge_s", "merge (rank 0)"),
    ("encode_s", "encode"),
    ("other_s", "rest of the server's time"),
    ("client_s", "client and ZeroMQ transfer"),
)


SHORT = {"sequential": "seq", "threads": "thr", "processes": "proc"}


def stage_parts(row: Row) -> dict[str, float]:
    """A case's time per stage (medians of the job's stats; missing stages count 0).

    Rank 0 sends and receives while workers compute, so the parts can add up to more than the
    wall time; the server's time not in any stage is ``other_s`` and the client's share (wall
    time minus the server's total) is ``client_s``.
    """
    parts = {key: row.get(key) or 0.0 for key, _ in BREAKDOWN[:-2]}
    total = row.get("server_total_s") or 0.0
    parts["other_s"] = max(0.0, total - sum(parts.values()))
    parts["client_s"] = max(0.0, row["median_s"] - total)
    return parts


def _plot_stages(axes: dict, summary: list[Row]) -> bool:
    rows = _cluster(summary, "strong")
    for op, ax in axes.items():
        mine = sorted((r for r in rows if r["op"] == op), key=lambda r: (r["engine"], r["ranks"]))
        labels = [f"{SHORT.get(r['engine'], r['engine'])}\n-n {r['ranks']}" for r in mine]
        bottom = [0.0] * len(mine)
        for key, name in BREAKDOWN:
            heights = [stage_parts(r)[key] * 1e3 for r in mine]
            ax.bar(labels, heights, bottom=bottom, label=name)
            bottom = [b + h for b, h in zip(bottom, heights)]
        walls = [r["median_s"] * 1e3 for r in mine]
        ax.plot(labels, walls, "k_", markersize=22, mew=2, ls="", label="wall time (client)")
        _label(ax, op, "", "milliseconds (medians; stages overlap)", legend=False)
    if rows:
        last = list(axes.values())[-1]
        last.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return bool(rows)


def _plot_sizes(axes: dict, summary: list[Row]) -> bool:
    rows = _cluster(summary, "sizes")
    refs = [r for r in summary if r["kind"] == "reference" and r["engine"] == "sequential"]
    for op, ax in axes.items():
        mine = [r for r in rows if r["op"] == op]
        for engine, (xs, ys) in _lines(mine, "megapixels", "throughput_mp_s").items():
            ax.plot(xs, ys, "o-", label=engine)
        sizes = {(r["height"], r["width"], r["images"]) for r in mine}
        seq = sorted(
            (r["megapixels"], r["throughput_mp_s"])
            for r in refs
            if r["op"] == op and (r["height"], r["width"], r["images"]) in sizes
        )
        ax.plot([x for x, _ in seq], [y for _, y in seq], "k--", lw=1, label="sequential loop")
        _log_ticks(ax, [r["megapixels"] for r in mine])
        _label(ax, op, "image size (Mpixel)", "throughput (Mpixel/s)")
    return bool(rows)


def _log_ticks(ax: Any, values: Sequence[float], base: int = 10) -> None:
    """A log x axis labelled with the values measured, written plainly."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_xscale("log", base=base)
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _label(ax: Any, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


# -- findings ----------------------------------------------------------------------------------

VALUES_PER_PIXEL = 3  # the bench's images are BGR


def op_pipeline(op: str) -> Pipeline:
    """The pipeline of an ``op`` column: specs chained with ``+``."""
    return Pipeline.parse([part for part in op.split("+") if part])


def _ops(rows: Iterable[Row]) -> list[str]:
    return sorted({r["op"] for r in rows})


def _best(rows: Iterable[Row], key: str = "speedup") -> Row | None:
    rows = [r for r in rows if r.get(key) is not None]
    return max(rows, key=lambda r: r[key]) if rows else None


def findings(
    summary: list[Row], fits: list[Row], machine: Row, failures: Sequence[Row] = ()
) -> list[str]:
    """Plain-language findings, each built from the figures of this run."""
    out: list[str] = [_capacity_finding(machine)]
    strong = _cluster(summary, "strong")
    for op in _ops(strong):
        out.append(_engine_finding(op, [r for r in strong if r["op"] == op], summary))
    out += [
        _tile_finding(op, _cluster(summary, "tiles")) for op in _ops(_cluster(summary, "tiles"))
    ]
    out += [
        _size_finding(op, _cluster(summary, "sizes")) for op in _ops(_cluster(summary, "sizes"))
    ]
    out += _serial_findings(fits, strong)
    out += _oversubscription_finding(strong)
    out += _unmeasured_findings(summary, failures)
    return [line for line in out if line]


def _unmeasured_findings(summary: list[Row], failures: Sequence[Row]) -> list[str]:
    """Engines whose every cluster case failed: say so, with the error."""
    measured = {r["engine"] for r in summary if r["kind"] == "cluster"}
    errors: dict[str, str] = {}
    for f in failures:
        errors.setdefault(f["cluster"].split()[-1], f["error"])
    return [
        f"`{engine}` could not be measured: its jobs failed on every cluster ({error}). "
        "See the notes."
        for engine, error in errors.items()
        if engine not in measured
    ]


def _capacity_finding(machine: Row) -> str:
    start, end = machine.get("parallel_capacity") or (None, None)
    cores = machine["usable_cores"]
    if start is None or min(start, end) >= 0.8 * cores:
        return ""
    return (
        f"This machine was shared while the bench ran: {cores} threads of OpenCV work got "
        f"only {start:.2f} cores' worth of CPU at the start and {end:.2f} at the end. Every "
        "speedup below is capped near that, so read them as lower bounds of what an idle "
        "machine gives."
    )


def _engine_finding(op: str, rows: list[Row], summary: list[Row]) -> str:
    best = _best(rows)
    if best is None:
        return ""
    ref, wall = best["reference_s"], best["median_s"]
    cost = ref * 1e9 / (best["megapixels"] * 1e6 * VALUES_PER_PIXEL)
    per_engine = {e: _best(r for r in rows if r["engine"] == e) for e in _engines(rows)}
    text = (
        f"**{op}** (one core: {cost:.1f} ns per pixel-channel, {ref * 1e3:.0f} ms for the "
        f"image): fastest was `{best['engine']}` on `-n {best['ranks']}` "
        f"({_cores(best['cores_used'])} used), {best['speedup']:.2f}× the sequential loop "
        f"({wall * 1e3:.0f} ms). Best per engine: "
        + ", ".join(f"`{e}` {r['speedup']:.2f}× (-n {r['ranks']})" for e, r in per_engine.items())
        + ". "
    )
    return text + _why(best) + _engine_reason(per_engine) + _opencv_note(op, best, summary)


def _cores(n: int) -> str:
    return f"{n} core" if n == 1 else f"{n} cores"


def _engines(rows: Iterable[Row]) -> list[str]:
    return sorted({r["engine"] for r in rows})


def _why(best: Row) -> str:
    share = (best.get("busy_mean_s") or 0.0) / best["median_s"]
    moved = (best.get("bytes_moved") or 0) / 2**20
    if best["speedup"] < 1:
        return (
            f"Nothing beat one process: the workers were busy only {share:.0%} of the wall "
            f"time; the rest went to rank 0 (cutting, sending, receiving and merging "
            f"{best['tasks']:.0f} tasks, {moved:.0f} MiB over MPI) and to moving the raw pixels "
            "through ZeroMQ. For an op this cheap, moving pixels costs more than computing "
            "them: run it locally, or as part of a longer pipeline. "
        )
    return (
        f"The workers were busy {share:.0%} of the wall time; rank 0 spent "
        f"{_rank0_s(best) * 1e3:.0f} ms splitting, sending, receiving and merging "
        f"({moved:.0f} MiB over MPI), and the client's raw pixels cross ZeroMQ both ways. "
    )


def _rank0_s(row: Row) -> float:
    """Rank 0's own time on a job's tiles: split, send, receive, merge."""
    return sum(row.get(k) or 0.0 for k in ("split_s", "send_s", "receive_s", "merge_s"))


def _engine_reason(per_engine: dict[str, Row | None]) -> str:
    threads, procs = per_engine.get("threads"), per_engine.get("processes")
    if not threads or not procs:
        return ""
    ratio = threads["speedup"] / procs["speedup"]
    if abs(ratio - 1) < 0.1:
        return "`threads` and `processes` were within 10% of each other (noise level here). "
    if ratio > 1:
        return (
            f"`threads` beat `processes` by {ratio - 1:.0%}: threads run OpenCV on each tile "
            "in place (OpenCV releases the GIL), while the processes engine copies every tile "
            "into shared memory and every result back. "
        )
    return (
        f"`processes` beat `threads` by {1 / ratio - 1:.0%}: separate interpreters do not "
        "share the GIL, which the threads engine's Python glue (cutting, cropping, writing "
        "into the output) holds between OpenCV calls. "
    )


def _opencv_note(op: str, best: Row, summary: list[Row]) -> str:
    plain = [
        r
        for r in summary
        if r["kind"] == "reference" and r["engine"] == "opencv" and _workload(r) == _workload(best)
    ]
    if not plain:
        return ""
    return (
        f"Plain OpenCV (one thread, IPP on) took {plain[0]['median_s'] * 1e3:.0f} ms against "
        f"{best['reference_s'] * 1e3:.0f} ms for the package's sequential loop, which turns "
        "IPP off so that tiles match the whole image bit for bit."
    )


def _tile_finding(op: str, rows: list[Row]) -> str:
    mine = [r for r in rows if r["op"] == op]
    best = _best((r for r in mine if str(r["tile"]).isdigit()), "throughput_mp_s")
    if best is None:
        return ""
    mine = [r for r in mine if r["engine"] == best["engine"]]
    worst = min((r for r in mine if str(r["tile"]).isdigit()), key=lambda r: r["throughput_mp_s"])
    text = (
        f"**{op}**, tile sizes on `-n {best['ranks']}` with `{best['engine']}`: best was "
        f"{best['tile']} px ({best['throughput_mp_s']:.0f} Mpixel/s, {_tasks(best['tasks'])}). "
    )
    if worst is not best:
        share = worst["throughput_mp_s"] / best["throughput_mp_s"]
        reason = _tile_reason(op, worst, best)
        text += f"{worst['tile']} px tiles ran at {share:.0%} of that, {reason}. "
    auto = _best((r for r in mine if r["tile"] == "auto"), "throughput_mp_s")
    if auto:
        share = auto["throughput_mp_s"] / best["throughput_mp_s"]
        text += f"`--tile auto` reached {share:.0%} of the best ({_tasks(auto['tasks'])})."
    return text


def _tile_reason(op: str, row: Row, best: Row) -> str:
    """Why a tile size was slower than the best: more tasks (and halos), or too few tasks."""
    if row["tasks"] < best["tasks"]:
        return (
            f"with only {_tasks(row['tasks'])} for {row['engine_workers']} engine workers: too "
            "coarse to share out evenly, so workers wait for the last ones"
        )
    halo = _halo_extra(op, row)
    halo_text = f" and {halo:.0%} more pixels read as halo" if halo > 0.005 else ""
    return f"with {_tasks(row['tasks'])}{halo_text}: rank 0 pays a fixed cost for every task"


def _tasks(n: float) -> str:
    return "1 task" if round(n) == 1 else f"{n:.0f} tasks"


def _halo_extra(op: str, row: Row) -> float:
    """Share of extra pixels read because of halos, for the row's tile size."""
    work = _tiled_work(op, row["height"], row["width"], 0.0)
    return tile_geometry(work, int(row["tile"]))[1] / work.values - 1


def _tiled_work(op: str, height: int, width: int, cost_ns: float) -> TiledWork:
    pipeline = op_pipeline(op)
    strips = any(isinstance(s, TiledStage) and s.full_rows for s in pipeline.stages)
    return TiledWork(height, width, cost_ns, VALUES_PER_PIXEL, 1, pipeline.halo, strips)


def _size_finding(op: str, rows: list[Row]) -> str:
    mine = [r for r in rows if r["op"] == op]
    sizes = sorted({r["megapixels"] for r in mine})
    best = [_best(r for r in mine if r["megapixels"] == mp) for mp in sizes]
    best = [b for b in best if b is not None]
    if not best:
        return ""
    steps = ", ".join(f"{b['speedup']:.2f}× at {b['megapixels']:.2g} MP" for b in best)
    paying = [b for b in best if b["speedup"] >= 1]
    if not paying:
        verdict = f"it never paid off in the sizes tried (up to {sizes[-1]:.2g} MP)"
    elif paying[0] is best[0]:
        verdict = f"it paid off at every size tried, down to {sizes[0]:.2g} MP"
    else:
        verdict = (
            f"it paid off from {paying[0]['megapixels']:.2g} MP per image; below that, fixed "
            "costs per job and per task and the pixel transfer dominate"
        )
    where = f"`-n {best[0]['ranks']}`, best engine per size"
    return f"**{op}** over image sizes ({where}): {steps}; {verdict}."


def _serial_findings(fits: list[Row], strong: list[Row]) -> list[str]:
    out = []
    for op in _ops(strong):
        best = _best(r for r in strong if r["op"] == op)
        fit = next(
            (
                f
                for f in fits
                if f["law"] == "amdahl" and f["op"] == op and best and f["engine"] == best["engine"]
            ),
            None,
        )
        weak = next(
            (
                f
                for f in fits
                if f["law"] == "gustafson"
                and f["op"] == op
                and best
                and f["engine"] == best["engine"]
            ),
            None,
        )
        if fit:
            out.append(_amdahl_sentence(op, fit) + _gustafson_sentence(weak))
    if out:
        cores = max(c for f in fits for c in f["cores_fitted"])
        out.append(
            f"These serial fractions come from at most {cores} cores, so what they say about "
            "many nodes is an extrapolation. Between nodes, tiles travel over the network "
            "instead of shared memory, and every tile still passes through rank 0: expect a "
            "larger serial fraction across nodes, not a smaller one."
        )
    return out


def _amdahl_sentence(op: str, fit: Row) -> str:
    s, engine = fit["serial_fraction"], fit["engine"]
    head = f"**{op}** (`{engine}`, strong scaling): Amdahl serial fraction {s:.2f}"
    if s >= 1:
        return (
            f"{head}: the runs were slower than one process, so adding nodes cannot help "
            "until the per-task and transfer overhead is cut. "
        )
    if s <= 0:
        return f"{head}: no serial part visible at this scale (superlinear or noise). "
    p = fit["predicted"]
    return (
        f"{head}: however many nodes, this fixed work cannot run more than 1/s = "
        f"{fit['limit']:.1f}× faster than the sequential loop; the law predicts "
        f"{p['16']:.1f}× on 16 cores and {p['64']:.1f}× on 64. "
    )


def _gustafson_sentence(fit: Row | None) -> str:
    if not fit:
        return ""
    s = fit["serial_fraction"]
    if s >= 1:
        return (
            f"Growing the work with the workers did not pay either (Gustafson serial fraction "
            f"{s:.2f}): each added worker rank brought more overhead than work."
        )
    return (
        f"With the work growing with the workers (Gustafson), serial fraction {s:.2f}: "
        f"a scaled speedup of {fit['predicted']['64']:.0f}× on 64 cores, which is where more "
        "nodes pay: more or larger images, not the same image faster."
    )


def _oversubscription_finding(strong: list[Row]) -> list[str]:
    changes = []
    for key in {(r["engine"], r["op"]) for r in strong}:
        rows = [r for r in strong if (r["engine"], r["op"]) == key and r["speedup"]]
        fit = _best(r for r in rows if not r["oversubscribed"])
        over = _best(r for r in rows if r["oversubscribed"])
        if fit and over:
            changes.append(over["speedup"] / fit["speedup"] - 1)
    if not changes:
        return []
    mean = sum(changes) / len(changes)
    verdict = (
        "it never helped: extra ranks only add context switches"
        if max(changes) <= 0.05
        else "it helped some pairs (more tasks in flight keep the cores busy while rank 0 "
        "sends and merges) and hurt others (context switches between ranks)"
    )
    return [
        f"Oversubscribing (more engine workers than cores, e.g. `-n 4` on 2 cores: 3 worker "
        f"ranks plus rank 0 sharing 2 cores) changed the best speedup by {mean:+.0%} on average "
        f"over {len(changes)} engine/op pairs (from {min(changes):+.0%} to {max(changes):+.0%}): "
        f"{verdict}."
    ]


# -- the Markdown report -----------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[tuple[str, str, Callable]]) -> str:
    """A Markdown table: ``columns`` are (header, key, formatter)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(fn(row.get(key)) for _, key, fn in columns) + " |")
    return "\n".join(lines)


def _ms(v: Any) -> str:
    return _fmt(v * 1e3 if isinstance(v, float) else v, 1)


def _x(v: Any) -> str:
    return _fmt(v) + ("×" if isinstance(v, float) else "")


CLUSTER_COLUMNS = [
    ("engine", "engine", str),
    ("op", "op", str),
    ("-n", "ranks", str),
    ("tile", "tile", str),
    ("image", "shape", str),
    ("workers", "workers", str),
    ("cores used", "cores_used", str),
    ("oversub.", "oversubscribed", _fmt),
    ("median ms", "median_s", _ms),
    ("speedup", "speedup", _x),
    ("vs OpenCV", "speedup_vs_opencv", _x),
    ("efficiency", "efficiency", _fmt),
    ("Mpixel/s", "throughput_mp_s", lambda v: _fmt(v, 1)),
    ("Karp–Flatt", "karp_flatt", _fmt),
    ("tasks", "tasks", lambda v: _fmt(v, 0)),
]
FIT_COLUMNS = [
    ("experiment", "experiment", str),
    ("law", "law", str),
    ("engine", "engine", str),
    ("op", "op", str),
    ("serial fraction", "serial_fraction", lambda v: _fmt(v, 3)),
    ("fit RMSE", "rmse", lambda v: _fmt(v, 3)),
    ("cores fitted", "cores_fitted", lambda v: ",".join(map(str, v))),
    ("limit 1/s", "limit", lambda v: _fmt(v, 1)),
]
REFERENCE_COLUMNS = [
    ("loop", "engine", str),
    ("op", "op", str),
    ("image", "shape", str),
    ("median ms", "median_s", _ms),
    ("min–max ms", "spread", str),
    ("Mpixel/s", "throughput_mp_s", lambda v: _fmt(v, 1)),
]


def _tile_order(row: Row) -> float:
    """Tiles by size, ``auto`` last."""
    tile = str(row["tile"])
    return int(tile) if tile.isdigit() else math.inf


def _with_shape(rows: Iterable[Row]) -> list[Row]:
    out = []
    for r in rows:
        images = f"{r['images']}× " if r["images"] > 1 else ""
        spread = f"{r['min_s'] * 1e3:.1f}–{r['max_s'] * 1e3:.1f}"
        out.append(dict(r, shape=f"{images}{r['height']}×{r['width']}", spread=spread))
    return sorted(
        out,
        key=lambda r: (r["op"], r["engine"], r.get("ranks", 0), r["megapixels"], _tile_order(r)),
    )


SECTIONS = (
    (
        "strong",
        "Strong scaling: fixed work",
        ("speedup.png", "efficiency.png", "stage_breakdown.png"),
    ),
    ("weak", "Weak scaling: one image per worker rank", ("weak_scaling.png",)),
    ("tiles", "Tile sizes", ("throughput_vs_tile.png",)),
    ("sizes", "Image sizes", ("throughput_vs_size.png",)),
)


def markdown_report(result: Row, summary: list[Row], fits: list[Row], plots: list[str]) -> str:
    """The whole report: machine, command, findings, tables, plots, fits, notes."""
    parts = ["# mpi_imgproc benchmark report", _machine_section(result), _method_section(result)]
    found = findings(summary, fits, result["machine"], result.get("failures", []))
    parts.append("## Findings\n\n" + "\n".join(f"- {f}" for f in found))
    for experiment, title, figures in SECTIONS:
        rows = _cluster(summary, experiment)
        if rows:
            shown = "\n\n".join(f"![{f}]({f})" for f in figures if f in plots)
            table = markdown_table(_with_shape(rows), CLUSTER_COLUMNS)
            parts.append(f"## {title}\n\n{table}\n\n{shown}")
    job_plots = [f for f in ("job_utilisation.png", "job_timeline.png") if f in plots]
    if job_plots:
        parts.append(
            "## One job of the largest cluster\n\nBusy share per rank, and when each task ran "
            "(from the job's `done` stats).\n\n" + "\n\n".join(f"![{f}]({f})" for f in job_plots)
        )
    if fits:
        parts.append("## Serial fractions\n\n" + markdown_table(fits, FIT_COLUMNS))
    refs = [r for r in summary if r["kind"] == "reference"]
    parts.append(
        "## Single-process references\n\n" + markdown_table(_with_shape(refs), REFERENCE_COLUMNS)
    )
    parts.append(_notes_section(result))
    return "\n\n".join(parts) + "\n"


def _machine_section(result: Row) -> str:
    m = result["machine"]
    v = m.get("versions", {})
    rows = [
        ("cores", f"{m['usable_cores']} usable of {m['cpu_count']} logical CPUs"),
        ("CPU", m["cpu_model"]),
        ("memory", f"{m['memory_gib']} GiB"),
        ("MPI library", m["mpi_library"]),
        ("mpiexec", m["mpiexec"]),
        ("GPU", m["gpu"]),
        ("platform", m["platform"]),
        ("Python, NumPy, OpenCV", f"{m['python']}, {v.get('numpy', '?')}, {v.get('opencv', '?')}"),
        (
            "mpi4py, pyzmq (libzmq)",
            f"{v.get('mpi4py', '?')}, {v.get('pyzmq', '?')} ({v.get('zmq', '?')})",
        ),
        ("parallel capacity (start, end)", _capacity_text(m)),
        (
            "load average (start → end)",
            f"{m.get('load_average_at_start', '?')} → {m['load_average'][0]}",
        ),
    ]
    table = "\n".join(f"| {k} | {val} |" for k, val in rows)
    return f"## Machine\n\n| | |\n|---|---|\n{table}"


def _capacity_text(m: Row) -> str:
    start, end = m.get("parallel_capacity") or ("?", "?")
    return f"{start}, {end} cores' worth (of {m['usable_cores']}): OpenCV threads, all at once"


def _method_section(result: Row) -> str:
    s = result["settings"]
    return f"""## How it was measured

Reproduce with (every setting spelled out; it took {result.get("seconds", "?")} s):

```sh
{result["command"]}
```

- **Reference**: a loop in one process over the same images, with the `sequential` engine
  (`tiling.run_pipeline`, whole image) and, where the op is one OpenCV call, plain OpenCV; both
  with `cv2.setNumThreads(1)`. Measured in the same run, {s["repeat"]} timed rounds.
- **Cluster time**: on the client, from `submit` to the last result, with raw pixels both ways
  over ZeroMQ; the server is started by the bench (`mpiexec -n k python -m mpi_imgproc.server`)
  and every result is checked against the reference output bit for bit.
- **speedup** = reference median / cluster median; **cores used** = min(engine workers over
  all ranks, {s["available_cores"]} usable cores); **efficiency** = speedup / cores used;
  **throughput** = image megapixels / median seconds. Whenever `-n` > 1, rank 0 is one more
  process on the same cores: it cuts, sends, receives and merges.
- **oversub.**: more engine workers than cores (e.g. `-n 4` here: 3 workers on
  {s["available_cores"]} cores). Karp–Flatt is the serial fraction each point implies.
- Medians of {s["repeat"]} rounds after one checked warm-up round; rounds interleave the cases
  of a cluster, so a slow spell on this shared machine is spread over all of them.
- Default tile {s["tile"]} px for strong, weak and size sweeps; `auto` is the server's planner."""


def failure_notes(failures: Iterable[Row]) -> list[str]:
    """Failed cases, one line per cluster and error, with how many cases it cost."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for f in failures:
        groups[(f["cluster"], f["error"])].append(f["case"])
    return [
        f"Not measured on `{cluster}`: {len(cases)} case(s) failed ({error}); first: {cases[0]}"
        for (cluster, error), cases in groups.items()
    ]


def _notes_section(result: Row) -> str:
    notes = failure_notes(result.get("failures", [])) + list(result.get("notes", []))
    notes.append(
        "The stage breakdown shows the job's `done` stats (medians): queue, decode, split, "
        "send, receive, merge and encode as rank 0 timed them, compute as the mean busy time "
        "per worker rank; the rest of the server's total, and the client's share (wall time "
        "minus the server's total). Rank 0 works while workers compute, so the parts overlap."
    )
    files = "samples.csv (every sample), summary.csv (medians), results.json (all of it)"
    return "## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\nFiles: {files}."


def headline(result: Row) -> str:
    """One line per op: the best strong-scaling speedup of the run."""
    summary = summarise(result["samples"])
    lines = []
    for op in _ops(_cluster(summary, "strong")):
        best = _best(r for r in _cluster(summary, "strong") if r["op"] == op)
        if best:
            lines.append(
                f"{op}: best {best['speedup']:.2f}× ({best['engine']}, -n {best['ranks']}, "
                f"{best['median_s'] * 1e3:.0f} ms vs {best['reference_s'] * 1e3:.0f} ms)"
            )
    return "\n".join(lines) or "no strong-scaling results"


# -- recommendations ---------------------------------------------------------------------------


def recommendation(
    samples: list[Row], op: str, height: int, width: int, engine_workers: int, cores: int
) -> Row:
    """Best measured tile and tiles in flight, and the tile model fitted to the measurements.

    Cases are ranked by the server's own time: the client's transfer of the raw pixels is the
    same for every tile size and would only add noise to the choice.
    """
    summary = summarise(samples)
    rows = [r for r in summary if r["kind"] == "cluster"]
    best = min(rows, key=lambda r: r["server_total_s"] or r["median_s"])
    ref = next(r for r in summary if r["kind"] == "reference" and r["engine"] == "sequential")
    work = _tiled_work(op, height, width, ref["median_s"] * 1e9 / (height * width * 3))
    fixed = [r for r in rows if r["in_flight"] == best["in_flight"] and str(r["tile"]).isdigit()]
    measured = {int(r["tile"]): r["server_total_s"] for r in fixed}
    model, error = fit_tile_model(work, measured, engine_workers, cores)
    for r in rows:
        if str(r["tile"]).isdigit():
            r["predicted_s"] = predict_tile_time(work, int(r["tile"]), engine_workers, cores, model)
    return {
        "op": op,
        "size": [height, width],
        "cost_ns": work.cost_ns,
        "engine_workers": engine_workers,
        "cores": cores,
        "best": {k: best[k] for k in ("tile", "in_flight", "median_s", "server_total_s")},
        "model": {
            "task_overhead_s": model.task_overhead_s,
            "transfer_ns_per_byte": model.transfer_ns_per_byte,
            "rms_log_error": error,
        },
        "model_choice": vars(recommend_tile(work, engine_workers, cores, model)),
        "default_choice": vars(recommend_tile(work, engine_workers, cores)),
        "cases": [
            {
                k: r.get(k)
                for k in ("tile", "in_flight", "median_s", "server_total_s", "predicted_s", "tasks")
            }
            for r in rows
        ],
    }


def _case_order(row: Row) -> tuple:
    """In flight, then tiles by size with ``auto`` last."""
    return row["in_flight"], _tile_order(row)


def recommendation_text(rec: Row) -> str:
    """The recommendation as a table and three sentences."""
    columns = [
        ("tile", "tile", str),
        ("in flight", "in_flight", str),
        ("median ms (client)", "median_s", _ms),
        ("server ms", "server_total_s", _ms),
        ("model ms", "predicted_s", _ms),
        ("tasks", "tasks", lambda v: _fmt(v, 0)),
    ]
    b, m, fit, default = rec["best"], rec["model"], rec["model_choice"], rec["default_choice"]
    return "\n".join(
        [
            f"{rec['op']} on {rec['size'][0]}x{rec['size'][1]} BGR: one core costs "
            f"{rec['cost_ns']:.2f} ns per pixel-channel; {rec['engine_workers']} engine workers on "
            f"{rec['cores']} cores.",
            "",
            markdown_table(sorted(rec["cases"], key=_case_order), columns),
            "",
            f"Best measured: tile {b['tile']}, {_tasks(b['in_flight'])} in flight per worker "
            f"rank: {b['server_total_s'] * 1e3:.1f} ms on the server, {b['median_s'] * 1e3:.1f} "
            "ms for the client.",
            f"Tile model fitted to in-flight {b['in_flight']}: {m['task_overhead_s'] * 1e3:.3f} ms "
            f"per task, {m['transfer_ns_per_byte']:.2f} ns per byte (RMS log error "
            f"{m['rms_log_error']:.2f}) → tile {fit['tile'] or 'whole image'} "
            f"(predicted {fit['predicted_s'] * 1e3:.1f} ms).",
            f"With the built-in constants (what the server's --tile auto would use): tile "
            f"{default['tile'] or 'whole image'} "
            f"(predicted {default['predicted_s'] * 1e3:.1f} ms).",
        ]
    )


def write_recommendation(result: Row, out: Path) -> str:
    """recommend.json, recommend_samples.csv and recommend.md in ``out``; returns the text."""
    out.mkdir(parents=True, exist_ok=True)
    text = recommendation_text(result["recommendation"])
    write_json(result, out / "recommend.json")
    write_csv(result["samples"], SAMPLE_COLUMNS, out / "recommend_samples.csv")
    command = f"```sh\n{result['command']}\n```"
    (out / "recommend.md").write_text(f"# Tile recommendation\n\n{command}\n\n{text}\n")
    return text


# -- one job, per rank (bench, compare and the web page share these figures) -----------------


def rank_utilisation(stats: Row) -> list[Row]:
    """Per worker rank of one job's ``done`` stats: tiles, busy seconds and busy share of the
    job's time from its start to its end (queue excluded)."""
    span = float(stats.get("total", 0.0)) - float(stats.get("queue", 0.0))
    rows = []
    for rank, figures in sorted(stats.get("ranks", {}).items(), key=lambda kv: int(kv[0])):
        busy = float(figures.get("busy_s", 0.0))
        share = busy / span if span > 0 else 0.0
        rows.append({"rank": int(rank), "tiles": int(figures.get("tiles", 0)), "busy_s": busy,
                     "share": share})  # fmt: skip
    return rows


def plot_job_ranks(stats: Row, out: Path, stem: str = "job") -> list[Path]:
    """``{stem}_utilisation`` (busy share per rank) and ``{stem}_timeline`` (a Gantt of the
    job: its queue, then per rank a bar over the job's run with the busy share filled), each
    as PNG and SVG.  With the ``tasks`` the ``done`` stats list (rank, start, end of each),
    the timeline has one bar per task; without them (older stats), each rank's busy share of
    the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rank_utilisation(stats)
    if not rows:
        return []
    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(5.6, 0.4 * len(rows) + 1.5))
    ax.barh([f"rank {r['rank']}" for r in rows], [100 * r["share"] for r in rows],
            color="#2563eb")  # fmt: skip
    for i, r in enumerate(rows):
        ax.text(100 * r["share"] + 1, i, f"{100 * r['share']:.0f} % · {r['tiles']} tiles",
                va="center", fontsize=8)  # fmt: skip
    ax.axvline(100, color="#888", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("busy share of the job's run (%; above 100: several engine workers)")
    ax.set_title("per-rank utilisation, one job", fontsize=10)
    written += _save_both(fig, out / f"{stem}_utilisation")

    queue, total = float(stats.get("queue", 0.0)), float(stats.get("total", 0.0))
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.6))
    ax.broken_barh([(0, queue)], (len(rows) - 0.4, 0.8), color="#d97706", label="queued")
    tasks = [t for t in stats.get("tasks") or [] if isinstance(t, list) and len(t) == 3]
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        ax.broken_barh([(queue, total - queue)], (y - 0.4, 0.8), color="#c7d2fe")
        mine = [(start, end - start) for rank, start, end in tasks if str(rank) == str(r["rank"])]
        if mine:  # the stats say when each task ran: one bar per task
            ax.broken_barh(mine, (y - 0.4, 0.8), color="#2563eb", edgecolor="white",
                           linewidth=0.3)  # fmt: skip
        else:
            busy = min(total - queue, r["busy_s"])
            ax.broken_barh([(queue, busy)], (y - 0.4, 0.8), color="#2563eb")
    ax.set_yticks(range(len(rows) + 1))
    ax.set_yticklabels([*[f"rank {r['rank']}" for r in reversed(rows)], "job"])
    ax.set_xlim(0, max(total, 1e-6))
    how = "one bar per task" if tasks else "dark: busy share of the run"
    ax.set_xlabel(f"seconds since the job was accepted ({how})")
    ax.set_title("task timeline, one job", fontsize=10)
    written += _save_both(fig, out / f"{stem}_timeline")
    return written


def _save_both(fig: Any, stem: Path) -> list[Path]:
    """Save a figure as PNG and SVG and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths
