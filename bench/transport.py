"""Our model-message path against raw pyzmq multipart over tcp on 127.0.0.1.

Two processes: a receiver (spawned) and this one, the sender. For each model size and
variant the sender pushes `n` messages as fast as the socket takes them and stops the
clock when the receiver reports (over a pipe) that it has received — and, for ours,
decoded and checked — all `n`. Throughput = n * model bytes / that time.

Variants:
- ours: `wire.encode` + `Transport.send` (PUSH, HWM 4, NOBLOCK: a full queue is waited
  on with poll(POLLOUT) and the send retried, so nothing is dropped) -> `Transport.recv`
  + `wire.decode` (header checks, sizes, and every value checked finite frame by frame,
  one fused pass each with an exact fallback; the frames are handed over as read-only
  views, not joined into one array).
- raw 8 MiB frames: a PUSH/PULL pair, `send_multipart(copy=False)` of a msgpack-free
  8-byte header and the same array in 8 MiB views; `recv_multipart(copy=False)`.
- raw 1 frame: the same with the whole array as one frame (over 32 MiB for 50 MB).
- ours-curve: ours with CurveZMQ: both Transports get a `Keyring` (receiver node 0 knows
  sender node 1, keys from `keys.create` in a temporary folder), so the receiver's inbox
  is a CURVE server whose ZAP authenticator admits only node 1's key, and every message
  must arrive with `authenticated == 1`.
- raw-curve 8 MiB frames: raw 8 MiB frames with CURVE on both raw sockets (the PULL a
  CURVE server with node 0's pair, the PUSH with node 0's server key and node 1's pair)
  and pyzmq's `ThreadAuthenticator` admitting the keys in `public/`, so raw pays the
  same encryption and the same ZAP handshake. CURVE encrypts frame by frame
  (libsodium's crypto_box, a copy each way), so CURVE / plain is expected near 1/2.

Trials of the variants are interleaved (ours, raw8, raw1, ours-curve, raw-curve, ours,
...) so a burst of
load from other processes hits them alike. Throughputs are the best trial (noise only
ever slows a trial down); ratios are the median over trial rounds of the ratio within
a round. The receiver also reports its process CPU per message (all threads, ZeroMQ's
I/O thread included): less sensitive to other processes than throughput, though it also
moves with how the sender paces the stream.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, add_quiet_arg, fmt, preamble, print_table

import p2pfl.net.sockets
from p2pfl.net import keys
from p2pfl.net.transport import Transport
from p2pfl.protocol import wire

MB = 1_000_000
SIZES_MB = (1, 10, 50)
CHUNK = 8 * 1024 * 1024
PLAIN = ("ours", "raw-8MiB", "raw-1frame")
CURVE = ("ours-curve", "raw-curve-8MiB")  # --no-curve leaves these out
VARIANTS = PLAIN + CURVE
# CurveZMQ keys of the two ends (keys.create in a temporary folder; `peers` = 2, so
# node 2 is the unused coordinator): the receiver is node 0, the sender node 1
RECEIVER, SENDER, KEY_PEERS = 0, 1, 2
# --diagnose adds: ours without wire.decode on the receiver (what decoding costs); ours
# with the sender's high-water mark raised from transport.SEND_HWM to pyzmq's default
# (1000); and raw 8 MiB frames whose receiver also checks every value finite (with
# the check wire.decode uses, frame by frame): the floor for any path that must check
DIAGNOSTIC = ("ours-nodecode", "ours-hwm1000", "raw-checked")
SCENARIO = "bench-transport"
TARGET = 0.9  # ours / best raw at every size; ours-curve / raw-curve likewise


def _n_messages(nbytes: int, budget_bytes: float) -> int:
    return max(4, min(400, int(budget_bytes // nbytes)))


def _expect(nbytes: int) -> wire.Expect:
    return wire.Expect(SCENARIO, 1, {"params": (nbytes // 4,)})


# -- receiver process ------------------------------------------------------------------


def _cpu_s() -> float:
    """This process's CPU seconds so far, every thread (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _receiver(conn: Connection, keydir: str) -> None:
    """Serve trials: (variant, nbytes, n) -> bind, report the address, receive n, report.

    The report after "done": (decode s/message, process CPU s/message), both over the
    messages after the first (which also pays the connect, and with CURVE the handshake).
    `keydir` holds the CURVE keys (`keys.create`) the curve variants use.
    """
    folder = Path(keydir)
    while True:
        job = conn.recv()
        if job is None:
            return
        variant, nbytes, n = job
        curve = "curve" in variant
        if variant.startswith("ours"):
            expect = _expect(nbytes)
            ring = keys.keyring(folder, RECEIVER, KEY_PEERS, [SENDER]) if curve else None
            t = Transport("tcp://127.0.0.1:*", {}, expect.max_frames, keys=ring)
            conn.send(t.inbox.getsockopt(zmq.LAST_ENDPOINT).decode())
            decode_s = 0.0
            cpu_s = 0.0
            for i in range(n):
                envelope = t.recv(60.0)
                if envelope is None:
                    raise RuntimeError("ours: no message within 60 s")
                if curve and envelope.authenticated != SENDER:
                    raise RuntimeError(f"ours-curve: authenticated {envelope.authenticated}")
                frames = envelope.frames
                if variant == "ours-nodecode":
                    if sum(len(f) for f in frames[1:]) != nbytes:
                        raise RuntimeError("ours-nodecode: wrong size")
                else:
                    t_dec = time.perf_counter()
                    round_ = wire.decode(frames, expect).round
                    if i:
                        decode_s += time.perf_counter() - t_dec
                    if round_ != i:
                        raise RuntimeError(f"ours: got round {round_}, expected {i}")
                del frames
                if i == 0:
                    conn.send("first")
                    cpu_s = _cpu_s()
            cpu_s = _cpu_s() - cpu_s
            conn.send("done")
            conn.send((decode_s / max(1, n - 1), cpu_s / max(1, n - 1)))
            t.close()
        else:
            ctx = zmq.Context()
            auth = None
            sock = ctx.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            if curve:
                # the ZAP handler first (without one libzmq admits any key), then the
                # CURVE server with node 0's pair; admitted: the keys in public/
                auth = ThreadAuthenticator(ctx)
                auth.start()
                auth.configure_curve(domain="*", location=str(folder / "public"))
                public, secret = zmq.auth.load_certificate(
                    keys.secret_path(folder, RECEIVER, KEY_PEERS)
                )
                sock.curve_server = True
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            conn.send(f"tcp://127.0.0.1:{port}")
            cpu_s = 0.0
            for i in range(n):
                frames = sock.recv_multipart(copy=False)
                if sum(len(f) for f in frames[1:]) != nbytes:
                    raise RuntimeError("raw: wrong size")
                if variant == "raw-checked" and not all(
                    wire._all_finite(np.frombuffer(f.buffer, np.float32)) for f in frames[1:]
                ):
                    raise RuntimeError("raw-checked: non-finite value")
                del frames
                if i == 0:
                    conn.send("first")
                    cpu_s = _cpu_s()
            cpu_s = _cpu_s() - cpu_s
            conn.send("done")
            conn.send((0.0, cpu_s / max(1, n - 1)))
            sock.close()
            if auth is not None:
                auth.stop()
            ctx.term()


# -- sender side -----------------------------------------------------------------------


def _send_ours(
    addr: str,
    array: np.ndarray,
    n: int,
    conn: Connection,
    send_hwm: int | None = None,
    keydir: Path | None = None,
) -> float:
    """Ours as node 1 (in clear: a neighbour id of 1; with `keydir`: CURVE, node 1's
    keyring, sending to node 0)."""
    expect = _expect(array.nbytes)
    ring = None if keydir is None else keys.keyring(keydir, SENDER, KEY_PEERS, [RECEIVER])
    to = 1 if ring is None else RECEIVER
    me = 0 if ring is None else SENDER
    saved = p2pfl.net.sockets.SEND_HWM
    if send_hwm is not None:
        p2pfl.net.sockets.SEND_HWM = send_hwm  # read when the PUSH sockets are made
    try:
        t = Transport("tcp://127.0.0.1:*", {to: addr}, expect.max_frames, keys=ring)
    finally:
        p2pfl.net.sockets.SEND_HWM = saved
    try:
        out = t.outboxes[to]
        # warm: the first message also pays the TCP connect (and the CURVE handshake)
        frames = wire.encode("model", me, 0, SCENARIO, {"degree": 2}, {"params": array})
        while not t.send(to, frames):
            out.poll(1000, zmq.POLLOUT)
        _expect_msg(conn, "first")
        start = time.perf_counter()
        for i in range(1, n):
            frames = wire.encode("model", me, i, SCENARIO, {"degree": 2}, {"params": array})
            while not t.send(to, frames):
                out.poll(1000, zmq.POLLOUT)
        _expect_msg(conn, "done")
        return time.perf_counter() - start
    finally:
        t.close()


def _send_raw(
    addr: str,
    array: np.ndarray,
    n: int,
    conn: Connection,
    chunk: int | None,
    keydir: Path | None = None,
) -> float:
    """Raw PUSH; with `keydir` a CURVE client (node 1's pair, node 0's server key)."""
    flat = memoryview(array).cast("B")
    step = chunk or flat.nbytes
    parts = [flat[i : i + step] for i in range(0, flat.nbytes, step)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    if keydir is not None:
        public, secret = zmq.auth.load_certificate(keys.secret_path(keydir, SENDER, KEY_PEERS))
        server, _ = zmq.auth.load_certificate(keys.public_path(keydir, RECEIVER, KEY_PEERS))
        sock.curve_serverkey = server
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    sock.connect(addr)
    try:
        sock.send_multipart([(0).to_bytes(8, "little"), *parts], copy=False)
        _expect_msg(conn, "first")
        start = time.perf_counter()
        for i in range(1, n):
            sock.send_multipart([i.to_bytes(8, "little"), *parts], copy=False)
        _expect_msg(conn, "done")
        return time.perf_counter() - start
    finally:
        sock.close()
        ctx.term()


def _expect_msg(conn: Connection, what: str, timeout_s: float = 120.0) -> None:
    if not conn.poll(timeout_s):
        raise RuntimeError(f"receiver did not report {what!r} within {timeout_s:.0f} s")
    got = conn.recv()
    if got != what:
        raise RuntimeError(f"receiver said {got!r}, expected {what!r}")


Trial = tuple[float, float, float]  # (bytes/s, receiver decode s/msg, receiver CPU s/msg)


def _trial(conn: Connection, variant: str, array: np.ndarray, n: int, keydir: Path) -> Trial:
    """(bytes/s of the n-1 messages after a first (connect) one, receiver decode s/message,
    receiver process CPU s/message)."""
    conn.send((variant, array.nbytes, n))
    addr = conn.recv()
    curve = keydir if "curve" in variant else None
    if variant.startswith("ours"):
        hwm = 1000 if variant == "ours-hwm1000" else None
        elapsed = _send_ours(addr, array, n, conn, hwm, curve)
    else:
        chunk = None if variant == "raw-1frame" else CHUNK
        elapsed = _send_raw(addr, array, n, conn, chunk, curve)
    decode_s, cpu_s = conn.recv()
    return (n - 1) * array.nbytes / elapsed, decode_s, cpu_s


def measure(
    trials: int = 7, trial_mb: float = 150.0, variants: tuple[str, ...] = VARIANTS
) -> dict[int, dict[str, list[Trial]]]:
    """size in MB -> variant -> (throughput bytes/s, decode s/msg, CPU s/msg) of each trial."""
    tmp = tempfile.TemporaryDirectory(prefix="p2pfl-bench-keys-")
    keydir = Path(tmp.name)
    keys.create(keydir, KEY_PEERS)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, str(keydir)), daemon=True)
    proc.start()
    results: dict[int, dict[str, list[Trial]]] = {}
    try:
        rng = np.random.default_rng(0)
        for size in SIZES_MB:
            array = rng.standard_normal(size * MB // 4).astype(np.float32)
            n = _n_messages(array.nbytes, trial_mb * MB)
            results[size] = {v: [] for v in variants}
            for _ in range(trials):
                for v in variants:
                    results[size][v].append(_trial(parent, v, array, n, keydir))
    finally:
        parent.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        tmp.cleanup()
    return results


def decode_cost(reps: int = 10) -> dict[int, dict[str, float]]:
    """In-process seconds per message: `wire.decode`, its finiteness check, and a join.

    `isfinite` (`np.isfinite(x).all()` per frame, the check decode made before its
    fused pass) and the join (a fresh array and a copy of every frame into it, what
    decode did before it handed frames over as views) are timed for comparison only.
    The frames are warm in cache here, unlike on the receive path.
    """
    out = {}
    rng = np.random.default_rng(1)
    for size in SIZES_MB:
        array = rng.standard_normal(size * MB // 4).astype(np.float32)
        frames = [bytes(f) for f in wire.encode("model", 0, 1, SCENARIO, {}, {"params": array})]
        expect = _expect(array.nbytes)

        def best(fn) -> float:
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        chunks = [np.frombuffer(f, np.float32) for f in frames[1:]]
        out[size] = {
            "decode": best(lambda f=frames, e=expect: wire.decode(f, e)),
            "check": best(lambda c=chunks: all(wire._all_finite(x) for x in c)),
            "isfinite": best(lambda c=chunks: all(np.isfinite(x).all() for x in c)),
            "join": best(lambda c=chunks: np.concatenate(c)),
            "frames": len(frames) - 1,
        }
    return out


def sodium_speed(reps: int = 10) -> dict[str, float] | None:
    """In-process bytes/s of libsodium's crypto_box_afternm / _open_afternm on one 8 MiB
    frame (what CURVE does to each frame, each way), from the libsodium bundled with
    pyzmq (None if it is not found: pyzmq linked against a system libsodium)."""
    libs = Path(zmq.__file__).resolve().parent.parent / "pyzmq.libs"
    found = sorted(libs.glob("libsodium*"))
    if not found:
        return None
    lib = ctypes.CDLL(str(found[0]))
    lib.sodium_init()
    ptr = ctypes.c_void_p
    n = CHUNK + 32  # crypto_box's 32 leading zero bytes
    plain = np.zeros(n, np.uint8)
    plain[32:] = np.random.default_rng(2).integers(0, 256, CHUNK, dtype=np.uint8)
    boxed = np.zeros(n, np.uint8)
    key, nonce = (ctypes.c_ubyte * 32)(), (ctypes.c_ubyte * 24)()
    out = {}
    for name, src, dst in (
        ("crypto_box_afternm", plain, boxed),
        ("crypto_box_open_afternm", boxed, plain.copy()),
    ):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, ptr, ctypes.c_ulonglong, ptr, ptr]
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            rc = fn(
                dst.ctypes.data, src.ctypes.data, n, ctypes.addressof(nonce), ctypes.addressof(key)
            )
            best = min(best, time.perf_counter() - t)
            if rc != 0:
                raise RuntimeError(f"{name} returned {rc}")
        out[name] = CHUNK / best
    return out


def rows(
    results: dict[int, dict[str, list[Trial]]],
    decode: dict[int, dict[str, float]] | None = None,
    sodium: dict[str, float] | None = None,
) -> list[Row]:
    """Table rows: throughputs (best trial; median in the note) and the ratios asked for.

    A ratio is the median over trial rounds of (variant / the better raw variant of the
    same round): variants of one round run back to back, so load that comes and goes
    hits both sides of a ratio alike.
    """
    out = []
    for size, by in results.items():
        tput = {v: [x[0] for x in trials] for v, trials in by.items()}
        best = {v: max(x) for v, x in tput.items()}
        med = {v: statistics.median(x) for v, x in tput.items()}
        for v in by:
            out.append(
                Row(
                    f"{size} MB {v} throughput",
                    best[v] / 1e6,
                    "MB/s",
                    note=f"median {fmt(med[v] / 1e6)}, worst {fmt(min(tput[v]) / 1e6)}",
                )
            )
        raw = max(("raw-8MiB", "raw-1frame"), key=med.__getitem__)

        def paired(v: str, tput: dict[str, list[float]] = tput) -> float:
            """Median over trials of v / the better raw variant of the same trial round."""
            rounds = zip(tput[v], tput["raw-8MiB"], tput["raw-1frame"], strict=True)
            return statistics.median(a / max(b, c) for a, b, c in rounds)

        out.append(
            Row(
                f"{size} MB ours / best raw",
                paired("ours"),
                "x",
                TARGET,
                better="higher",
                note="median of per-trial ratios; best-of-trials "
                f"{best['ours'] / best[raw]:.2f}, medians "
                f"{med['ours'] / med[raw]:.2f} (vs {raw})",
            )
        )
        out.append(
            Row(
                f"{size} MB raw 1 frame / raw 8 MiB frames",
                statistics.median(
                    a / b for a, b in zip(tput["raw-1frame"], tput["raw-8MiB"], strict=True)
                ),
                "x",
                note="median of per-trial ratios",
            )
        )
        live = statistics.median(x[1] for x in by["ours"])
        per_msg = size * MB / med["ours"]
        out.append(
            Row(
                f"{size} MB ours: receiver time decoding",
                live * 1e3,
                "ms/msg",
                note=f"{live / per_msg * 100:.0f}% of its {per_msg * 1e3:.2f} "
                "ms/message (median trial)",
            )
        )
        cpu = {v: statistics.median(x[2] for x in trials) for v, trials in by.items()}
        raw_cpu = min(cpu["raw-8MiB"], cpu["raw-1frame"])
        out.append(
            Row(
                f"{size} MB receiver CPU, ours - raw",
                (cpu["ours"] - raw_cpu) * 1e3,
                "ms/msg",
                note="receiver process, all threads, ms/message (median trial): "
                + ", ".join(f"{v} {c * 1e3:.3g}" for v, c in cpu.items()),
            )
        )
        if "ours-curve" in by:
            out.extend(_curve_rows(size, by, tput, best, med))
        if "raw-checked" in by:
            out.append(
                Row(
                    f"{size} MB ours / raw-checked",
                    statistics.median(
                        a / b for a, b in zip(tput["ours"], tput["raw-checked"], strict=True)
                    ),
                    "x",
                    note="raw whose receiver also checks every value finite (median of "
                    f"per-trial ratios); raw-checked / best raw {paired('raw-checked'):.2f}",
                )
            )
        if "ours-nodecode" in by:
            out.append(
                Row(
                    f"{size} MB ours-nodecode / best raw",
                    paired("ours-nodecode"),
                    "x",
                    note="the same path with wire.decode left out on the receiver",
                )
            )
        if decode and size in decode:
            d = decode[size]
            out.append(
                Row(
                    f"{size} MB wire.decode alone (in-process)",
                    d["decode"] * 1e3,
                    "ms",
                    note=f"{d['frames']:.0f} frame(s); of which the finiteness check "
                    f"{d['check'] * 1e3:.2f} ms (np.isfinite().all() instead: "
                    f"{d['isfinite'] * 1e3:.2f} ms); joining the frames (not done) "
                    f"would add {d['join'] * 1e3:.2f} ms",
                )
            )
    if sodium:
        for name, speed in sodium.items():
            out.append(
                Row(
                    f"libsodium {name}, 8 MiB (in-process)",
                    speed / 1e6,
                    "MB/s",
                    note="one core, warm cache: the crypto CURVE adds to each frame, one way",
                )
            )
    return out


def _curve_rows(
    size: int,
    by: dict[str, list[Trial]],
    tput: dict[str, list[float]],
    best: dict[str, float],
    med: dict[str, float],
) -> list[Row]:
    """ours-curve / raw-curve (target as in clear), CURVE / plain both ways, CPU."""

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(tput[a], tput[b], strict=True))

    raw = "raw-curve-8MiB"
    cpu = {v: statistics.median(x[2] for x in by[v]) for v in ("ours-curve", raw)}
    return [
        Row(
            f"{size} MB ours-curve / raw-curve",
            ratio("ours-curve", raw),
            "x",
            TARGET,
            better="higher",
            note="median of per-trial ratios; best-of-trials "
            f"{best['ours-curve'] / best[raw]:.2f}, medians {med['ours-curve'] / med[raw]:.2f}",
        ),
        Row(
            f"{size} MB CURVE / plain, ours",
            ratio("ours-curve", "ours"),
            "x",
            note="ours-curve / ours, median of per-trial ratios (libsodium: expect ~0.5)",
        ),
        Row(
            f"{size} MB CURVE / plain, raw",
            ratio(raw, "raw-8MiB"),
            "x",
            note="raw-curve-8MiB / raw-8MiB, median of per-trial ratios",
        ),
        Row(
            f"{size} MB receiver CPU, ours-curve - raw-curve",
            (cpu["ours-curve"] - cpu[raw]) * 1e3,
            "ms/msg",
            note=f"ours-curve {cpu['ours-curve'] * 1e3:.3g}, raw-curve {cpu[raw] * 1e3:.3g} "
            "ms/message (median trial)",
        ),
    ]


def run(trials: int = 7, diagnose: bool = False, curve: bool = True) -> list[Row]:
    """Measure and return the rows (for run_all); `curve` adds the CurveZMQ variants."""
    base = VARIANTS if curve else PLAIN
    variants = base + DIAGNOSTIC if diagnose else base
    results = measure(trials, variants=variants)
    return rows(
        results,
        decode_cost() if diagnose else None,
        sodium_speed() if diagnose and curve else None,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=7)
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also run ours without decode, ours with SNDHWM 1000 and raw-checked; time "
        "decode and (with CURVE) libsodium alone",
    )
    p.add_argument(
        "--no-curve", action="store_true", help="leave out the CurveZMQ variants (in clear only)"
    )
    add_quiet_arg(p)
    args = p.parse_args()
    notes = [
        *preamble(args.wait_quiet),
        "MB = 10^6 bytes; float32 model as one flat vector; "
        "throughput = best trial, ratios = median of per-trial-round ratios; "
        "ratio column = value / target",
    ]
    print_table(
        "transport: model-message path vs raw pyzmq (tcp, 127.0.0.1, 2 processes)",
        run(args.trials, args.diagnose, not args.no_curve),
        notes,
    )


if __name__ == "__main__":
    main()
