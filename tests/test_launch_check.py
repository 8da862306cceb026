"""Start-up checks of how the ranks were launched: a launcher whose processes each see a world
of one is named, and each rank's default engine workers follow its CPU binding."""

from __future__ import annotations

from mpi_imgproc.launch_check import launcher_mismatch
from mpi_imgproc.server import cores_for_worker


def cpus(*numbers: int) -> frozenset[int]:
    return frozenset(numbers)


NODE = cpus(*range(8))


def test_unbound_workers_share_the_node():
    assert cores_for_worker(NODE, [NODE, NODE, NODE]) == 2


def test_workers_bound_to_their_own_cpus_keep_them_whole():
    bound = [cpus(0, 1, 2, 3), cpus(4, 5, 6, 7)]
    assert cores_for_worker(bound[0], bound) == 4


def test_workers_bound_to_a_socket_share_that_socket():
    sockets = [cpus(0, 1, 2, 3)] * 2 + [cpus(4, 5, 6, 7)] * 2
    assert cores_for_worker(sockets[0], sockets) == 2


def test_rank_0_alone_uses_all_its_cpus_and_a_crowded_rank_still_gets_one():
    assert cores_for_worker(NODE, []) == 8
    assert cores_for_worker(cpus(0), [cpus(0)] * 3) == 1


def test_several_processes_of_one_each_are_a_mismatch_named_by_its_variable():
    reason, first = launcher_mismatch(1, {"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "0"})
    assert first and reason.startswith("Open MPI's mpirun started 3 processes")
    assert "(OMPI_COMM_WORLD_SIZE=3) but MPI sees one" in reason


def test_only_the_launchers_first_process_speaks():
    found = launcher_mismatch(1, {"PMI_SIZE": "4", "PMI_RANK": "2"})
    assert found is not None and found[1] is False


def test_srun_is_named_with_its_plugin_even_when_it_also_sets_pmi_size():
    reason, _ = launcher_mismatch(1, {"SLURM_STEP_NUM_TASKS": "3", "PMI_SIZE": "3"})
    assert reason.startswith("srun started 3 processes") and "--mpi plugin" in reason


def test_agreeing_or_silent_launchers_are_not_a_mismatch():
    assert launcher_mismatch(3, {"OMPI_COMM_WORLD_SIZE": "3"}) is None
    assert launcher_mismatch(1, {"PMI_SIZE": "1", "PMI_RANK": "0"}) is None
    assert launcher_mismatch(1, {}) is None
    # A batch script itself (no job step) runs once, whatever the job's task count.
    assert launcher_mismatch(1, {"SLURM_NTASKS": "3", "SLURM_PROCID": "0"}) is None
