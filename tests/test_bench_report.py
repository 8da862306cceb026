"""The bench's outputs: medians and fits from samples, and the files a run writes.

Timings are never asserted: synthetic samples with known times check the arithmetic and the
files; one tiny real run checks that the bench drives real clusters end to end.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest

from mpi_imgproc import report
from mpi_imgproc.bench import (
    Case,
    ClusterShape,
    ClusterSpec,
    Settings,
    Workload,
    cluster_row,
    reference_row,
    run_bench,
    run_recommend,
    settings_from_args,
)
from mpi_imgproc.cli import build_parser
from mpi_imgproc.errors import ImgprocError
from mpi_imgproc.metrics import amdahl_speedup, gustafson_speedup
from mpi_imgproc.report import write_recommendation

OP = "gaussian_blur:ksize=3"
IMAGE = Workload(64, 80)
SERIAL = 0.2  # the synthetic runs follow Amdahl's and Gustafson's laws with this fraction
MACHINE = {
    "cpu_count": 2,
    "usable_cores": 2,
    "cpu_model": "Test CPU",
    "memory_gib": 1.0,
    "mpi_library": "MPICH Version: 0.0",
    "mpiexec": "HYDRA 0.0",
    "gpu": "none usable (test)",
    "platform": "test",
    "python": "3",
    "versions": {},
    "load_average": [0.0, 0.0, 0.0],
    "parallel_capacity": [2.0, 2.0],
}


def _stats(seconds: float, workers: int) -> dict:
    per_rank = {"tiles": 4, "busy_s": seconds / 2, "bytes": 1000, "maxrss_mb": 50.0}
    ranks = {str(r): dict(per_rank) for r in range(1, workers + 1)}
    return {
        "queue": 0.001,
        "decode": 0.0,
        "compute": seconds / 2,
        "total": seconds * 0.9,
        "ranks": ranks,
    }


def _cluster_sample(experiment: str, ranks: int, work: Workload, seconds: float, tile="16"):
    workers = max(1, ranks - 1)
    shape = ClusterShape(workers, 1, workers, workers, False)
    case = Case(experiment, OP, work, tile)
    return cluster_row(
        ClusterSpec("sequential", ranks), shape, case, 1, seconds, _stats(seconds, workers)
    )


def synthetic_result() -> dict:
    """References of 1 s per image; strong and weak runs that follow the laws exactly."""
    samples = []
    for images in (1, 2, 3):
        work = Workload(IMAGE.height, IMAGE.width, images)
        samples.append(reference_row("sequential", OP, work, 1, float(images)))
        samples.append(reference_row("opencv", OP, work, 1, 0.9 * images))
    for ranks in (2, 3, 4):
        n = ranks - 1
        samples.append(_cluster_sample("strong", ranks, IMAGE, 1.0 / amdahl_speedup(SERIAL, n)))
        weak = Workload(IMAGE.height, IMAGE.width, n)
        samples.append(_cluster_sample("weak", ranks, weak, n / gustafson_speedup(SERIAL, n)))
    for tile, seconds in (("8", 0.9), ("16", 0.6), ("32", 0.7), ("auto", 0.65)):
        samples.append(_cluster_sample("tiles", 3, IMAGE, seconds, tile))
    for side, seconds in ((32, 0.5), (64, 0.6)):
        samples.append(_cluster_sample("sizes", 3, Workload(side, side), seconds))
    return {
        "command": "mpi-imgproc bench --test",
        "settings": {"repeat": 1, "tile": 16, "available_cores": 2},
        "machine": MACHINE,
        "seconds": 1.0,
        "samples": samples,
        "notes": [],
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    report.write_all(synthetic_result(), out)
    return out


def test_speedup_is_against_the_sequential_reference_of_the_same_images():
    summary = report.summarise(synthetic_result()["samples"])
    strong = {r["ranks"]: r for r in summary if r["experiment"] == "strong"}
    assert strong[3]["speedup"] == pytest.approx(amdahl_speedup(SERIAL, 2))
    assert strong[3]["efficiency"] == pytest.approx(amdahl_speedup(SERIAL, 2) / 2)
    assert strong[3]["speedup_vs_opencv"] == pytest.approx(0.9 * amdahl_speedup(SERIAL, 2))


def test_fits_recover_the_serial_fraction_of_synthetic_runs():
    fits = report.scaling_fits(report.summarise(synthetic_result()["samples"]))
    by_law = {f["law"]: f for f in fits}
    assert by_law["amdahl"]["serial_fraction"] == pytest.approx(SERIAL, abs=1e-5)
    assert by_law["gustafson"]["serial_fraction"] == pytest.approx(SERIAL, abs=1e-5)


@pytest.mark.parametrize("name", ["samples.csv", "summary.csv", "results.json", "report.md"])
def test_a_run_writes_its_data_files(written, name):
    assert (written / name).stat().st_size > 0


def test_samples_csv_has_the_documented_columns_and_every_sample(written):
    with open(written / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.SAMPLE_COLUMNS
    assert len(rows) == len(synthetic_result()["samples"])


def test_summary_csv_has_speedup_efficiency_and_throughput(written):
    with open(written / "summary.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.SUMMARY_COLUMNS
        strong = [r for r in reader if r["experiment"] == "strong"]
    assert all(float(r["speedup"]) > 0 and float(r["throughput_mp_s"]) > 0 for r in strong)


def test_results_json_holds_samples_summary_and_fits(written):
    data = json.loads((written / "results.json").read_text())
    assert {"samples", "summary", "fits", "machine", "command"} <= set(data)


@pytest.mark.parametrize("name", report.PLOTS)
def test_every_plot_is_a_non_empty_image(written, name):
    pixels = matplotlib.image.imread(written / name)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0.01  # not a blank canvas


def test_report_states_machine_command_and_findings(written):
    text = (written / "report.md").read_text()
    for expected in (
        "Test CPU",
        "MPICH Version: 0.0",
        "mpi-imgproc bench --test",
        "## Findings",
        "Amdahl serial fraction 0.20",
        "speedup.png",
    ):
        assert expected in text


def test_recommendation_picks_the_fastest_measured_case():
    samples = [reference_row("sequential", OP, IMAGE, 1, 0.5)]
    for flight, tile, seconds in ((1, "0", 0.6), (1, "16", 0.4), (2, "16", 0.3), (2, "32", 0.35)):
        row = _cluster_sample("recommend", 3, IMAGE, seconds, tile)
        samples.append(dict(row, in_flight=flight))
    rec = report.recommendation(samples, OP, IMAGE.height, IMAGE.width, 2, 2)
    assert (rec["best"]["tile"], rec["best"]["in_flight"]) == ("16", 2)
    assert rec["model_choice"]["tile"] in (0, 8, 16, 32, 64)
    assert "Best measured: tile 16" in report.recommendation_text(rec)


def _settings(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["bench", *argv]))


def test_quick_settings_reproduce_themselves_from_their_command():
    quick = _settings("--quick", "--out", "x")
    again = _settings(*quick.command.split()[2:])
    assert again.command == quick.command
    assert again.ranks == quick.ranks and again.sizes == quick.sizes


@pytest.mark.parametrize(
    "argv", [["--engines", "warp"], ["--ranks", "0"], ["--op", "blur:k=1"], ["--repeat", "-1"]]
)
def test_bad_settings_are_refused_naming_the_option(argv):
    with pytest.raises(ImgprocError):
        _settings(*argv)


@pytest.mark.timeout(90)
def test_a_tiny_real_run_measures_clusters_and_writes_a_report(tmp_path):
    tiny = "--ranks 1,2 --engines sequential --size 48x64 --weak-size 32 --sizes 32 --tile 16"
    s = _settings(
        *tiny.split(), "--tiles", "16,auto", "--repeat", "1", "--op", OP, "--out", str(tmp_path)
    )
    result = run_bench(s)
    kinds = {(r["kind"], r["experiment"]) for r in result["samples"]}
    assert {("reference", "reference"), ("cluster", "strong"), ("cluster", "tiles")} <= kinds
    assert all(r["exact"] for r in result["samples"])
    written = report.write_all(result, tmp_path)
    assert (tmp_path / "report.md") in written and (tmp_path / "speedup.png") in written
    # one job of the largest cluster: per-rank utilisation and a timeline with every task
    assert result["job_stats"]["tasks"] and {t[0] for t in result["job_stats"]["tasks"]} == {1}
    for plot in ("job_utilisation.png", "job_timeline.png"):
        assert (tmp_path / plot) in written and (tmp_path / plot).stat().st_size > 1000
        assert plot in (tmp_path / "report.md").read_text()


@pytest.mark.timeout(90)
def test_a_tiny_real_recommend_run_picks_a_measured_tile(tmp_path):
    tiny = "--recommend --ranks 2 --engines sequential --size 64x96 --tiles 0,32,auto"
    s = _settings(
        *tiny.split(), "--in-flight", "1,2", "--repeat", "1", "--op", OP, "--out", str(tmp_path)
    )
    result = run_recommend(s)
    rec = result["recommendation"]
    assert {str(c["tile"]) for c in rec["cases"]} == {"0", "32", "auto"}
    assert rec["best"]["tile"] in ("0", "32", "auto")
    text = write_recommendation(result, tmp_path)
    assert "Best measured" in text and (tmp_path / "recommend.json").exists()


def test_failed_cases_are_reported_once_per_cluster_and_error():
    failures = [
        {"cluster": "-n 2 processes", "case": f"case {i}", "error": "engine_crashed: boom"}
        for i in range(3)
    ]
    notes = report.failure_notes(failures)
    assert notes == [
        "Not measured on `-n 2 processes`: 3 case(s) failed (engine_crashed: boom); first: case 0"
    ]
    found = report.findings([], [], MACHINE, failures)
    assert any("`processes` could not be measured" in f for f in found)
