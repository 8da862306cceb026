"""``mpi-imgproc bench --nodes K --link 1gbit,10gbit``: scaling across simulated nodes.

The nodes are network namespaces on this machine (:mod:`mpi_imgproc.simnodes`): rank 0 runs
alone on a node of its own, and ``n`` = 1 … K worker nodes carry ``--ranks-per-node`` worker
ranks each.  Every link is shaped to each rate of ``--link`` in turn (a token bucket, both
directions).  Two workloads, each checked bit for bit against the single-process reference
of the same run:

* ``strong``: one ``--size`` image through ``--op`` (default bilateral on 3000×3000), sent by
  a client on the bridge to the server;
* ``batch``: ``--batch-images`` JPEGs from ``gen-dataset`` resized to 256×256 (lanczos) by
  ``python -m mpi_imgproc.batch``, rank 0 reading and writing the files.

Beside speedup and efficiency every sample has the bytes each link carried (read from the
bridge side of its veth in ``/sys/class/net``) and how close rank 0's link came to its rate:
the mean over the job and the peak over 100 ms windows.  Every byte between rank 0 and the
workers crosses rank 0's link, so when that link's busy time nears the wall time the star
through rank 0 is the limit, whatever the number of nodes.  All nodes share this machine's
cores: more nodes add links, not CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .bench import (
    BenchError,
    Case,
    Inputs,
    check_result,
    log,
    machine_info,
    measure_references,
    parallel_capacity,
    parse_list,
    parse_size,
    run_job,
)
from .client import Client
from .errors import ImgprocError
from .local_engines import default_workers
from .metrics import median
from .pipeline import Pipeline
from .report import _fmt, _x, markdown_table, write_json
from .simnodes import Link, SimNodes, run_to_end, running_server, simulated_nodes

BATCH_OP = "resize:width=256,height=256,interpolation=lanczos"
USE_KEYS = ("rank0_mean_use", "rank0_peak_use", "rank0_link_busy_s")
SAMPLE_S = 0.02  # counters are read this often during a job
WINDOW_S = 0.1  # peak rates are over windows this long


@dataclass
class NodeSettings:
    """One ``bench --nodes`` run, from the command line."""

    out: Path
    nodes: int
    links: list[Link]
    op: str
    size: Any  # bench.Workload
    tile: str
    engine: str
    ranks_per_node: int
    batch_images: int
    repeat: int
    seed: int = 12345
    timeout: float = 600.0
    command: str = ""
    notes: list[str] = field(default_factory=list)


# -- link counters during a job --------------------------------------------------------------


class LinkWatch:
    """Reads every link's counters every ``SAMPLE_S`` while a job runs, in a thread."""

    def __init__(self, sim: SimNodes):
        self.sim = sim
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LinkWatch:
        self.samples.append((time.perf_counter(), self.sim.counters()))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self.sim.counters()))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.samples.append((time.perf_counter(), self.sim.counters()))

    def carried(self) -> dict[str, Any]:
        """Bytes each link carried from first to last sample, per direction."""
        first, last = self.samples[0][1], self.samples[-1][1]
        return {name: last[name] - first[name] for name in last}

    def peak_bps(self, name: str) -> float:
        """The highest rate (bit/s, busier direction) over any window of ``WINDOW_S`` or
        more (the whole job, if it is shorter)."""
        best, j = 0.0, 0
        for t, now in self.samples:
            while j + 1 < len(self.samples) and t - self.samples[j + 1][0] >= WINDOW_S:
                j += 1
            t0, then = self.samples[j]
            if t - t0 >= WINDOW_S:
                best = max(best, _bps(now[name] - then[name], t - t0))
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        return best or _bps(last[name] - first[name], max(t1 - t0, 1e-9))


def _bps(moved: Any, seconds: float) -> float:
    return 8 * max(moved.sent, moved.received) / seconds


def link_fields(sim: SimNodes, watch: LinkWatch, wall: float, n: int) -> dict[str, Any]:
    """Bytes per link and rank 0's link utilisation, for one sample on ``n`` worker nodes."""
    carried = watch.carried()
    rank0 = sim.nodes[0].name
    workers = [node.name for node in sim.nodes[1 : n + 1]]
    rate = sim.link.bits_per_second
    busiest = max(carried[rank0].sent, carried[rank0].received)
    return {
        "rank0_sent_mb": round(carried[rank0].sent / 1e6, 3),
        "rank0_received_mb": round(carried[rank0].received / 1e6, 3),
        "workers_received_mb": [round(carried[w].received / 1e6, 3) for w in workers],
        "workers_sent_mb": [round(carried[w].sent / 1e6, 3) for w in workers],
        "rank0_link_busy_s": round(busiest * 8 / rate, 4) if rate else None,
        "rank0_mean_use": round(busiest * 8 / rate / wall, 4) if rate else None,
        "rank0_peak_use": round(watch.peak_bps(rank0) / rate, 4) if rate else None,
    }


# -- the two workloads ----------------------------------------------------------------------


def placement(workers_nodes: int, ranks_per_node: int) -> list[int]:
    """Rank 0 alone on the first node, then ``ranks_per_node`` workers on each of the rest."""
    return [1] + [ranks_per_node] * workers_nodes


def measure_strong(
    sim: SimNodes, s: NodeSettings, n: int, inputs: Inputs, case: Case, info: dict
) -> list[dict]:
    """Start the server on ``n`` worker nodes; one warm-up, then ``repeat`` checked jobs.
    ``info`` gets the server's ``info`` reply (for the versions in the report)."""
    args = ["--insecure", "--engine", s.engine]
    rows = []
    with running_server(sim, placement(n, s.ranks_per_node), *args) as cluster:
        with Client(cluster.address, timeout=60.0) as client:
            info.update(client.info())
            for rnd in range(s.repeat + 1):
                with LinkWatch(sim) as watch:
                    wall, result = run_job(client, case, inputs.images(case.workload), s.timeout)
                check_result(case, result, inputs.expected[(case.op, case.workload)])
                if rnd:
                    row = sample_row("strong", sim, s, n, rnd, wall)
                    rows.append({**row, **link_fields(sim, watch, wall, n)})
    return rows


def measure_batch(sim: SimNodes, s: NodeSettings, n: int, data: Path, expected: dict) -> list:
    """``repeat`` checked batch runs over ``data`` on ``n`` worker nodes (after a warm-up)."""
    rows = []
    for rnd in range(s.repeat + 1):
        out = Path(tempfile.mkdtemp(prefix="nodes-batch-", dir=s.out))
        args = ["--input", str(data), "--output", str(out), "--op", BATCH_OP]
        args += ["--engine", s.engine]
        cmd = sim.mpi_command(placement(n, s.ranks_per_node), "mpi_imgproc.batch", *args)
        with LinkWatch(sim) as watch:
            started = time.perf_counter()
            done = run_to_end(cmd, s.timeout)
            wall = time.perf_counter() - started
        check_batch(done, out, expected)
        summary = json.loads((out / "batch-summary.json").read_text())
        shutil.rmtree(out)
        if rnd:
            row = sample_row("batch", sim, s, n, rnd, wall)
            row["batch_elapsed_s"] = summary["elapsed_s"]
            rows.append({**row, **link_fields(sim, watch, wall, n)})
    return rows


def check_batch(done: subprocess.CompletedProcess, out: Path, expected: dict) -> None:
    """Raise BenchError unless the batch exited 0 and wrote every output as the reference."""
    if done.returncode:
        raise BenchError(f"batch exited {done.returncode}: {done.stdout[-2000:]}")
    for name, image in expected.items():
        written = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        if written is None or not np.array_equal(written, image):
            raise BenchError(f"batch output {name} differs from the sequential reference")


def sample_row(workload: str, sim: SimNodes, s: NodeSettings, n: int, rnd: int, wall: float):
    return {
        "workload": workload,
        "link": str(sim.link),
        "nodes": n,
        "worker_ranks": n * s.ranks_per_node,
        "round": rnd,
        "wall_s": round(wall, 4),
    }


# -- references --------------------------------------------------------------------------------


def make_dataset(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` JPEGs of 300–600 px from ``gen-dataset`` (kept in ``folder`` for reruns)."""
    files = sorted(folder.glob("*.jpg"))
    if len(files) != count:
        shutil.rmtree(folder, ignore_errors=True)
        cli = [sys.executable, "-m", "mpi_imgproc.cli", "gen-dataset", str(folder)]
        cli += ["--count", str(count), "--seed", str(seed), "--gray", "0"]
        subprocess.run(cli, check=True, capture_output=True, timeout=1800)
        files = sorted(folder.glob("*.jpg"))
    return files


def batch_reference(files: list[Path], repeat: int, out: Path) -> tuple[dict, list[float]]:
    """The batch's single-process loop (read, the same pipeline, write JPEG), one thread:
    its outputs (decoded, for the check) and its wall times, the first round a warm-up."""
    cv2.setNumThreads(1)
    pipeline = Pipeline.parse([BATCH_OP])
    walls = []
    for rnd in range(repeat + 1):
        folder = Path(tempfile.mkdtemp(prefix="nodes-loop-", dir=out))
        started = time.perf_counter()
        for path in files:
            small = pipeline.apply(cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
            cv2.imwrite(str(folder / path.name), small)
        if rnd:
            walls.append(time.perf_counter() - started)
        expected = {p.name: cv2.imread(str(folder / p.name), cv2.IMREAD_UNCHANGED) for p in files}
        shutil.rmtree(folder)
    return expected, walls


# -- the whole run -----------------------------------------------------------------------------


def run_node_bench(s: NodeSettings) -> dict[str, Any]:
    """Every link rate × worker-node count × workload; returns samples and summary."""
    started = time.perf_counter()
    capacity = parallel_capacity(default_workers())
    inputs = Inputs(s.seed)
    case = Case("strong", s.op, s.size, s.tile)
    refs = measure_references([(s.op, s.size)], inputs, s.repeat)
    reference = {"strong": median([r["wall_s"] for r in refs if r["engine"] == "sequential"])}
    expected: dict = {}
    data = s.out / "dataset"
    if s.batch_images:
        files = make_dataset(data, s.batch_images, s.seed % 1000)
        expected, walls = batch_reference(files, s.repeat, s.out)
        reference["batch"] = median(walls)
    samples, info = [], {}
    with simulated_nodes(s.nodes + 1) as sim:
        for link in s.links:
            sim.shape(link)
            for n in range(1, s.nodes + 1):
                log(f"nodes: {n} worker node(s), link {link}")
                samples += measure_strong(sim, s, n, inputs, case, info)
                if s.batch_images:
                    samples += measure_batch(sim, s, n, data, expected)
    machine = machine_info(info, "not used")
    machine["parallel_capacity"] = [capacity, parallel_capacity(default_workers())]
    return {
        "command": s.command,
        "settings": settings_json(s),
        "machine": machine,
        "reference_s": reference,
        "seconds": round(time.perf_counter() - started, 1),
        "samples": samples,
        "summary": summarise(samples, reference),
        "notes": s.notes,
    }


def settings_json(s: NodeSettings) -> dict[str, Any]:
    return {
        "nodes": s.nodes,
        "links": [str(link) for link in s.links],
        "op": s.op,
        "size": f"{s.size.width}x{s.size.height}",
        "tile": s.tile,
        "engine": s.engine,
        "ranks_per_node": s.ranks_per_node,
        "batch_images": s.batch_images,
        "batch_op": BATCH_OP,
        "repeat": s.repeat,
        "seed": s.seed,
        "cores": default_workers(),
    }


def summarise(samples: Sequence[dict], reference: dict[str, float]) -> list[dict]:
    """Medians per (workload, link, nodes); speedups against the single process and against
    one worker node of the same link; efficiency against one worker node."""
    groups: dict[tuple, list[dict]] = {}
    for row in samples:
        groups.setdefault((row["workload"], row["link"], row["nodes"]), []).append(row)
    summary = []
    for (workload, _, _), rows in groups.items():
        row = {k: v for k, v in rows[0].items() if k not in ("round", "wall_s")}
        for key in ("wall_s", "batch_elapsed_s", *USE_KEYS):
            values = [r[key] for r in rows if r.get(key) is not None]
            row[key] = round(median(values), 4) if values else None
        row["speedup"] = round(reference[workload] / row["wall_s"], 3)
        summary.append(row)
    for row in summary:
        one = next(r for r in summary if r["workload"] == row["workload"]
                   and r["link"] == row["link"] and r["nodes"] == 1)  # fmt: skip
        row["vs_one_node"] = round(one["wall_s"] / row["wall_s"], 3)
        row["efficiency"] = round(row["vs_one_node"] / row["nodes"], 3)
    return summary


# -- the report --------------------------------------------------------------------------------


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def _mb(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(f"{x:.1f}" for x in v) or "—"
    return _fmt(v, 1)


COLUMNS: list[tuple[str, str, Callable]] = [
    ("workload", "workload", str),
    ("link", "link", str),
    ("worker nodes", "nodes", str),
    ("wall s (median)", "wall_s", lambda v: _fmt(v, 3)),
    ("batch's own s", "batch_elapsed_s", lambda v: _fmt(v, 3)),
    ("speedup vs 1 process", "speedup", _x),
    ("vs 1 node", "vs_one_node", _x),
    ("efficiency vs 1 node", "efficiency", _fmt),
    ("rank 0 link MB out / in", "rank0_sent_mb", _mb),
    ("worker links MB in (each)", "workers_received_mb", _mb),
    ("rank 0 link busy s", "rank0_link_busy_s", lambda v: _fmt(v, 3)),
    ("rank 0 link use: mean", "rank0_mean_use", _pct),
    ("peak (100 ms)", "rank0_peak_use", _pct),
]


def markdown_report(result: dict[str, Any]) -> str:
    """The report: what ran, the plain caveat about cores, one table, what it shows."""
    s, m = result["settings"], result["machine"]
    rows = report_rows(result["summary"])
    cores = m["usable_cores"]
    lines = [
        "# Scaling across simulated nodes",
        "",
        f"**The nodes share one machine's {cores} cores.** They are Linux network namespaces "
        "on one bridge, each with its own host name, address and shaped link (`tc` token "
        "bucket, both directions); more nodes add links and MPI-over-TCP hops, not CPUs, so "
        f"no speedup here can pass about {m['parallel_capacity'][0]} (the parallel capacity "
        "measured at the start; "
        f"{m['parallel_capacity'][1]} at the end). Speedups are same-run ratios.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Rank 0 runs alone on a node of its own; each worker node has {s['ranks_per_node']} "
        f"worker rank(s) ({s['engine']} engine, workers per rank from the node's cores). "
        f"`strong`: one {s['size']} image, `{s['op']}`, tile {s['tile']}, from a client on the "
        f"bridge. `batch`: {s['batch_images']} JPEGs (gen-dataset, 300–600 px) → `{s['batch_op']}` "
        "by `python -m mpi_imgproc.batch`, rank 0 reading and writing the files, mpiexec "
        "start-up included. Every output was checked equal to the single-process reference "
        f"({', '.join(f'{k} {v:.3f} s' for k, v in result['reference_s'].items())}, one "
        f"thread). Median of {s['repeat']} rounds after a warm-up.",
        "",
        markdown_table(rows, COLUMNS),
        "",
        "*Rank 0 link busy s*: the time its busier direction needs at the link's rate alone; "
        "when it nears the wall time, the star through rank 0 is the limit and more nodes "
        "cannot help. *Peak*: the highest rate over any 100 ms window, against the rate.",
        "",
        *[f"- {line}" for line in findings(rows)],
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs ({cores} usable), "
        f"MPI {m['mpi_library'][:60]}, load average {m['load_average']}.",
    ]
    return "\n".join(lines) + "\n"


def report_rows(summary: Sequence[dict]) -> list[dict]:
    """The summary as the table shows it: by workload, links and node counts in measured
    order, both directions of rank 0's link in one column."""
    rows = sorted((dict(r) for r in summary), key=lambda r: r["workload"])
    for row in rows:
        row["rank0_sent_mb"] = f"{_mb(row['rank0_sent_mb'])} / {_mb(row['rank0_received_mb'])}"
    return rows


def findings(rows: list[dict]) -> list[str]:
    """One sentence per workload and link: where the time went."""
    said = []
    for workload in sorted({r["workload"] for r in rows}):
        for link in sorted({r["link"] for r in rows}):
            group = [r for r in rows if r["workload"] == workload and r["link"] == link]
            if not group:
                continue
            last = group[-1]
            busy = last.get("rank0_link_busy_s")
            share = f"{100 * busy / last['wall_s']:.0f}%" if busy else "—"
            said.append(
                f"{workload} at {link}: {last['nodes']} worker nodes take "
                f"{last['wall_s']:.2f} s ({last['vs_one_node']:.2f}× one node); rank 0's link "
                f"would need {share} of that time at its rate alone, its peak was "
                f"{_pct(last.get('rank0_peak_use'))} of the rate."
            )
    return said


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """nodes.json and nodes.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json(result, out / "nodes.json"), out / "nodes.md"]
    written[1].write_text(markdown_report(result))
    return written


# -- the command line -----------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    """``bench --nodes`` settings; refuses what cannot run, naming the option."""
    if args.nodes < 1:
        raise ImgprocError(f"--nodes must be at least 1, got {args.nodes}")
    if args.ranks_per_node < 1:
        raise ImgprocError(f"--ranks-per-node must be at least 1, got {args.ranks_per_node}")
    ops = args.op or ["bilateral:d=9"]
    if len(ops) != 1:
        raise ImgprocError("--nodes measures one --op (a+b chains are one op)")
    engines = parse_list(args.engines or "threads", str)
    s = NodeSettings(
        out=Path(args.out),
        nodes=args.nodes,
        links=parse_list(args.link, Link.parse),
        op=ops[0],
        size=parse_size(args.size or "3000x3000"),
        tile=args.tile or "auto",
        engine=engines[0],
        ranks_per_node=args.ranks_per_node,
        batch_images=args.batch_images,
        repeat=args.repeat or 2,
        seed=args.seed,
        timeout=args.timeout,
    )
    s.command = " ".join(
        ["mpi-imgproc", "bench", "--nodes", str(s.nodes), "--link", args.link, "--op", s.op]
        + ["--size", f"{s.size.width}x{s.size.height}", "--tile", s.tile, "--engines", s.engine]
        + ["--ranks-per-node", str(s.ranks_per_node), "--batch-images", str(s.batch_images)]
        + ["--repeat", str(s.repeat), "--seed", str(s.seed), "--out", str(s.out)]
    )
    return s


def cmd_node_bench(args: argparse.Namespace) -> int:
    """Run ``bench --nodes``, write nodes.json and nodes.md, print the table."""
    s = settings_from_args(args)
    s.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = run_node_bench(s)
    written = write_report(result, s.out)
    print(markdown_table(report_rows(result["summary"]), COLUMNS))
    print(f"wrote {', '.join(map(str, written))} in {result['seconds']:.0f} s")
    return 0
