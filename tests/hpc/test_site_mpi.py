"""The site-MPI lane: Debian's Open MPI, and mpi4py built from source against it exactly as
README.md's "The site's MPI" says, in a second environment (built once, see ``SITE``).

With it: cluster tests under Open MPI's ``mpiexec``, a batch run under ``mpirun``, the README's
``srun --mpi=pmix`` check on a real Slurm, and a launcher that does not match mpi4py's MPI
stopped with one line instead of N separate rank-0 servers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from refusal import SERVE, the_one_refusal
from slurm import missing_requirements as slurm_missing
from slurm import one_host_slurm

from mpi_imgproc.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[2]
# Built once per machine, outside the checkout, like the Debian packages: compiling mpi4py
# takes minutes on two cores.  Each run points its editable install at this checkout.
SITE = Path(
    os.environ.get("MPI_IMGPROC_SITE_VENV", Path.home() / ".cache" / "mpi_imgproc" / "venv-site")
)
SITE_PYTHON = SITE / "bin" / "python"
# Open MPI refuses root and more ranks than cores unless told; the test host has 2 cores.
OPEN_MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}
# A selection of tests/test_cluster.py that keeps the lane short: exactness, progress, bad
# requests, concurrent clients, cancel, idle CPU, 1 and 2 ranks, CURVE, other engines.  All of
# it but two passes under Open MPI (docs/hpc.md): the info test expects "MPICH" by name, and
# after SIGTERM mpirun exits 1 whatever its ranks did (checked below instead).
CLUSTER_TESTS = (
    "bit_identical or progress_streams or bad_requests or concurrent_clients or cancel_ends "
    "or idle_ranks_sleep or one_and_two_ranks or curve or other_engines"
)


def open_mpi_bin() -> str | None:
    """The folder of Debian's Open MPI programs (where its ompi_info is), or None."""
    info = shutil.which("ompi_info")
    return str(Path(info).parent) if info else None


def site_path() -> str:
    """PATH as ``module load openmpi`` leaves it: Open MPI's programs first, and without the
    test environment's own bin (its mpich wheel has an mpicc, mpiexec and mpirun too)."""
    ours = str(Path(sys.executable).parent)
    rest = [p for p in os.environ["PATH"].split(os.pathsep) if p != ours]
    return os.pathsep.join([str(open_mpi_bin()), *rest])


def missing_requirements() -> str | None:
    """Why the lane cannot run here, or None."""
    if os.geteuid() != 0:
        return "the site-MPI lane runs Open MPI as root (make test-hpc installs it as root)"
    wrapper = shutil.which("mpicc", path=site_path()) if open_mpi_bin() else None
    version = ""
    if wrapper:
        shown = subprocess.run([wrapper, "--showme:version"], capture_output=True, text=True)
        version = shown.stdout + shown.stderr
    if "Open MPI" not in version:
        return "Debian's Open MPI is not installed (openmpi-bin, libopenmpi-dev): run make test-hpc"
    return None


pytestmark = [
    pytest.mark.timeout(2400),  # the first run builds mpi4py: minutes on two cores
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]


def site_library() -> str:
    """What MPI the site environment's mpi4py is built against ('' when it has none)."""
    if not SITE_PYTHON.exists():
        return ""
    ran = subprocess.run(
        [str(SITE_PYTHON), "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, **OPEN_MPI_ENV),
    )
    return ran.stdout if ran.returncode == 0 else ""


def build_site_venv() -> None:
    """``make install``'s environment, then README.md's recipe, line by line."""
    shutil.rmtree(SITE, ignore_errors=True)
    pip = [str(SITE_PYTHON), "-m", "pip"]
    steps = [
        [shutil.which("python3"), "-m", "venv", str(SITE)],
        [*pip, "install", "--quiet", "--upgrade", "pip"],
        [*pip, "install", "--quiet", "-e", f"{REPO}[test,mpich]"],
        # The recipe: the mpich wheel out (its mpiexec would shadow the site's), mpi4py built
        # from source with the site's compiler wrapper.
        [*pip, "uninstall", "-y", "mpich"],
        [*pip, "install", "--no-cache-dir", "--no-binary=mpi4py", "--force-reinstall", "mpi4py"],
    ]
    env = dict(os.environ, PATH=site_path(), MPICC=shutil.which("mpicc", path=site_path()))
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1200, env=env)
        assert done.returncode == 0, (
            f"{' '.join(step)}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )


@pytest.fixture(scope="module")
def site() -> Path:
    """The site environment's Python, built by the recipe when it is missing or stale, with
    this checkout installed in it (mpi4py, already satisfied, stays as built)."""
    if "Open MPI" not in site_library():
        build_site_venv()
    here = [str(SITE_PYTHON), "-m", "pip", "install", "--quiet", "-e", f"{REPO}[test]"]
    done = subprocess.run(here, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Open MPI" in site_library(), "mpi4py in the site environment is not on Open MPI"
    return SITE_PYTHON


def site_env(python: Path, **extra: str) -> dict[str, str]:
    """The environment of a run with the site environment: its bin first on PATH (no
    mpiexec there), then Open MPI's, and Open MPI allowed to run as root and oversubscribe."""
    path = f"{python.parent}{os.pathsep}{site_path()}"
    return dict(os.environ, PATH=path, PYTHONUNBUFFERED="1", **OPEN_MPI_ENV, **extra)


def run_site(python: Path, *cmd: str, timeout: float = 120, **extra: str):
    """Run ``cmd`` in :func:`site_env`."""
    env = site_env(python, **extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_recipe_builds_mpi4py_on_open_mpi(site):
    assert site_library().startswith("Open MPI v4.1")
    listed = run_site(site, str(site), "-m", "pip", "list", "--format=json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "mpi4py" in names and "mpich" not in names
    assert not (site.parent / "mpiexec").exists()


def test_the_cluster_tests_pass_under_open_mpi(site):
    ran = run_site(
        site, str(site), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
        str(REPO / "tests" / "test_cluster.py"), "-k", CLUSTER_TESTS,
        timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    assert " passed" in ran.stdout and "failed" not in ran.stdout


def test_the_server_reports_open_mpi_and_one_world(site):
    probe = (
        "from mpi_imgproc.launch import running_cluster\n"
        "from mpi_imgproc.client import Client\n"
        "with running_cluster(3) as cluster, Client(cluster.address) as client:\n"
        "    info = client.info()\n"
        "    print(info['ranks'], info['versions']['mpi'])\n"
    )
    ran = run_site(site, str(site), "-c", probe)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("3 Open MPI v4.1") and "\0" not in ran.stdout, ran.stdout


def test_sigterm_to_mpirun_stops_every_rank_of_the_server(site):
    # Open MPI's mpirun forwards SIGTERM to every rank, and exits 1 itself whatever the ranks
    # did (Hydra's mpiexec passes their 0 on).
    cmd = [
        "mpirun",
        "-n",
        "4",
        str(site),
        "-m",
        "mpi_imgproc.server",
        "--bind",
        "tcp://127.0.0.1:*",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=site_env(site),
        start_new_session=True,
    )
    try:
        assert "listening on" in proc.stdout.readline()
        ranks = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if "python" in p.name()
        ]
        assert len(ranks) == 4
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert "mpi_imgproc server stopped" in rest and elapsed < 10, rest
    assert proc.returncode == 1
    # mpirun may return while its ranks are still exiting: each must be gone within 10 s.
    _, alive = psutil.wait_procs(ranks, timeout=10 - elapsed)
    assert not alive, alive


def test_a_batch_run_under_mpirun_is_exact(site, tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "in").mkdir()
    for i in range(6):
        image = rng.integers(0, 256, (70 + i, 90, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "in" / f"img{i}.png"), image)
    ops = ["median_blur:ksize=5", "resize:width=40,height=30,interpolation=lanczos"]
    ran = run_site(
        site, "mpirun", "-n", "3", str(site), "-m", "mpi_imgproc.batch",
        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
        *[a for op in ops for a in ("--op", op)], "--shared-fs",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert (summary["ok"], summary["ranks"]) == (6, 3)
    for path in sorted((tmp_path / "in").iterdir()):
        out = cv2.imread(str(tmp_path / "out" / path.name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(out, Pipeline.parse(ops).apply(cv2.imread(str(path))))


def test_mpich_s_mpiexec_with_an_open_mpi_mpi4py_is_refused_in_one_line(site):
    hydra = Path(sys.executable).parent / "mpiexec"  # the mpich wheel of make install
    ran = run_site(site, str(hydra), "-n", "3", str(site), *SERVE, timeout=60)
    line = the_one_refusal(ran)
    assert "started 3 processes (PMI_SIZE=3) but MPI sees one: mpi4py uses Open MPI" in line


def test_open_mpi_s_mpirun_with_the_mpich_wheel_never_starts_a_server(site):
    # MPICH sees Open MPI's PMIx and stops inside MPI_Init, before any Python code of ours.
    ran = run_site(site, "mpirun", "-n", "3", sys.executable, *SERVE, timeout=60)
    assert ran.returncode != 0 and "listening on" not in ran.stdout
    assert "unsupported PMI version PMIx" in ran.stderr


@pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))
def test_the_readme_s_srun_pmix_check_gives_distinct_ranks(site):
    with one_host_slurm(cpus=4) as slurm:
        ran = slurm.run(
            "srun", "-n", "4", "--mpi=pmix", str(site), "-m", "mpi4py.bench", "helloworld",
            timeout=120, **OPEN_MPI_ENV,
        )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = sorted(ran.stdout.splitlines())
    assert len(lines) == 4, ran.stdout
    for rank, line in enumerate(lines):
        assert f"process {rank} of 4" in line
