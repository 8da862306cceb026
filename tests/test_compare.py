"""``mpi-imgproc compare`` and the page's compare view: every method on the same images, every
output checked equal to the sequential engine's, figures only where they were measured."""

from __future__ import annotations

import json

import pytest
from conftest import write_images

from mpi_imgproc.cli import main
from mpi_imgproc.compare import CompareError, cluster_speedup, summarise

pytestmark = pytest.mark.timeout(180)


def test_compare_writes_every_output_from_measured_exact_runs(tmp_path, capsys):
    folder = tmp_path / "in"
    write_images(folder, 4, size=(150, 200))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    out = tmp_path / "out"
    code = main([
        "compare", str(folder), "--op", "gaussian_blur:ksize=7", "--op", "invert",
        "--out", str(out), "--ranks", "1,2", "--repeat", "2",
        "--methods", "sequential,threads,pool",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr()
    result = json.loads((out / "compare.json").read_text())
    methods = [row["method"] for row in result["summary"]]
    assert methods == ["sequential", "threads", "pool", "cluster-n1", "cluster-n2"]
    assert all(row["exact"] and row["samples"] == 2 for row in result["summary"])
    assert all(row["min_s"] <= row["median_s"] <= row["max_s"] for row in result["summary"])
    assert result["ranks_measured"] == [1, 2]
    assert any("broken.png" in note for note in result["notes"])
    for stem in ("time", "speedup", "efficiency", "cluster_scaling", "job_utilisation",
                 "job_timeline"):  # fmt: skip
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("method,") and len(rows) == 6
    report = (out / "report.md").read_text()
    assert "measured at -n 1, 2 only" in report and "| cluster-n2 |" in report
    page = (out / "report.html").read_text()
    assert page.count("<svg") >= 6 and "http://" not in page.split("<svg", 1)[0]


def test_with_files_every_method_reads_and_writes_and_batch_mode_is_measured(tmp_path):
    folder = tmp_path / "in"
    write_images(folder, 3, size=(200, 240), suffix=".jpg")
    out = tmp_path / "out"
    code = main([
        "compare", str(folder), "--op", "resize:width=64,height=64,interpolation=lanczos",
        "--out", str(out), "--ranks", "2", "--repeat", "1", "--batch",
        "--methods", "sequential,pool",
    ])  # fmt: skip
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["io"] is True
    methods = {row["method"]: row for row in result["summary"]}
    assert set(methods) == {"sequential", "pool", "batch-n2", "cluster-n2"}
    assert all(row["exact"] for row in methods.values())  # decoded files equal, JPEG and all
    assert methods["batch-n2"]["kind"] == "batch" and methods["batch-n2"]["ranks"] == 2


def test_a_speedup_is_given_only_at_a_rank_count_measured():
    samples = [
        {"method": "sequential", "kind": "local", "ranks": 0, "cores": 1, "wall_s": w,
         "exact": True}
        for w in (2.0, 2.2, 1.8)
    ] + [
        {"method": "cluster-n3", "kind": "cluster", "ranks": 3, "cores": 2, "wall_s": w,
         "exact": True}
        for w in (1.0, 1.1, 0.9)
    ]  # fmt: skip
    summary = summarise(samples, images=4)
    cluster = summary[-1]
    assert cluster["speedup"] == pytest.approx(2.0)
    assert cluster["speedup_min"] == pytest.approx(2.0 / 1.1)
    assert cluster["efficiency"] == pytest.approx(1.0)
    assert cluster_speedup(summary, 3) == pytest.approx(2.0)
    with pytest.raises(CompareError, match="-n 8 was not measured .measured: 3."):
        cluster_speedup(summary, 8)


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [("--ranks", "0,2", "--ranks must be 1..256"), ("--ranks", "two", "whole numbers"),
     ("--methods", "threads,fast", "unknown --methods"), ("--tile", "big", "--tile")],
)  # fmt: skip
def test_compare_refuses_bad_settings_before_measuring(tmp_path, capsys, flag, value, words):
    write_images(tmp_path / "in", 1)
    args = ["compare", str(tmp_path / "in"), "--op", "invert", "--out", str(tmp_path / "o")]
    assert main([*args, flag, value]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
