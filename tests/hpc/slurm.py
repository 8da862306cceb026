"""A real one-host Slurm for the tests: munged, slurmctld and slurmd on private paths.

Everything lives in one fresh folder (configuration, munge key and socket, state, spool, logs)
and every daemon is a child of the test run, so nothing outside is touched; ``one_host_slurm``
cancels the jobs, stops the daemons and removes the folder on exit.  The settings need no
cgroups (``proctrack/linuxproc``, ``task/none``), so they work inside a container.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scancel", "scontrol", "sinfo", "squeue")

SLURM_CONF = """\
ClusterName=imgproc
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=pmi2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing_requirements() -> str | None:
    """Why a real Slurm cannot run here, or None."""
    if os.geteuid() != 0:
        return "a one-host Slurm needs root (munged, slurmctld and slurmd run as root here)"
    missing = [name for name in (*DAEMONS, *CLIENTS) if not shutil.which(name)]
    if missing:
        return (
            f"Slurm or munge is not installed ({', '.join(missing)} missing): "
            "`make test-hpc` as root installs slurmctld, slurmd, slurm-client and munge"
        )
    return None


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Slurm:
    """A running one-host Slurm: its configuration, its clients' environment and its jobs."""

    def __init__(self, root: Path, cpus: int):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        """This environment with the clients pointed at this Slurm, plus ``extra``."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *cmd: str, timeout: float = 30, **extra: str) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``sinfo``, ``srun``, ...) against this Slurm."""
        return subprocess.run(
            cmd, env=self.env(**extra), capture_output=True, text=True, timeout=timeout
        )

    def sbatch(self, script: str | Path, *options: str, cwd: Path, **extra: str) -> str:
        """Submit ``script`` with command-line ``options`` (they override its #SBATCH lines)
        and environment ``extra``; returns the job id."""
        done = subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            cwd=cwd,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, ...)."""
        shown = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", shown))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until the job has ended; returns its fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields.get("JobState") not in (None, "PENDING", "RUNNING", "CONFIGURING"):
                if fields.get("JobState") != "COMPLETING":
                    return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')}")

    def node_state(self) -> str:
        """The node's state as ``sinfo`` reports it (``idle``, ``mixed``, ``down*``, ...)."""
        return self.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip()

    def logs(self) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            parts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-15:]))
        return "\n".join(parts)

    def start(self) -> None:
        """Write the configuration and the munge key, start the daemons, wait for idle."""
        for folder in ("munge", "state", "spool"):
            (self.root / folder).mkdir(mode=0o755)
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, timeout=30)
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                root=self.root,
                cpus=self.cpus,
                ctld_port=free_port(),
                slurmd_port=free_port(),
            )
        )
        munge = self.root / "munge"
        self._daemon(
            "munged",
            "--foreground",
            f"--socket={munge / 'munge.socket'}",
            f"--key-file={key}",
            f"--log-file={munge / 'munged.log'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        self._wait_for(lambda: (munge / "munge.socket").exists(), "munged's socket")
        self._daemon("slurmctld", "-D", "-f", str(self.conf))
        self._daemon("slurmd", "-D", "-f", str(self.conf))
        self._wait_for(lambda: self.node_state() == "idle", f"node {self.host} idle")

    def _daemon(self, *cmd: str) -> None:
        log = open(self.root / f"{cmd[0]}.out", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        log.close()
        self.daemons.append(proc)

    def _wait_for(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"{', '.join(dead)} exited while waiting for {what}\n" + self.logs()
                )
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"no {what} after {timeout:.0f} s\n" + self.logs())

    def stop(self) -> None:
        """Cancel every job, wait for them to end, stop the daemons (slurmd first)."""
        if self.conf.exists() and any(p.poll() is None for p in self.daemons):
            self.run("scancel", "--full", "--user", "root")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h").stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


@contextmanager
def one_host_slurm(cpus: int = 4) -> Iterator[Slurm]:
    """A Slurm whose one node is this host with ``cpus`` CPUs; gone again on exit.

    ``cpus`` may exceed the real cores (``SlurmdParameters=config_overrides``): with
    ``task/none`` nothing is bound, so the tasks share the host's cores.
    """
    # munged insists that every folder above its socket is searchable by all (not pytest's
    # 0700 tmp_path), so the folder is made here and opened up.
    root = Path(tempfile.mkdtemp(prefix="mpi-imgproc-slurm-"))
    root.chmod(0o755)
    slurm = Slurm(root, cpus)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)
