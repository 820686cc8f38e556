"""A shaped network for tests: one Linux network namespace per peer, each joined by a
veth pair to a bridge in a hub namespace, with a tbf qdisc limiting every link.

    peer namespace <prefix>-p<i>            hub namespace <prefix>-hub
    eth0 10.77.0.<i+1>/24  <-- veth -->  p<i> ---- br0 ---- p<j> <-- veth --> eth0 ...
    tbf on eth0 (peer -> bridge)          tbf on p<i> (bridge -> peer)

Nothing is created in the root namespace, so deleting the namespaces removes every
interface with them. Names carry the test process's pid and a counter: parallel runs
cannot collide, and namespaces left behind by a run that was killed (its pid is gone)
are swept away before new ones are made. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)
and iproute2's `ip` and `tc`; `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

SUBNET = "10.77.0"  # peer i is SUBNET.(i + 1)/24
PREFIX = "p2pfl"  # every namespace made here is named p2pfl-<pid>-<n>-...
_counter = itertools.count()


def tool(name: str) -> str | None:
    """Path of an iproute2 command, also where root's PATH would have it."""
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command; with `check`, raise naming the command and its stderr if it fails."""
    proc = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, naming the command or privilege;
    None if they can (the probe creates one and deletes it)."""
    for name in ("ip", "tc"):
        if tool(name) is None:
            return f"the `{name}` command (iproute2) is not installed"
    ip = tool("ip")
    assert ip is not None
    probe = f"{PREFIX}-{os.getpid()}-probe"
    proc = sh(ip, "netns", "add", probe, check=False)
    if proc.returncode != 0:
        return (
            f"`ip netns add` failed (needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN): "
            f"{proc.stderr.strip()}"
        )
    sh(ip, "netns", "del", probe, check=False)
    return None


def namespaces() -> list[str]:
    """Names of the network namespaces that `ip netns` knows."""
    out = sh(tool("ip") or "ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete namespaces made here by test processes that no longer exist."""
    swept = []
    for name in namespaces():
        m = re.fullmatch(rf"{PREFIX}-(\d+)-.*", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            sh(tool("ip") or "ip", "netns", "del", name, check=False)
            swept.append(name)
    return swept


@dataclass
class Lab:
    """`peers` namespaces on one bridge, every link limited to `rate` by tbf."""

    peers: int
    rate: str = "10mbit"
    burst: str = "10kb"  # bytes the bucket lets through at line speed
    latency: str = "200ms"  # longest a packet may queue in tbf before it is dropped
    prefix: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{next(_counter)}")
    made: list[str] = field(default_factory=list)  # namespaces to delete

    def __post_init__(self) -> None:
        ip, tc = tool("ip"), tool("tc")
        if ip is None or tc is None:
            raise RuntimeError("iproute2's ip and tc are needed")
        self.ip, self.tc = ip, tc

    @property
    def hub(self) -> str:
        """The namespace holding the bridge."""
        return f"{self.prefix}-hub"

    def ns(self, i: int) -> str:
        """Peer `i`'s namespace."""
        return f"{self.prefix}-p{i}"

    def host(self, i: int) -> str:
        """Peer `i`'s IPv4 address."""
        return f"{SUBNET}.{i + 1}"

    def exec(self, i: int, *command: str) -> list[str]:
        """argv running `command` inside peer `i`'s namespace (`ip netns exec` execs it,
        so the process started is the command itself)."""
        return [self.ip, "netns", "exec", self.ns(i), *command]

    def _add(self, name: str) -> None:
        sh(self.ip, "netns", "add", name)
        self.made.append(name)

    def _shape(self, netns: str, dev: str) -> None:
        shape = ["rate", self.rate, "burst", self.burst, "latency", self.latency]
        sh(self.tc, "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", *shape)

    def up(self) -> Lab:
        """Create everything; on any error, delete what was made and re-raise."""
        sweep_stale()
        try:
            self._add(self.hub)
            ip = self.ip
            sh(ip, "-n", self.hub, "link", "add", "br0", "type", "bridge")
            sh(ip, "-n", self.hub, "link", "set", "br0", "up")
            for i in range(self.peers):
                ns, side = self.ns(i), f"p{i}"
                self._add(ns)
                pair = ["type", "veth", "peer", "name", side, "netns", self.hub]
                sh(ip, "link", "add", "eth0", "netns", ns, *pair)
                sh(ip, "-n", self.hub, "link", "set", side, "master", "br0", "up")
                sh(ip, "-n", ns, "link", "set", "lo", "up")
                sh(ip, "-n", ns, "addr", "add", f"{self.host(i)}/24", "dev", "eth0")
                sh(ip, "-n", ns, "link", "set", "eth0", "up")
                self._shape(ns, "eth0")  # peer -> bridge
                self._shape(self.hub, side)  # bridge -> peer
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> list[str]:
        """Delete every namespace made (peers first, the hub last); returns any left."""
        for name in reversed(self.made):
            sh(self.ip, "netns", "del", name, check=False)
        left = [n for n in namespaces() if n.startswith(f"{self.prefix}-")]
        self.made = left
        return left

    def qdisc(self, i: int, side: str = "peer") -> dict[str, int]:
        """tbf counters of peer `i`'s link: `peer` (its egress, eth0) or `hub` (toward it):
        bytes, packets, drops, overlimits (packets that had to wait for tokens)."""
        netns, dev = (self.ns(i), "eth0") if side == "peer" else (self.hub, f"p{i}")
        [q] = json.loads(sh(self.tc, "-n", netns, "-j", "-s", "qdisc", "show", "dev", dev).stdout)
        if q["kind"] != "tbf":
            raise RuntimeError(f"{netns}/{dev}: qdisc is {q['kind']}, not tbf")
        return {k: int(q[k]) for k in ("bytes", "packets", "drops", "overlimits")} | {
            "rate_bytes_s": int(q["options"]["rate"])
        }


@contextlib.contextmanager
def lab(peers: int, **shape: str) -> Iterator[Lab]:
    """A `Lab` that is always torn down, pass or fail (processes inside must be gone first:
    a namespace outlives its deletion while a process still runs in it)."""
    made = Lab(peers, **shape).up()
    try:
        yield made
    finally:
        left = made.down()
    if left:  # only reached when the body passed: never hides its own error
        raise RuntimeError(f"network namespaces left behind: {left}")
