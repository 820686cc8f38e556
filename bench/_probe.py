"""Instrumented pieces of one peer, run as a separate process by the benchmarks.

`startup`: walks through what `p2pfl peer` does before its first round (imports,
scenario, logging, JAX + compile cache, data, model/trainer, sockets, the round-0
evaluation, the first training call), printing one JSON line per step with the
epoch time at its end and the process RSS, so the caller can attribute the time
and memory of a peer's start-up. The steps mirror `p2pfl.runtime.roles.peer`,
`GossipPeer.__init__` and `GossipPeer.run`; they call the same public functions.

`compute`: the uncontended compute of a round for each peer of a scenario (local
training + the two evaluations), pinned to one core with one thread like a peer.

Both pin themselves to one core (the launcher pins peers the same way).
"""

from __future__ import annotations

import time

T_START = time.time()  # before any import of ours

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _emit(step: str, **extra: object) -> None:
    print(json.dumps({"step": step, "t": time.time(), "rss": _rss(), **extra}), flush=True)


def startup(scenario_path: str, peer_id: int, out: Path) -> None:
    """One peer's start-up, step by step."""
    _emit("interpreter", t=T_START)
    _emit("stdlib imports")
    from p2pfl.runtime import process as _runtime
    from p2pfl.runtime import roles  # scenario schema: pydantic

    _emit("import p2pfl.runtime.roles (pydantic scenario schema)")
    s = roles.scenario(Path(scenario_path), peer=peer_id)
    _emit("load + validate scenario (networkx graph check)")
    _runtime.limit_threads()
    from p2pfl.runtime import logs

    logs.configure(out / "logs" / f"probe-{peer_id}.jsonl", "info")
    _emit("import + configure structlog")
    _runtime.enable_compile_cache()
    _emit("import jax + enable compile cache")
    from p2pfl.config.learning import flips_labels, learning_spec
    from p2pfl.core.graphs import build_graph
    from p2pfl.learning import local as local_mod
    from p2pfl.protocol import wire
    from p2pfl.runtime import peer as peer_mod  # optax, zmq, msgpack, ...

    _emit("import p2pfl.runtime.peer (optax, zmq, msgpack, ...)")
    graph = build_graph(s.topology, s.seed, s.base_dir)
    neighbours = sorted(graph.neighbors(peer_id))
    _emit("build topology graph")
    # local.build() is timed as a whole and its pieces through wrappers, so the probe
    # follows whatever build() does today.
    marks: list[tuple[str, float, int]] = []

    def timed(label: str, fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            marks.append((label, time.time(), _rss()))
            return result

        return wrapper

    pieces = {
        "peer_data": "load dataset + shard + device arrays",
        "make_model": "make model",
        "make_trainer": "make trainer (jit wrappers)",
    }
    for name, label in pieces.items():
        if hasattr(local_mod, name):
            setattr(local_mod, name, timed(label, getattr(local_mod, name)))
    loc = local_mod.build(learning_spec(s), peer_id, flips_labels(s, peer_id))
    for label, t_end, rss in marks:
        print(json.dumps({"step": label, "t": t_end, "rss": rss}), flush=True)
    _emit("trainer.init + rest of build")
    data, trainer, state = loc.data, loc.trainer, loc.state
    expect = wire.Expect(s.digest(), s.peers - 1, {"params": (trainer.n_params,)})
    transport = peer_mod.Transport(
        s.address(peer_id),
        {j: s.address(j) for j in neighbours},
        expect.max_frames,
    )
    _emit("open sockets")
    local_mod.evaluate(trainer, state.params, data)  # test + holdout in one call, as a peer
    _emit("round-0 evaluation (evaluate: compile or cache load)", phase="ready")
    state, loss = trainer.train(state, data.train)
    float(loss)
    _emit("first train call (round 1: compile or cache load)", phase="round1")
    state, loss = trainer.train(state, data.train)
    float(loss)
    _emit("second train call (steady state)", phase="round2")
    transport.close()


def compute(scenario_path: str, reps: int) -> None:
    """Median uncontended train + evaluate seconds per round, for every peer."""
    import statistics

    from p2pfl.runtime import process as _runtime
    from p2pfl.runtime import roles

    s = roles.scenario(Path(scenario_path))
    _runtime.limit_threads()
    _runtime.enable_compile_cache()
    from p2pfl.config.learning import learning_spec
    from p2pfl.learning.local import build, evaluate
    from p2pfl.learning.trainer import as_numpy

    for pid in range(s.peers):
        loc = build(learning_spec(s), pid)
        d, tr, state = loc.data, loc.trainer, loc.state
        train, evals = [], []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            state, _ = tr.train(state, d.train)
            as_numpy(state.params)
            t1 = time.perf_counter()
            evaluate(tr, state.params, d)
            t2 = time.perf_counter()
            if i >= 2:  # the first calls compile (or load from the cache)
                train.append(t1 - t0)
                evals.append(t2 - t1)
        print(
            json.dumps(
                {
                    "peer": pid,
                    "train_s": statistics.median(train),
                    "eval_s": statistics.median(evals),
                }
            ),
            flush=True,
        )


def _sample(annotation: object) -> object:
    """A plausible value for a history field of this (string) annotation."""
    text = str(annotation)
    if "list" in text:
        return [1, 7]
    if "float" in text:
        return 0.5
    if "int" in text:
        return 1
    return None


def overhead(scenario_path: str, reps: int) -> None:
    """Uncontended cost of each step of one gossip round for peer 0, median seconds.

    Mirrors `GossipPeer._round`: train, to numpy, encode + send to both neighbours,
    receive + decode two models (sent to our own inbox), mix, with_params, evaluate
    twice, write the history line and the log line. Everything runs in this one
    process, alone on one core, so the figures are CPU cost without contention.
    """
    import dataclasses
    import statistics
    import tempfile

    from p2pfl.runtime import process as _runtime
    from p2pfl.runtime import roles

    s = roles.scenario(Path(scenario_path))
    _runtime.limit_threads()
    _runtime.enable_compile_cache()
    import zmq

    from p2pfl.config.learning import learning_spec
    from p2pfl.core.graphs import local_weights
    from p2pfl.core.mixing import mix
    from p2pfl.learning.local import build, evaluate
    from p2pfl.learning.trainer import as_numpy
    from p2pfl.net.transport import Transport
    from p2pfl.protocol import wire
    from p2pfl.record.history import HistoryWriter, RoundRecord
    from p2pfl.runtime import logs

    tmp = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    logs.configure(tmp / "probe.jsonl", "info")
    import structlog

    log = structlog.get_logger().bind(peer=0)
    loc = build(learning_spec(s), 0)
    d, tr, state = loc.data, loc.trainer, loc.state
    expect = wire.Expect(s.digest(), s.peers - 1, {"params": (tr.n_params,)})
    t = Transport("tcp://127.0.0.1:*", {}, expect.max_frames)
    own_addr = t.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
    ctx = zmq.Context.instance()
    for j in (1, s.peers - 1):  # two "neighbours" whose outboxes lead to our own inbox
        sock = ctx.socket(zmq.PUSH)
        sock.connect(own_addr)
        t.outboxes[j] = sock
    history = HistoryWriter(tmp / "peer-0.jsonl")
    steps: dict[str, list[float]] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append(now - t0)
        return now

    for r in range(1, reps + 3):
        t0 = time.perf_counter()
        state, loss = tr.train(state, d.train)
        own = as_numpy(state.params)
        t0 = lap("train (jit call + device->numpy)", t0)
        frames = wire.encode(
            "model", 1, r, expect.scenario, {"degree": 2, "samples": 100}, {"params": own}
        )
        for j in t.outboxes:
            t.send(j, frames)
        t0 = lap("encode + send to 2 neighbours", t0)
        got = {}
        for j in t.outboxes:
            msg = wire.decode(t.recv(5.0).frames, expect)
            got[j] = (msg.arrays["params"], msg.meta["degree"])
        t0 = lap("recv + decode 2 models (loopback)", t0)
        weights = local_weights(s.gossip.mixing, 2, {j: g[1] for j, g in got.items()})
        mixed = mix(own, {j: g[0] for j, g in got.items()}, weights)
        t0 = lap("weights + mix (numpy float64)", t0)
        state = tr.with_params(state, mixed.params)
        t0 = lap("with_params (numpy -> device)", t0)
        test_acc, hold = evaluate(tr, state.params, d)
        t0 = lap("evaluate test + holdout", t0)
        values = {
            "round": r,
            "train_loss": float(loss),
            "test_accuracy": test_acc,
            "holdout_accuracy": hold,
            "disagreement": mixed.disagreement,
        }
        history.write(
            RoundRecord(
                **{
                    f.name: values.get(f.name, _sample(f.type))
                    for f in dataclasses.fields(RoundRecord)
                }
            )
        )
        t0 = lap("history line (float(loss) sync + json)", t0)
        log.info("round_done", round=r, holdout_accuracy=hold, heard=2)
        lap("structlog round_done line", t0)
    history.close()
    t.close()
    for name, xs in steps.items():
        print(json.dumps({"step": name, "s": statistics.median(xs[2:])}), flush=True)


def main() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    what = sys.argv[1]
    if what == "startup":
        startup(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    elif what == "overhead":
        overhead(sys.argv[2], int(sys.argv[3]))
    elif what == "compute":
        compute(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown probe {what!r}")


if __name__ == "__main__":
    main()
