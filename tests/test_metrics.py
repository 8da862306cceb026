"""The arithmetic of the benchmarks: speedup, efficiency, scaling laws and the tile model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpi_imgproc.metrics import (
    TiledWork,
    TileModel,
    amdahl_fit,
    amdahl_speedup,
    cores_used,
    efficiency,
    fit_tile_model,
    gustafson_fit,
    gustafson_speedup,
    karp_flatt,
    median,
    predict_tile_time,
    recommend_tile,
    speedup,
    throughput,
    tile_geometry,
)

CORES = [1, 2, 4, 8, 16, 64]


def test_speedup_is_reference_time_over_measured_time():
    assert speedup(10.0, 2.5) == 4.0


def test_speedup_below_one_means_slower_than_the_reference():
    assert speedup(1.0, 4.0) == 0.25


@pytest.mark.parametrize("reference, measured", [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_speedup_refuses_non_positive_times(reference, measured):
    with pytest.raises(ValueError):
        speedup(reference, measured)


def test_efficiency_is_speedup_per_core():
    assert efficiency(3.0, 4) == 0.75


def test_efficiency_refuses_zero_cores():
    with pytest.raises(ValueError):
        efficiency(1.0, 0)


def test_throughput_is_megapixels_per_second():
    assert throughput(16.0, 2.0) == 8.0


def test_cores_used_never_exceeds_the_machine():
    assert cores_used(3, 2) == 2  # -n 4 on 2 cores: 3 workers share 2 cores
    assert cores_used(1, 2) == 1


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_median_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        median([])


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.9])
def test_amdahl_fit_recovers_a_known_serial_fraction(fraction):
    fit = amdahl_fit(CORES, [amdahl_speedup(fraction, n) for n in CORES])
    assert fit.serial_fraction == pytest.approx(fraction, abs=1e-12)
    assert fit.rmse == pytest.approx(0.0, abs=1e-9)


def test_amdahl_fit_on_noisy_data_stays_close_to_the_true_fraction():
    rng = np.random.default_rng(7)
    cores = CORES * 5
    noisy = [amdahl_speedup(0.1, n) * rng.normal(1.0, 0.02) for n in cores]
    assert amdahl_fit(cores, noisy).serial_fraction == pytest.approx(0.1, abs=0.01)


def test_amdahl_fit_ignores_single_core_points():
    with_one = amdahl_fit([1, 2, 4], [0.5, amdahl_speedup(0.2, 2), amdahl_speedup(0.2, 4)])
    assert with_one.serial_fraction == pytest.approx(0.2)
    assert with_one.points == 2


def test_amdahl_fit_needs_a_point_on_more_than_one_core():
    with pytest.raises(ValueError, match="more than one core"):
        amdahl_fit([1, 1], [1.0, 0.9])


def test_amdahl_fit_above_one_means_slower_than_the_reference():
    assert amdahl_fit([2, 4], [0.5, 0.4]).serial_fraction > 1


def test_amdahl_limit_is_one_over_the_serial_fraction():
    fit = amdahl_fit(CORES, [amdahl_speedup(0.25, n) for n in CORES])
    assert fit.limit == pytest.approx(4.0)
    assert fit.predict(1e9) == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_gustafson_fit_recovers_a_known_serial_fraction(fraction):
    fit = gustafson_fit(CORES, [gustafson_speedup(fraction, n) for n in CORES])
    assert fit.serial_fraction == pytest.approx(fraction, abs=1e-12)
    assert fit.predict(64) == pytest.approx(64 - fraction * 63)


def test_karp_flatt_of_amdahl_data_is_the_serial_fraction_at_every_core_count():
    for n in CORES[1:]:
        assert karp_flatt(amdahl_speedup(0.15, n), n) == pytest.approx(0.15)


def test_karp_flatt_is_undefined_on_one_core():
    assert math.isnan(karp_flatt(1.0, 1))


# -- the tile model ---------------------------------------------------------------------------


def test_tile_geometry_counts_tiles_and_halo_pixels():
    # 10x10 in tiles of 5 with halo 1: 4 tiles, each region 6x6 (clipped at the image border)
    work = TiledWork(10, 10, cost_ns=1.0, channels=1, halo=1)
    assert tile_geometry(work, 5) == (4, 12 * 12)


def test_tile_geometry_of_the_whole_image_reads_each_pixel_once():
    work = TiledWork(30, 40, cost_ns=1.0, channels=3, halo=4)
    assert tile_geometry(work, 0) == (1, 30 * 40 * 3)
    assert tile_geometry(work, 64) == (1, 30 * 40 * 3)


def test_tile_geometry_of_strips_spans_the_full_width():
    work = TiledWork(100, 50, cost_ns=1.0, channels=1, halo=2, full_rows=True)
    tasks, read = tile_geometry(work, 25)
    assert tasks == 4
    assert read == (100 + 2 * 2 * 3) * 50  # three inner edges, each read twice 2 rows deeper


def test_predicted_time_of_the_whole_image_is_compute_plus_rank0_costs():
    work = TiledWork(1000, 1000, cost_ns=10.0, channels=1)
    model = TileModel(task_overhead_s=1e-3, transfer_ns_per_byte=1.0)
    compute = 1e6 * 10e-9
    rank0 = 1e-3 + 2e6 * 1e-9  # one task; every byte out and back
    assert predict_tile_time(work, 0, 4, 4, model) == pytest.approx(compute + rank0)


def test_recommend_tile_sends_a_cheap_small_image_whole():
    work = TiledWork(200, 200, cost_ns=0.2)
    assert recommend_tile(work, workers=2, cores=2).tile == 0


def test_recommend_tile_cuts_an_expensive_large_image_into_tiles():
    work = TiledWork(4000, 4000, cost_ns=20.0, halo=4)
    choice = recommend_tile(work, workers=8, cores=8)
    assert 0 < choice.tile < 4000
    assert choice.predicted_s < choice.whole_s


def test_fit_tile_model_recovers_the_constants_it_was_given():
    work = TiledWork(3000, 3000, cost_ns=5.0, halo=4)
    truth = TileModel(task_overhead_s=float(np.logspace(-6, -2, 49)[28]), transfer_ns_per_byte=1.0)
    measured = {t: predict_tile_time(work, t, 2, 2, truth) for t in (64, 128, 256, 512, 0)}
    model, error = fit_tile_model(work, measured, 2, 2)
    assert model.task_overhead_s == pytest.approx(truth.task_overhead_s, rel=1e-9)
    assert error < 0.05
