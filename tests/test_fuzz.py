"""Fuzzing a live peer and a live coordinator: 10,000 generated and mutated messages each."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from itertools import chain, zip_longest

import msgpack
import numpy as np
import psutil
import pytest
import zmq
from conftest import read_jsonl, wait_for, wait_for_round
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from p2pfl.config.learning import learning_spec
from p2pfl.config.loader import load
from p2pfl.learning.local import build
from p2pfl.protocol import wire

pytestmark = pytest.mark.slow  # a live peer and coordinator

MESSAGES = 10_000  # per live target
GENERATED = 0.05  # the share drawn whole by hypothesis; the rest mutate valid messages
ROUNDS = 800  # a round takes 10-20 ms here: the run must outlast the flood (asserted)
# Growth measured: about 10 MiB. A receiver queues at most 16 messages per connection and
# keeps nothing it drops; keeping the flood's ~12 frames of 8 MiB alone would exceed this.
RSS_BOUND = 64 * 2**20
LEAF = [st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats()]
VALUES = st.recursive(
    st.one_of(*LEAF, st.text(max_size=24), st.binary(max_size=24)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FUZZ = settings(database=None, derandomize=True, deadline=None, phases=[Phase.generate])
SPECIAL = [None, True, False, 0, -1, 1, 2, 3, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, 2.0]
SPECIAL += [math.nan, math.inf, -math.inf, "", "x" * 1024, b"\0" * 1024, [], {}, [1, [2, [3]]]]
SPECIAL += ["float64", "float16", "<f4", "object", "params", "model", "update", [651], [2**40]]
META = {"model": {"degree": 2, "samples": 10}, "update": {"samples": 10, "loss": 0.5}}
META |= {"hello": {"address": "tcp://127.0.0.1:1"}, "welcome": {"neighbours": [[1, "tcp://1:1"]]}}


def bases(digest, n_params):
    """(header, payload frames) of a valid message of every type from peer 1, round 1 or
    beyond the run; the types a run sends with a model carry one."""
    params = {"params": np.random.default_rng(0).normal(size=n_params).astype(np.float32)}
    out = []
    for t in sorted(wire.MESSAGE_TYPES):
        for round_ in (1, ROUNDS + 50):
            arrays = params if t in {"model", "update", "start_round", "end_session"} else None
            frames = wire.encode(t, 1, round_, digest, META.get(t, {}), arrays)
            out.append((msgpack.unpackb(frames[0]), [bytes(f) for f in frames[1:]]))
    return out


def generated(header, n_params, n):
    """`n` messages drawn by hypothesis (each header field valid or any msgpack value, up
    to three payload frames) and a pool of msgpack values for the mutator."""
    fields = {k: st.just(v) | VALUES for k, v in header.items()}
    headers = st.fixed_dictionaries(fields, optional={"extra": VALUES})
    payload = st.binary(max_size=64) | st.sampled_from([b"", bytes(4 * n_params)])
    out, values = [], list(SPECIAL)

    @settings(FUZZ, max_examples=n, suppress_health_check=list(HealthCheck))
    @given(headers, st.lists(payload, max_size=3), VALUES)
    def draw(h, frames, value):
        out.append([msgpack.packb(h), *frames])
        values.append(value)

    draw()
    return out, values


def pack_raw(header, key, raw):
    """A header with `key`'s value replaced by raw msgpack bytes (deeper than packb nests)."""
    items = (msgpack.packb(k) + (raw if k == key else msgpack.packb(v)) for k, v in header.items())
    return bytes([0x80 | len(header)]) + b"".join(items)


def mutate(rng, header, payload, values):
    """One mutant of a valid message: its header's bytes, a field, the array descriptor,
    meta, the payload, the frames, or a field nested around msgpack's depth limit (1024)."""
    h, frames = json.loads(json.dumps(header)), list(payload)  # headers are JSON-safe
    op, key = rng.randrange(9), rng.choice([*header, "extra"])
    raw = msgpack.packb(h)
    if op == 0:  # flip bits
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return [bytes(raw), *frames]
    if op == 1:  # truncate the header
        return [raw[: rng.randrange(len(raw))], *frames]
    if op == 2:  # nest lists or maps
        depth = rng.randint(1, 1100) if rng.random() < 0.5 else rng.randint(900, 1100)
        nested = (b"\x91" if rng.random() < 0.5 else b"\x81\xa1k") * depth + b"\xc0"
        return [pack_raw(h, key if key in h else "type", nested), *frames]
    if op == 3:  # replace a field, or drop it
        h[key] = rng.choice(values)
        if rng.random() < 0.1:
            del h[key]
    elif op == 4 and h["arrays"]:  # replace a descriptor field, or repeat the descriptor
        d = h["arrays"][0]
        d[rng.choice([*d, "extra"])] = rng.choice(values)
        h["arrays"] = rng.choice([[d], [d], [d, dict(d)], [d] * 9])
    elif op == 5:  # replace a meta field
        fields = ["degree", "samples", "loss", "address", "round", "neighbours"]
        h["meta"][rng.choice(fields)] = rng.choice(values)
    elif op == 6 and frames:  # NaN/Inf, a short, long or float64 payload, or one split in two
        data, cut = frames[0], rng.randrange(1, len(frames[0]))
        at = 4 * rng.randrange(len(data) // 4)
        bad = np.float32(rng.choice([np.nan, np.inf, -np.inf])).tobytes()
        wide = np.frombuffer(data, np.float32).astype(np.float64).tobytes()
        options = [data[:at] + bad + data[at + 4 :]], [data[:cut]], [data[:cut], data[cut:]]
        frames[:1] = rng.choice([*options, [wide], [data + bytes(rng.randrange(1, 9))]])
    elif op == 7:  # remove, repeat or add frames
        extra = [bytes(rng.randrange(64)) for _ in range(rng.choice([1, 2, 60]))]
        frames = rng.choice([frames[:-1], frames * rng.randint(2, 5), frames + extra])
    elif rng.random() < 0.005:  # rarely, a frame over 8 MiB (a receiver's hard cap is 16)
        frames = [bytes(wire.MAX_FRAME_BYTES + 4096)]
    else:  # a valid message of another type
        h["type"] = rng.choice(sorted(wire.MESSAGE_TYPES))
    return [msgpack.packb(h), *frames]


def corpus(s, n_params, usable, count):
    """`count` messages; those `usable` (accepted or ignored without a drop) are left out."""
    expect = wire.Expect(s.digest(), s.peers - 1, {"params": (n_params,)})
    base = bases(s.digest(), n_params)
    pool, values = generated(base[0][0], n_params, int(GENERATED * count))
    rng, messages, skipped = random.Random(0), [], 0
    while len(messages) < count:
        frames = pool.pop() if pool else mutate(rng, *rng.choice(base), values)
        try:
            ok = usable(wire.decode(frames, expect))
        except Exception:  # a WireError, or a bug the live receiver must survive
            ok = False
        skipped += ok
        if not ok:
            messages.append(frames)
    return messages, skipped


class Rss:
    """A process's RSS now, then sampled every 20 ms in a thread until `stop`."""

    def __init__(self, pid):
        self.proc, self.done = psutil.Process(pid), threading.Event()
        self.before = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        """Keep the largest RSS seen until stopped."""
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self):
        """Stop sampling; the RSS growth must be within the bound."""
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        mib = [round(x / 2**20) for x in (self.before, self.peak, self.proc.memory_info().rss)]
        print("RSS MiB before, peak, after:", mib)
        assert self.peak - self.before < RSS_BOUND, mib


def flood(targets, log):
    """Send every message of each (socket kind, address, messages), interleaved; a send
    blocked for 30 s fails the test, showing the receiver's `log`. Flushed before close."""
    ctx, sends = zmq.Context(), []
    for kind, addr, messages in targets:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.SNDTIMEO, 30_000)
        sock.connect(addr)
        sends.append([(sock, addr, frames) for frames in messages])
    try:
        for n, (sock, addr, frames) in enumerate(
            chain(*zip_longest(*sends, fillvalue=(None,) * 3))
        ):
            if sock is not None:
                try:
                    sock.send_multipart(frames)
                except zmq.Again:
                    pytest.fail(f"{addr} stopped after {n} messages:\n{log.read_text()[-3000:]}")
    finally:
        ctx.destroy(linger=30_000)


def dropped(log):
    """How many message_dropped lines a process has logged so far (cheap: no parsing)."""
    return log.read_bytes().count(b'"event": "message_dropped"') if log.exists() else 0


def fuzz_scenario(make_scenario, name, **overrides):
    """A 4-peer ring logistic-regression scenario of ROUNDS rounds, loaded, and its size."""
    training = {"rounds": ROUNDS, "local_epochs": 1}
    scenario = make_scenario(
        {"name": name, "topology": {"kind": "ring", "peers": 4}, "model": {"kind": "logreg"}}
        | {"training": training, **overrides}
    )
    s = load(scenario)
    return scenario, s, build(learning_spec(s), 0).trainer.n_params


def finished(run, log, sent):
    """The run completed, every peer did every round, and each message was one drop."""
    rc, output = run.wait(timeout=240)
    assert rc == 0, output
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["completed_peers"] == [0, 1, 2, 3] and not summary["failed_peers"]
    assert all(read_jsonl(run.out / f"peer-{i}.jsonl")[-1]["round"] == ROUNDS for i in range(4))
    events = [e["event"] for e in read_jsonl(log)]
    assert events.count("message_dropped") == sent and "peer_failed" not in events
    return summary


def test_fuzzed_messages_at_a_live_peer(make_scenario, launch_run):
    """10,000 fuzzed messages at peer 0 mid-run: each dropped, RSS bounded, the run completes."""
    scenario, s, n = fuzz_scenario(make_scenario, "fuzzpeer")

    def usable(m):  # a neighbour's model the peer could take, or ignore as stale, or its
        # heartbeat or bye (taken as a sign of life, or as leaving: unauthenticated)
        if m.sender in (1, 3) and m.type in ("heartbeat", "bye"):
            return True
        degree = m.meta.get("degree")
        model = m.type == "model" and m.sender in (1, 3) and "params" in m.arrays
        return model and m.round <= ROUNDS + 2 and wire.is_int(degree) and 0 < degree < 4

    messages, skipped = corpus(s, n, usable, MESSAGES)
    run = launch_run(scenario)
    wait_for_round(run, 0, 2, timeout=120)
    rss, t = Rss(run.peer_pids()[0]), time.monotonic()
    log = run.out / "logs" / "peer-0.jsonl"
    flood([(zmq.PUSH, s.address(0), messages)], log)
    wait_for(lambda: dropped(log) >= MESSAGES, 60, "every message dropped", [run.proc])
    print(f"{MESSAGES} dropped ({skipped} usable left out) {time.monotonic() - t:.1f} s")
    rss.stop()
    assert read_jsonl(run.out / "peer-0.jsonl")[-1]["round"] < ROUNDS, "the run ended first"
    assert finished(run, log, MESSAGES)["final_holdout_accuracy"]["mean"] >= 0.9


def test_fuzzed_messages_at_a_live_coordinator(make_scenario, launch_run):
    """10,000 fuzzed messages at the server's two channels: each dropped, RSS bounded, run done."""
    scenario, s, n = fuzz_scenario(make_scenario, "fuzzserver", mode="centralized")
    control, updates = s.coordinator_addresses()
    # a hello takes a peer's place (a documented limit); an update of the run's rounds counts
    messages, skipped = corpus(
        s, n, lambda m: m.type == "hello" or (m.type == "update" and m.round <= ROUNDS), MESSAGES
    )
    run = launch_run(scenario)
    rows = run.out / "coordinator.jsonl"
    wait_for(lambda: len(read_jsonl(rows)) > 2, 120, "round 2", [run.proc])
    rss, t = Rss(run.coordinator_pid()), time.monotonic()
    log = run.out / "logs" / "coordinator.jsonl"
    flood([(zmq.DEALER, control, messages[::2]), (zmq.PUSH, updates, messages[1::2])], log)
    wait_for(lambda: dropped(log) >= MESSAGES, 60, "every message dropped", [run.proc])
    print(f"{MESSAGES} dropped ({skipped} usable left out) {time.monotonic() - t:.1f} s")
    rss.stop()
    assert read_jsonl(rows)[-1]["round"] < ROUNDS, "the run ended first"
    finished(run, log, MESSAGES)
    history = read_jsonl(rows)
    assert history[-1]["round"] == ROUNDS and history[-1]["holdout_accuracy"] >= 0.9
