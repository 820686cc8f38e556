"""A peer's memory while clients without a valid key flood its port (CURVE), and in clear.

Two processes: the peer (spawned: a `Transport` bound on 127.0.0.1, nothing else in it,
so its RSS is the transport's) and this one, which holds the legitimate neighbour, the
attackers and the RSS sampler (psutil, every 0.5 s, on the peer's pid).

The peer reads like a peer that trains between reads: `--read-s` reading (`recv`, 50 ms
polls), then `--busy-s` not reading, over and over. It counts what reaches `recv`: the
neighbour's messages (first frame `legit`; with CURVE also `authenticated` must be the
neighbour's id) and anything else (an attacker's message that got through).

Phase 1, CURVE: keys from `keys.create` in a temporary folder; the peer is node 0 and
knows node 1, the neighbour (a `Transport` with node 1's keyring) that sends a small
message every 20 ms. The attackers, each a thread with its own ZeroMQ context, send
`wire.MAX_FRAME_BYTES` (8 MiB) frames as fast as their sockets take them:

- bad-key (x`--bad-key`): a CURVE client with the peer's real public key as server key
  but a fresh keypair that is not in the peer's allow-list. The ZAP authenticator
  refuses the handshake (the peer's refusal counter) and libzmq does not retry a
  connection refused by authentication, so the attacker opens a new socket with a new
  keypair every `--socket-s` (20 ms): a handshake flood;
- no-curve (x`--no-curve`): a plain ZeroMQ PUSH (NULL mechanism), a new socket every
  `--socket-s`: the greeting's mechanism does not match and the peer drops it;
- raw-hello (x`--raw-hello`): a TCP socket that writes a ZMTP 3.0 greeting announcing
  CURVE, then a command frame that claims 8 MiB and the 8 MiB, in 1 MiB writes,
  reconnecting whenever the peer drops it (libzmq reads a frame up to MAXMSGSIZE
  before the CURVE handshake can reject it);
- raw-junk (x`--raw-junk`): the same with 8 MiB of junk and no greeting.

"Queued" bytes for the ZeroMQ attackers are the frames their sockets' `send` took (one
8 MiB message per socket, SNDHWM 1: it never leaves the attacker, as no handshake
completes); "offered" bytes for the raw ones are what the kernel took from `send`.

Phase 2, in clear, for contrast: the same peer and neighbour without keys, and
`--plain` attackers that are ordinary PUSH sockets sending 8 MiB frames (a size the
peer accepts: MAXMSGSIZE is 2 x MAX_FRAME_BYTES). There nothing stops them: ZeroMQ
reads each connection into its queue up to RCVHWM messages while the peer is busy, and
every message reaches `recv` (where the runtime would drop it by its header).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, add_quiet_arg, fmt, preamble, print_table

from p2pfl.net import keys
from p2pfl.net.sockets import RECV_HWM
from p2pfl.net.transport import Transport
from p2pfl.protocol.wire import MAX_FRAME_BYTES

PEER, NEIGHBOUR, KEY_PEERS = 0, 1, 2  # node ids; keys.create(.., 2): node 2 is unused
FRAME = MAX_FRAME_BYTES  # the attackers' frame size
MAX_FRAMES = 8  # the peer keeps at most this many frames of a message (+1)
SAMPLE_S = 0.5
LEGIT_EVERY_S = 0.02
LEGIT = b"legit"
MiB = 1024 * 1024


# -- the peer (its own process) -------------------------------------------------------


def _peer(
    conn: Connection, keydir: str | None, log_path: str, read_s: float, busy_s: float
) -> None:
    """Bind, report the address, read/busy until told to stop, report what arrived."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)  # the authenticator's refusal lines go to a file (counted afterwards)
    os.dup2(fd, 2)
    ring = None if keydir is None else keys.keyring(Path(keydir), PEER, KEY_PEERS, [NEIGHBOUR])
    t = Transport("tcp://127.0.0.1:*", {}, MAX_FRAMES, keys=ring)
    conn.send(t.inbox.getsockopt(zmq.LAST_ENDPOINT).decode())
    legit = unvouched = other = other_bytes = 0
    latency: list[float] = []
    stop = False
    while not stop:
        until = time.monotonic() + read_s
        while time.monotonic() < until:
            env = t.recv(0.05)
            if env is None:
                continue
            first = bytes(env.frames[0]) if env.frames else b""
            if first.startswith(LEGIT) and (ring is None or env.authenticated == NEIGHBOUR):
                legit += 1
                latency.append(time.time() - struct.unpack("<d", first[-8:])[0])
            elif first.startswith(LEGIT):
                unvouched += 1
            else:
                other += 1
                other_bytes += env.size
            del env
        if conn.poll(busy_s):  # "training": not reading for busy_s, or until told to stop
            stop = conn.recv() == "stop"
    refused = t._sockets.allow.refused if t._sockets.allow is not None else None
    t.close(0)
    conn.send(
        {
            "legit": legit,
            "legit_unvouched": unvouched,
            "other": other,
            "other_bytes": other_bytes,
            "refused": refused,
            "latency_median_s": statistics.median(latency) if latency else float("nan"),
            "latency_max_s": max(latency) if latency else float("nan"),
        }
    )


# -- this process: neighbour, attackers, sampler ---------------------------------------


class Counter:
    """What one attacker (or the neighbour) did: messages/bytes offered, connections."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.msgs = 0
        self.bytes = 0
        self.conns = 0
        self.dropped = 0


def _neighbour(addr: str, ring: keys.Keyring | None, stop: threading.Event, c: Counter) -> None:
    """A small valid message every LEGIT_EVERY_S (sequence and send time in frame 0)."""
    to = PEER if ring is not None else 0
    t = Transport("tcp://127.0.0.1:*", {to: addr}, MAX_FRAMES, keys=ring)
    payload = bytes(1024)
    try:
        while not stop.wait(LEGIT_EVERY_S):
            head = LEGIT + struct.pack("<Qd", c.msgs + c.dropped, time.time())
            if t.send(to, [head, payload]):
                c.msgs += 1
                c.bytes += len(head) + len(payload)
            else:
                c.dropped += 1
    finally:
        t.close(0)


def _zmq_attacker(
    addr: str,
    server_key: bytes | None,
    stop: threading.Event,
    c: Counter,
    blob: bytes,
    socket_s: float,
) -> None:
    """PUSH 8 MiB frames as fast as the socket takes them; with `server_key` as a CURVE
    client with a fresh (unknown) keypair; a new socket (and keypair) every `socket_s`."""
    ctx = zmq.Context()
    try:
        while not stop.is_set():
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1)  # one 8 MiB message offered per socket
            sock.setsockopt(zmq.RECONNECT_IVL, 1)
            if server_key is not None:
                public, secret = zmq.curve_keypair()
                sock.curve_serverkey = server_key
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            sock.connect(addr)
            c.conns += 1
            until = time.monotonic() + socket_s
            while time.monotonic() < until and not stop.is_set():
                try:
                    sock.send_multipart([b"attack", blob], flags=zmq.NOBLOCK, copy=False)
                    c.msgs += 1
                    c.bytes += len(blob) + 6
                except zmq.Again:
                    sock.poll(max(1, int((until - time.monotonic()) * 1000)), zmq.POLLOUT)
            sock.close(0)
    finally:
        ctx.term()


def _plain_attacker(addr: str, stop: threading.Event, c: Counter, blob: bytes) -> None:
    """In clear: one PUSH that sends 8 MiB frames as fast as the peer takes them."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, RECV_HWM)
    sock.connect(addr)
    c.conns += 1
    try:
        while not stop.is_set():
            try:
                sock.send_multipart([b"attack", blob], flags=zmq.NOBLOCK, copy=False)
                c.msgs += 1
                c.bytes += len(blob) + 6
            except zmq.Again:
                sock.poll(50, zmq.POLLOUT)
    finally:
        sock.close(0)
        ctx.term()


def _greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting: signature, version 3.0, mechanism, as-server 0, filler."""
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + bytes(32)


def _tcp_attacker(
    host: str, port: int, stop: threading.Event, c: Counter, blob: bytes, hello: bool
) -> None:
    """Raw TCP: (`hello`) a CURVE greeting and a command frame claiming 8 MiB, then the
    8 MiB (else junk with no greeting), 1 MiB a write; reconnect when dropped."""
    view = memoryview(blob)
    while not stop.is_set():
        try:
            s = socket.create_connection((host, port), timeout=1.0)
        except OSError:
            time.sleep(0.001)
            continue
        c.conns += 1
        try:
            if hello:
                # greeting, then a long command frame (flags 0x06) of len(blob) bytes
                c.bytes += s.send(_greeting(b"CURVE") + b"\x06" + struct.pack(">Q", len(blob)))
            for i in range(0, len(view), MiB):
                if stop.is_set():
                    break
                c.bytes += s.send(view[i : i + MiB])
            c.msgs += 1
        except OSError:  # reset, broken pipe, timeout: the peer hung up
            pass
        finally:
            s.close()


def _sample(pid: int, stop: threading.Event, out: list[tuple[float, int]]) -> None:
    proc = psutil.Process(pid)
    t0 = time.monotonic()
    while True:
        try:
            out.append((time.monotonic() - t0, proc.memory_info().rss))
        except psutil.Error:
            return
        if stop.wait(SAMPLE_S):
            return


def phase(
    curve: bool,
    seconds: float,
    attackers: dict[str, int],
    read_s: float,
    busy_s: float,
    tmp: Path,
    socket_s: float = 0.02,
) -> dict[str, Any]:
    """One flood: the peer, its neighbour, the attackers; RSS samples and the counts."""
    keydir = tmp / "keys" if curve else None
    if keydir is not None and not keydir.exists():
        keys.create(keydir, KEY_PEERS)
    log_path = tmp / f"peer-{'curve' if curve else 'plain'}.log"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_peer,
        args=(child, None if keydir is None else str(keydir), str(log_path), read_s, busy_s),
        daemon=True,
    )
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the peer did not bind within 60 s")
        addr = parent.recv()
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)
        samples: list[tuple[float, int]] = []
        stop_sampling, stop_flood, stop_legit = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )
        sampler = threading.Thread(target=_sample, args=(proc.pid, stop_sampling, samples))
        sampler.start()
        ring = None if keydir is None else keys.keyring(keydir, NEIGHBOUR, KEY_PEERS, [PEER])
        legit = Counter("neighbour")
        neighbour = threading.Thread(target=_neighbour, args=(addr, ring, stop_legit, legit))
        neighbour.start()
        time.sleep(2.0)  # baseline: the peer with its neighbour only
        t_flood = samples[-1][0] if samples else 0.0
        blob = os.urandom(FRAME)
        server_key = (
            None if keydir is None else keys.read_public(keys.public_path(keydir, PEER, KEY_PEERS))
        )
        counters: list[Counter] = []
        threads = []
        for kind, count in attackers.items():
            for _ in range(count):
                c = Counter(kind)
                target: Callable[..., None]
                args: tuple[Any, ...]
                if kind == "bad-key":
                    target, args = _zmq_attacker, (addr, server_key, stop_flood, c, blob, socket_s)
                elif kind == "no-curve":
                    target, args = _zmq_attacker, (addr, None, stop_flood, c, blob, socket_s)
                elif kind.startswith("raw-"):
                    hello = kind == "raw-hello"
                    target, args = _tcp_attacker, (host, int(port), stop_flood, c, blob, hello)
                else:
                    target, args = _plain_attacker, (addr, stop_flood, c, blob)
                counters.append(c)
                threads.append(threading.Thread(target=target, args=args, daemon=True))
        for th in threads:
            th.start()
        time.sleep(seconds)
        stop_flood.set()
        for th in threads:
            th.join(10)
        t_end = samples[-1][0] if samples else 0.0
        time.sleep(3.0)  # after: the neighbour only again
        stop_legit.set()
        neighbour.join(10)
        time.sleep(max(read_s, busy_s) * 2 + 0.5)  # let the last legit messages be read
        parent.send("stop")
        if not parent.poll(30):
            raise RuntimeError("the peer did not report within 30 s")
        got = parent.recv()
        stop_sampling.set()
        sampler.join()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    log_lines = (
        log_path.read_text(errors="replace").count("message_dropped") if log_path.exists() else 0
    )
    base = [r for t, r in samples if t <= t_flood] or [samples[0][1]]
    during = [r for t, r in samples if t_flood < t <= t_end + SAMPLE_S]
    after = [r for t, r in samples if t > t_end + 2.0]
    return {
        "curve": curve,
        "seconds": seconds,
        "rss_start": statistics.median(base),
        "rss_peak": max(during or base),
        "rss_end": after[-1] if after else samples[-1][1],
        "samples": len(samples),
        "attackers": counters,
        "legit": legit,
        "peer": got,
        "log_lines": log_lines,
    }


def rows(result: dict[str, Any]) -> list[Row]:
    """A phase's table rows."""
    tag = "CURVE" if result["curve"] else "plain"
    peer, legit = result["peer"], result["legit"]
    mb = 1e6
    out = [
        Row(
            f"{tag}: peer RSS before the flood",
            result["rss_start"] / mb,
            "MB",
            note=f"median of the samples in the 2 s before (every {SAMPLE_S} s)",
        ),
        Row(
            f"{tag}: peer RSS peak during the flood",
            result["rss_peak"] / mb,
            "MB",
            note=f"+{(result['rss_peak'] - result['rss_start']) / mb:.1f} MB over before; "
            f"{result['seconds']:.0f} s of flood",
        ),
        Row(
            f"{tag}: peer RSS after the flood",
            result["rss_end"] / mb,
            "MB",
            note="last sample, >2 s after the attackers stopped",
        ),
    ]
    by_kind: dict[str, list[Counter]] = {}
    for c in result["attackers"]:
        by_kind.setdefault(c.kind, []).append(c)
    total = sum(c.bytes for c in result["attackers"])
    for kind, cs in by_kind.items():
        verb = "offered" if kind.startswith("raw-") else "sent" if kind == "plain" else "queued"
        out.append(
            Row(
                f"{tag}: {verb} by {len(cs)} {kind} attacker(s)",
                sum(c.bytes for c in cs) / mb,
                "MB",
                note=f"{sum(c.msgs for c in cs)} messages, {sum(c.conns for c in cs)} "
                f"sockets/connections opened; "
                f"{sum(c.bytes for c in cs) / mb / result['seconds']:.0f} MB/s",
            )
        )
    if peer["refused"] is not None:
        out.append(
            Row(
                f"{tag}: handshakes refused (ZAP allow-list)",
                peer["refused"],
                "",
                note=f"{result['log_lines']} message_dropped log lines",
            )
        )
    out.append(
        Row(
            f"{tag}: attacker messages that reached recv",
            peer["other"],
            "",
            0 if result["curve"] else None,
            note=f"{peer['other_bytes'] / mb:.0f} MB in them; of {total / mb:.0f} MB "
            + ("queued/offered" if result["curve"] else "sent"),
        )
    )
    out.append(
        Row(
            f"{tag}: neighbour messages received",
            peer["legit"],
            "",
            note=f"of {legit.msgs} sent ({legit.dropped} dropped at the sender, queue full); "
            f"latency median {fmt(peer['latency_median_s'] * 1e3)} ms, max "
            f"{fmt(peer['latency_max_s'] * 1e3)} ms (includes the peer's busy spells)"
            + (
                f"; {peer['legit_unvouched']} without the neighbour's id" if result["curve"] else ""
            ),
        )
    )
    return out


def run(
    seconds: float = 25.0,
    plain_seconds: float = 15.0,
    bad_key: int = 2,
    no_curve: int = 1,
    raw_hello: int = 1,
    raw_junk: int = 1,
    plain: int = 4,
    read_s: float = 0.5,
    busy_s: float = 0.5,
    socket_s: float = 0.02,
) -> tuple[list[Row], list[str]]:
    """Both phases (the in-clear one if `plain_seconds` and `plain`); rows and notes."""
    kinds = {"bad-key": bad_key, "no-curve": no_curve, "raw-hello": raw_hello, "raw-junk": raw_junk}
    with tempfile.TemporaryDirectory(prefix="p2pfl-bench-flood-") as tmp:
        curve = phase(
            True,
            seconds,
            {k: n for k, n in kinds.items() if n},
            read_s,
            busy_s,
            Path(tmp),
            socket_s,
        )
        clear = None
        if plain and plain_seconds > 0:
            clear = phase(False, plain_seconds, {"plain": plain}, read_s, busy_s, Path(tmp))
    table = rows(curve) + (rows(clear) if clear else [])
    notes = [
        f"frames of {FRAME / MiB:.0f} MiB; the peer reads {read_s} s, then is busy {busy_s} s, "
        f"repeatedly; RCVHWM {RECV_HWM} messages per connection; RSS = peer process, psutil; "
        f"ZeroMQ attackers open a new socket every {socket_s * 1e3:.0f} ms",
    ]
    return table, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=25.0, help="CURVE flood length (25)")
    p.add_argument("--plain-seconds", type=float, default=15.0, help="in-clear flood (15; 0: skip)")
    p.add_argument("--bad-key", type=int, default=2, help="CURVE attackers with unknown keys (2)")
    p.add_argument("--no-curve", type=int, default=1, help="ZeroMQ attackers without CURVE (1)")
    p.add_argument("--raw-hello", type=int, default=1, help="raw TCP: greeting + 8 MiB command (1)")
    p.add_argument("--raw-junk", type=int, default=1, help="raw TCP: 8 MiB of junk (1)")
    p.add_argument("--socket-s", type=float, default=0.02, help="ZeroMQ attackers' socket life")
    p.add_argument("--plain", type=int, default=4, help="attackers in the in-clear phase (4)")
    p.add_argument("--read-s", type=float, default=0.5, help="peer reads this long ...")
    p.add_argument("--busy-s", type=float, default=0.5, help="... then is busy this long")
    add_quiet_arg(p)
    args = p.parse_args()
    pre = preamble(args.wait_quiet)
    table, notes = run(
        args.seconds,
        args.plain_seconds,
        args.bad_key,
        args.no_curve,
        args.raw_hello,
        args.raw_junk,
        args.plain,
        args.read_s,
        args.busy_s,
        args.socket_s,
    )
    print_table(
        "flood: a peer's RSS under a flood from clients without a valid key", table, [*pre, *notes]
    )


if __name__ == "__main__":
    main()
