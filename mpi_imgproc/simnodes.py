"""Simulated nodes on one machine: Linux network namespaces joined by a bridge.

Each node is a network namespace with an address of its own on a private bridge, a host name
of its own (a UTS namespace per command) and optionally a shaped link (``tc``: a token
bucket for the rate, ``netem`` for a delay) and a CPU set (``taskset``).  MPICH's ``mpiexec``
starts ranks on the nodes through its launcher hook::

    mpiexec -launcher ssh -launcher-exec LAUNCHER -f HOSTFILE -n N python -m ...

where LAUNCHER, a script written here, does what ``ssh`` would: it drops the options Hydra
gives ssh, takes the host name and runs the rest as a shell command in that node::

    ip netns exec NODE unshare --uts sh -c 'hostname NODE; exec CMD'

``mpiexec`` itself runs in one more namespace, the head node (like a login node), under its
own host name.  Names resolve through ``/etc/netns/NODE/hosts``, which ``ip netns exec``
mounts over ``/etc/hosts`` inside that namespace only: the machine's own ``/etc/hosts`` is
never touched.  MPI between nodes goes over TCP (``UCX_TLS=tcp,self``: UCX would otherwise
use shared memory, the nodes being one machine), so every byte between nodes crosses their
links, where :meth:`SimNodes.counters` reads it.

Everything made here is removed when :func:`simulated_nodes` exits, also after an error:
processes left in a node are killed first.  Needs root (``CAP_NET_ADMIN``).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ImgprocError
from .launch import RANK_SHELL, Cluster, mpiexec, serving

NETNS_ETC = Path("/etc/netns")
# Inside every node the link is called eth0, so one UCX_NET_DEVICES serves all of them.
NODE_DEVICE = "eth0"
MPI_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": NODE_DEVICE}
RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}

LAUNCHER = """#!/bin/sh
# Hydra's ssh launcher: SCRIPT [ssh options] HOST COMMAND...; run COMMAND in node HOST,
# as ssh would (one shell command line), under HOST's own host name and CPU set.
while [ $# -gt 0 ]; do
    case "$1" in -*) shift ;; *) break ;; esac
done
host=$1
shift
case "$host" in
{cases}
    *) echo "launcher: no simulated node named $host" >&2; exit 255 ;;
esac
exec $pin ip netns exec "$host" unshare --uts sh -c "hostname $host; exec $*"
"""


class SimNodesError(ImgprocError):
    """Simulated nodes cannot be made or used here (not root, no ``ip``, a kernel without
    the queueing discipline asked for)."""

    code = "simnodes_error"


@dataclass(frozen=True)
class Link:
    """A link's shape: ``rate`` for ``tc`` (``1gbit``), ``delay`` for netem (``50us``);
    None for either leaves it unlimited."""

    rate: str | None = None
    delay: str | None = None

    @classmethod
    def parse(cls, text: str) -> Link:
        """``RATE``, ``RATE/DELAY`` or ``none`` (unshaped): ``1gbit``, ``10gbit/50us``."""
        rate, _, delay = text.strip().lower().partition("/")
        link = cls(None if rate in ("", "none") else rate, delay or None)
        if link.rate is not None:
            link.bits_per_second  # noqa: B018 - raises on a rate tc would not read
        return link

    @property
    def bits_per_second(self) -> float | None:
        """The rate in bit/s, or None when unlimited."""
        if self.rate is None:
            return None
        for unit in sorted(RATE_UNITS, key=len, reverse=True):
            number = self.rate.removesuffix(unit)
            if number != self.rate:
                try:
                    return float(number) * RATE_UNITS[unit]
                except ValueError:
                    break
        raise SimNodesError(f"link rate must look like 1gbit or 500mbit, got {self.rate!r}")

    def __str__(self) -> str:
        text = self.rate or "unshaped"
        return f"{text}/{self.delay}" if self.delay else text


@dataclass(frozen=True)
class Node:
    """One simulated node: namespace and host name, address, bridge-side device, CPU set."""

    name: str
    address: str
    device: str
    cpus: str | None = None

    def command(self, *cmd: str) -> list[str]:
        """``cmd`` run inside this node, under its host name and CPU set."""
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        inner = f"hostname {self.name}; exec {shlex.join(cmd)}"
        return [*pin, "ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c", inner]


@dataclass(frozen=True)
class LinkCounters:
    """Bytes through a node's link so far: ``sent`` by the node, ``received`` by it."""

    sent: int
    received: int

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(self.sent - other.sent, self.received - other.received)


class SimNodes:
    """K nodes and a head node on one bridge.  Made by :func:`simulated_nodes`."""

    def __init__(self, prefix: str, subnet: ipaddress.IPv4Network, workdir: Path):
        self.prefix = prefix
        self.subnet = subnet
        self.workdir = workdir
        self.bridge = f"{prefix}-br"
        hosts = list(subnet.hosts())
        self.bridge_address = str(hosts[-1])
        self._hosts = hosts
        self.head: Node | None = None
        self.nodes: list[Node] = []
        self.link = Link()
        self.launcher = workdir / "launcher"

    # -- the nodes -------------------------------------------------------------------------

    def add_node(self, index: int, cpus: str | None) -> Node:
        """Namespace, veth pair into the bridge, address, loopback; node 0 is the head."""
        node = Node(
            f"{self.prefix}-{index}", str(self._hosts[index]), f"{self.prefix}-{index}", cpus
        )
        _ip("netns", "add", node.name)
        peer = f"{self.prefix}-p{index}"
        _ip("link", "add", node.device, "type", "veth", "peer", "name", peer)
        _ip("link", "set", node.device, "master", self.bridge, "up")
        _ip("link", "set", peer, "netns", node.name)
        _ip("-n", node.name, "link", "set", peer, "name", NODE_DEVICE)
        _ip(
            "-n",
            node.name,
            "addr",
            "add",
            f"{node.address}/{self.subnet.prefixlen}",
            "dev",
            NODE_DEVICE,
        )
        _ip("-n", node.name, "link", "set", NODE_DEVICE, "up")
        _ip("-n", node.name, "link", "set", "lo", "up")
        return node

    def write_hosts(self) -> None:
        """Every node's private ``/etc/hosts``, naming all the nodes; and the launcher."""
        everyone = [n for n in [self.head, *self.nodes] if n is not None]
        lines = ["127.0.0.1 localhost", f"{self.bridge_address} {self.prefix}-bridge"]
        lines += [f"{n.address} {n.name}" for n in everyone]
        for node in everyone:
            folder = NETNS_ETC / node.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")
        cases = [f"    {n.name}) pin={shlex.quote(_pin(n))} ;;" for n in everyone]
        self.launcher.write_text(LAUNCHER.format(cases="\n".join(cases)))
        self.launcher.chmod(0o755)

    # -- links -----------------------------------------------------------------------------

    def shape(self, link: Link) -> None:
        """Give every node's link (both directions) the shape ``link``."""
        for node in self.nodes:
            for where in ([], ["-n", node.name]):
                device = node.device if not where else NODE_DEVICE
                _set_qdisc(where, device, link)
        self.link = link

    def counters(self) -> dict[str, LinkCounters]:
        """Bytes through each node's link (the head's too), read from the bridge side."""
        return {n.name: _counters(n.device) for n in [self.head, *self.nodes] if n is not None}

    def cut(self, node: Node) -> None:
        """Cut ``node``'s link as a pulled cable would: no packet passes, no connection is
        told."""
        _ip("link", "set", node.device, "down")

    def mend(self, node: Node) -> None:
        """Plug ``node``'s link back in."""
        _ip("link", "set", node.device, "up")

    # -- MPI -------------------------------------------------------------------------------

    def hostfile(self, ranks_per_node: Sequence[int]) -> Path:
        """A Hydra hostfile: ``ranks_per_node[i]`` ranks on node i+1, in rank order."""
        if len(ranks_per_node) > len(self.nodes):
            raise SimNodesError(f"{len(ranks_per_node)} placements for {len(self.nodes)} nodes")
        lines = [f"{n.name}:{k}" for n, k in zip(self.nodes, ranks_per_node) if k > 0]
        path = self.workdir / ("hosts-" + "-".join(map(str, ranks_per_node)))
        path.write_text("\n".join(lines) + "\n")
        return path

    def mpi_command(
        self, ranks_per_node: Sequence[int], module: str, *args: str, survive: bool = False
    ) -> list[str]:
        """``mpiexec`` on the head node starting ``python -m MODULE ARGS`` with
        ``ranks_per_node[i]`` ranks on node i+1 (rank 0 on the first node that has any).

        ``survive``: launched to outlive a dead worker rank (docs/fault-tolerance.md)."""
        launch = [mpiexec(), "-launcher", "ssh", "-launcher-exec", str(self.launcher)]
        launch += ["-f", str(self.hostfile(ranks_per_node)), "-n", str(sum(ranks_per_node))]
        launch += ["-disable-auto-cleanup"] if survive else []
        launch += [
            "-genv",
            "MPI4PY_RC_INITIALIZE",
            "1",
        ]  # ranks initialise MPI even if this process's processes engine set it to 0
        rank = [*RANK_SHELL, sys.executable] if survive else [sys.executable]
        env = [f"{k}={v}" for k, v in MPI_ENV.items()]
        return self.head.command("env", *env, *launch, *rank, "-m", module, *args)

    def kill_processes(self) -> None:
        """Kill whatever still runs inside the nodes (a namespace outlives ``ip netns del``
        while a process holds it)."""
        for node in [self.head, *self.nodes]:
            if node is None:
                continue
            done = subprocess.run(
                ["ip", "netns", "pids", node.name], capture_output=True, text=True
            )
            for pid in done.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@contextmanager
def running_server(
    sim: SimNodes, ranks_per_node: Sequence[int], *args: str, survive: bool = False
) -> Iterator[Cluster]:
    """The server with ``ranks_per_node`` ranks on the nodes, rank 0 binding its node's
    address; stopped and its processes killed on exit.  ``args`` must include
    ``--curve-keys DIR`` or ``--insecure``, the address not being loopback."""
    first = sim.nodes[next(i for i, k in enumerate(ranks_per_node) if k > 0)]
    bind = ["--bind", f"tcp://{first.address}:*"]
    cmd = sim.mpi_command(ranks_per_node, "mpi_imgproc.server", *bind, *args, survive=survive)
    with serving(cmd) as cluster:
        yield cluster


def unavailable_reason() -> str | None:
    """Why simulated nodes cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "simulated nodes need root (network namespaces, veth, tc)"
    for tool in ("ip", "tc", "unshare", "taskset"):
        if shutil.which(tool) is None:
            return f"simulated nodes need {tool!r} on PATH"
    probe = f"snprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@contextmanager
def simulated_nodes(
    count: int,
    link: Link | None = None,
    cpus: Sequence[str | None] | None = None,
    prefix: str | None = None,
) -> Iterator[SimNodes]:
    """``count`` nodes (plus the head) on a private bridge; all removed on exit.

    ``link``: every node's link shape (see :meth:`SimNodes.shape`); ``cpus``: a CPU list for
    ``taskset`` per node (``["0", "1"]``), None for all CPUs; ``prefix``: the names' start
    (random by default, so runs never collide; at most 10 characters)."""
    reason = unavailable_reason()
    if reason:
        raise SimNodesError(reason)
    prefix = prefix or f"sn{secrets.token_hex(2)}"
    if len(prefix) > 10:
        raise SimNodesError(f"prefix must be at most 10 characters, got {prefix!r}")
    cpus = list(cpus or [])
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{prefix}-")))
        sim = SimNodes(prefix, free_subnet(count + 2), workdir)
        stack.callback(remove, sim)
        _ip("link", "add", sim.bridge, "type", "bridge")
        _ip("addr", "add", f"{sim.bridge_address}/{sim.subnet.prefixlen}", "dev", sim.bridge)
        _ip("link", "set", sim.bridge, "up")
        sim.head = sim.add_node(0, None)
        for i in range(1, count + 1):
            sim.nodes.append(sim.add_node(i, cpus[i - 1] if i <= len(cpus) else None))
        sim.write_hosts()
        if link is not None:
            sim.shape(link)
        yield sim


def remove(sim: SimNodes) -> None:
    """Undo :func:`simulated_nodes`: processes, namespaces, devices, hosts files."""
    sim.kill_processes()
    for node in [sim.head, *sim.nodes]:
        if node is None:
            continue
        subprocess.run(["ip", "netns", "del", node.name], capture_output=True)
        subprocess.run(["ip", "link", "del", node.device], capture_output=True)
        shutil.rmtree(NETNS_ETC / node.name, ignore_errors=True)
    subprocess.run(["ip", "link", "del", sim.bridge], capture_output=True)


def free_subnet(addresses: int) -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no address or route of this machine overlaps."""
    taken = _used_networks()
    start = secrets.randbelow(256)
    for i in range(256):
        net = ipaddress.ip_network(f"10.213.{(start + i) % 256}.0/24")
        if not any(net.overlaps(t) for t in taken) and addresses < net.num_addresses - 2:
            return net
    raise SimNodesError("no free /24 left in 10.213.0.0/16 for simulated nodes")


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    nets = [ipaddress.ip_interface(w[3]).network for w in map(str.split, out.splitlines())]
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for word in (line.split()[0] for line in routes.splitlines() if line.strip()):
        if word != "default":
            nets.append(ipaddress.ip_network(word, strict=False))
    return nets


def _pin(node: Node) -> str:
    return f"taskset -c {node.cpus}" if node.cpus else ""


def _set_qdisc(where: list[str], device: str, link: Link) -> None:
    """Replace ``device``'s root queueing discipline with ``link``'s shape (or none)."""
    subprocess.run(["tc", *where, "qdisc", "del", "dev", device, "root"], capture_output=True)
    if link.delay:  # netem does both rate and delay
        shape = ["netem", "delay", link.delay, *(["rate", link.rate] if link.rate else [])]
    elif link.rate:
        # A bucket of 2 ms at the rate (at least 128 KiB: one GSO packet must fit, or
        # nothing passes); up to 10 ms of queue before drops.
        burst = max(128 * 1024, int(link.bits_per_second / 8 / 500))
        shape = ["tbf", "rate", link.rate, "burst", str(burst), "latency", "10ms"]
    else:
        return
    done = subprocess.run(
        ["tc", *where, "qdisc", "add", "dev", device, "root", *shape],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        kind = shape[0]
        raise SimNodesError(
            f"tc cannot add {kind} on {device}: {done.stderr.strip()} "
            f"(the kernel may lack sch_{kind})"
        )


def _counters(device: str) -> LinkCounters:
    """The bridge-side device counts the node's sending as received, and vice versa."""
    stats = Path("/sys/class/net") / device / "statistics"
    rx = int((stats / "rx_bytes").read_text())
    tx = int((stats / "tx_bytes").read_text())
    return LinkCounters(sent=rx, received=tx)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise SimNodesError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def run_to_end(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` (e.g. a batch job from :meth:`SimNodes.mpi_command`) in a process group of
    its own and wait; past ``timeout`` the group is killed and TimeoutExpired raised."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out)
