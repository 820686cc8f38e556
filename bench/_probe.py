"""Instrumented pieces of one peer, run as a separate process by the benchmarks.

Every mode builds what a peer builds the way `p2pfl peer` builds it: the scenario
through `p2pfl.runtime.roles.scenario`, the process set-up of `roles` (thread limits,
logs, compile cache), the peer's plan from `p2pfl.config.plan.gossip_plan`, and the
peer itself (`p2pfl.runtime.peer.GossipPeer`: `learning.local.build`, the sockets, the
history, the sync-gossip machine, its `Learner`). Nothing of the round is re-implemented
here: the probe calls the pieces `GossipPeer` calls, in its order, and times them.

`startup`: what `p2pfl peer` does before its first round (imports, scenario, logs,
JAX + compile cache, plan, `GossipPeer(plan)` with `build`'s pieces and the sockets
timed from inside, the round-0 evaluation, the first two training calls), one JSON
line per step with the epoch time at its end and the process RSS, so the caller can
attribute a peer's start-up time and memory.

`compute`: the uncontended compute of a round for every peer of a scenario (local
training + the evaluation of test and holdout, timed as the peer's history line times
them: `Learner.train`'s train_s, `Learner.evaluate`'s seconds), each from its own plan.

`overhead`: one gossip round of peer 0 taken apart, uncontended: the real
`GossipPeer` of peer 0, with two stand-in neighbours (its graph neighbours' own
sockets, at their own addresses, in this process) that send it their round-r model
before it trains and swallow what it sends. Each step is the runtime's own call:
`Learner.train` (train step, model to numpy, loss, the plan's transform),
`SyncGossip.start_round` + `GossipPort.carry_out` (`node.encode`, the transport),
`node.drive` (`GossipPort.receive` -> `node.decode` -> `SyncGossip.feed`),
`SyncGossip.take`, `local_weights` + `stack_neighbourhood`, the plan's aggregator (the
core gossip step), `Learner.with_params`, `Learner.evaluate`, `PeerHistory.write`, the
`round_done` log line, `Learner.save` (the checkpoint). As a
check that the steps are the whole round, the same peer then runs its own round
method (what `GossipPeer.run` calls every round) plus its checkpoint, timed whole.

Every mode pins itself to one core (the launcher pins peers the same way).
"""

from __future__ import annotations

import time

T_START = time.time()  # before any import of ours

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _emit(step: str, **extra: object) -> None:
    print(json.dumps({"step": step, "t": time.time(), "rss": _rss(), **extra}), flush=True)


def _set_up(scenario_path: str, log_path: Path, peer: int | None = None) -> Any:
    """The scenario, then `p2pfl peer`'s process set-up in its order (`roles._set_up`)."""
    from p2pfl.runtime import logs, process, roles

    s = roles.scenario(Path(scenario_path), peer=peer)
    process.limit_threads()
    logs.configure(log_path, "info")
    process.enable_compile_cache()
    return s


def startup(scenario_path: str, peer_id: int, out: Path) -> None:
    """One peer's start-up, step by step."""
    _emit("interpreter", t=T_START)
    _emit("stdlib imports")
    from p2pfl.runtime import process, roles  # scenario schema: pydantic

    _emit("import p2pfl.runtime.roles (pydantic scenario schema)")
    s = roles.scenario(Path(scenario_path), peer=peer_id)
    _emit("load + validate scenario (networkx graph check)")
    process.limit_threads()
    from p2pfl.runtime import logs

    logs.configure(out / "logs" / f"probe-{peer_id}.jsonl", "info")
    _emit("import + configure structlog")
    process.enable_compile_cache()
    _emit("import jax + enable compile cache")
    from p2pfl.config.plan import gossip_plan
    from p2pfl.learning import local as local_mod
    from p2pfl.runtime import learner as learner_mod
    from p2pfl.runtime import peer as peer_mod  # optax, zmq, msgpack, ...

    _emit("import p2pfl.runtime.peer + config.plan (optax, zmq, msgpack, ...)")
    plan = gossip_plan(s, peer_id, out)
    _emit("gossip plan (graph, aggregator, transform)")
    # GossipPeer(plan) is timed as a whole and its pieces through wrappers around the
    # module functions it calls, so the probe follows whatever they do today.
    marks: list[tuple[str, float, int]] = []

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            marks.append((label, time.time(), _rss()))
            return result

        return wrapper

    pieces = [
        (local_mod, "peer_data", "load dataset + shard + device arrays"),
        (local_mod, "make_model", "make model"),
        (local_mod, "make_trainer", "make trainer (jit wrappers)"),
        (learner_mod, "build", "trainer programs + init (rest of local.build)"),
        (peer_mod, "with_faults", "open sockets (Transport + link faults)"),
    ]
    for module, name, label in pieces:
        if hasattr(module, name):
            setattr(module, name, timed(label, getattr(module, name)))
    peer = peer_mod.GossipPeer(plan)
    for label, t_end, rss in marks:
        print(json.dumps({"step": label, "t": t_end, "rss": rss}), flush=True)
    _emit("history file + sync machine (rest of GossipPeer())")
    loc = peer.learner.local
    local_mod.evaluate(loc.trainer, loc.state.params, loc.data)  # what the round-0 line runs
    _emit("round-0 evaluation (evaluate: compile or cache load)", phase="ready")
    state, loss = loc.trainer.train(loc.state, loc.data.train)
    float(loss)
    _emit("first train call (round 1: compile or cache load)", phase="round1")
    state, loss = loc.trainer.train(state, loc.data.train)
    float(loss)
    _emit("second train call (steady state)", phase="round2")
    peer.close()


def compute(scenario_path: str, reps: int) -> None:
    """Median uncontended train + evaluate seconds per round, for every peer."""
    import statistics
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    s = _set_up(scenario_path, tmp / "probe.jsonl")
    import structlog

    from p2pfl.config.plan import gossip_plan
    from p2pfl.runtime.learner import Learner

    for pid in range(s.peers):
        learner = Learner(gossip_plan(s, pid, tmp), structlog.get_logger())
        state = learner.local.state
        train, evals = [], []
        for i in range(reps + 2):
            trained = learner.train(state, i + 1)  # train_s: as the peer's history line has it
            state = trained.state
            *_, eval_s = learner.evaluate(state.params)
            if i >= 2:  # the first calls compile (or load from the cache)
                train.append(trained.train_s)
                evals.append(eval_s)
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


class _Neighbours:
    """Peer 0's graph neighbours as stand-ins: their own sockets at their own addresses.

    Before each round each sends peer 0 its model of the round (what a neighbour's
    `SyncGossip.start_round` sends, encoded by `node.encode`); after it, each drains
    what peer 0 sent it. Their work is outside every timed step.
    """

    def __init__(self, s: Any, peer: Any, out: Path) -> None:
        import numpy as np

        from p2pfl.config.plan import gossip_plan
        from p2pfl.net.transport import Transport

        p = peer.plan
        self.ids = list(p.sync.neighbours)
        self.digest = p.run.digest
        self.transports = {}
        for j in self.ids:
            pj = gossip_plan(s, j, out)
            self.transports[j] = Transport(
                pj.address, {p.peer_id: p.address}, peer.expect.max_frames
            )
        own = np.asarray(peer.learner.local.state.params, np.float32)
        rng = np.random.default_rng(0)
        self.models = {j: own + rng.normal(0, 0.01, own.shape).astype(np.float32) for j in self.ids}
        self.to = p.peer_id
        self.degree = {j: len(gossip_plan(s, j, out).sync.neighbours) for j in self.ids}
        self.samples = peer.learner.local.data.n_train

    def send(self, round_: int) -> None:
        from p2pfl.protocol.events import Send
        from p2pfl.runtime.node import encode

        for j, t in self.transports.items():
            meta = {"degree": self.degree[j], "samples": self.samples}
            send = Send(self.to, "model", round_, meta, {"params": self.models[j]})
            t.send(self.to, encode(send, j, self.digest))

    def drain(self, expected: int, timeout_s: float = 5.0) -> None:
        """Read what peer 0 sent each of them this round (one model each)."""
        for t in self.transports.values():
            for _ in range(expected):
                if t.recv(timeout_s) is None:
                    raise RuntimeError("a stand-in neighbour got nothing from peer 0")
            while t.recv(0.0) is not None:
                pass

    def close(self) -> None:
        for t in self.transports.values():
            t.close()


def overhead(scenario_path: str, reps: int) -> None:
    """Uncontended cost of each step of one gossip round for peer 0, median seconds.

    Prints one line per step, `{"step", "s"}`, then `{"check": ..., "s", "steps_s"}`:
    the same peer's own round (+ checkpoint) timed whole, against the steps' sum.
    """
    import statistics
    import tempfile

    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    s = _set_up(scenario_path, tmp / "logs" / "peer-0.jsonl", peer=0)
    import structlog

    from p2pfl.config.plan import gossip_plan
    from p2pfl.core.graphs import local_weights
    from p2pfl.core.mixing import stack_neighbourhood
    from p2pfl.runtime.node import drive
    from p2pfl.runtime.peer import GossipPeer

    plan = gossip_plan(s, 0, tmp)
    peer = GossipPeer(plan)  # its sockets, machine, history, learner: what `p2pfl peer` runs
    nbrs = _Neighbours(s, peer, tmp)
    p, sync, port, lock, learner = peer.plan, peer.sync, peer.port, peer.lock, peer.learner
    state = learner.local.state
    steps: dict[str, list[float]] = {}
    waited: list[float] = []

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append(now - t0)
        return now

    rounds = reps + 2
    check_rounds = max(10, reps // 2)
    if p.run.rounds < rounds + check_rounds:
        raise SystemExit(
            f"overhead needs training.rounds >= {rounds + check_rounds} in the scenario "
            f"(the machine refuses later rounds); it has {p.run.rounds}"
        )
    for r in range(1, rounds + 1):
        nbrs.send(r)
        with lock:
            sync.enter(r)
        structlog.contextvars.bind_contextvars(round=r)
        t0 = time.perf_counter()
        trained = learner.train(state, r)
        state, own = trained.state, trained.model
        t0 = lap("Learner.train (train step, to numpy, loss, transform)", t0)
        with lock:
            sends = sync.start_round(r, trained.sent, time.monotonic())
        port.carry_out(sends)
        t0 = lap("start_round + encode + send to 2 neighbours", t0)
        seen = drive(sync, port, sync.done, lock=lock, drain_first=True)
        waited.append(seen.blocked_s)
        t0 = lap("drive: recv + decode + feed 2 models (loopback)", t0)
        with lock:
            got, late = sync.take(time.monotonic())
        port.carry_out(late)
        peer.history.received(seen.received_bytes)
        peer.history.waited(seen.blocked_s)
        degrees = {j: degree for j, (_, degree) in got.models.items()}
        weights = local_weights(p.mixing, p.sync.degree, degrees)
        stack, w = stack_neighbourhood(
            p.sync.neighbours, {j: x for j, (x, _) in got.models.items()}, weights, own.size
        )
        t0 = lap("take + weights + stack_neighbourhood", t0)
        mixed = p.aggregator(own, stack, w)
        params, spread = np.asarray(mixed.params), float(mixed.disagreement)
        t0 = lap("plan's aggregator (core gossip step) + to numpy", t0)
        if np.isfinite(params).all():
            state = learner.with_params(state, params)
        t0 = lap("isfinite + Learner.with_params (numpy -> device)", t0)
        test_acc, hold_acc, eval_s = learner.evaluate(state.params)
        t0 = lap("Learner.evaluate (test + holdout)", t0)
        peer.history.write(
            r,
            test_accuracy=test_acc,
            holdout_accuracy=hold_acc,
            evaluated_on="mixed",
            train_loss=trained.loss,
            train_s=trained.train_s,
            eval_s=eval_s,
            heard=got.heard,
            missing=got.missing,
            disagreement=spread,
        )
        t0 = lap("history line (json)", t0)
        peer.log.info("round_done", holdout_accuracy=hold_acc, heard=len(got.heard))
        t0 = lap("structlog round_done line", t0)
        learner.save(state, r)
        lap("Learner.save (checkpoint: npz, atomic rename)", t0)
        nbrs.drain(1)
    # the check: the peer's own round, as `GossipPeer.run` calls it, timed whole
    whole: list[float] = []
    own_round = getattr(peer, "_round", None)
    if own_round is not None:
        for r in range(rounds + 1, rounds + check_rounds + 1):
            nbrs.send(r)
            with lock:
                sync.enter(r)
            t0 = time.perf_counter()
            state = own_round(r, state)
            learner.save(state, r)
            whole.append(time.perf_counter() - t0)
            nbrs.drain(1)
    structlog.contextvars.unbind_contextvars("round")
    nbrs.close()
    peer.close()
    medians = {name: statistics.median(xs[2:]) for name, xs in steps.items()}
    for name, sec in medians.items():
        print(json.dumps({"step": name, "s": sec}), flush=True)
    print(
        json.dumps(
            {
                "check": "GossipPeer round + checkpoint, timed whole",
                "s": statistics.median(whole[2:]) if len(whole) > 2 else None,
                "steps_s": sum(medians.values()),
                "blocked_s": statistics.median(waited[2:]),
            }
        ),
        flush=True,
    )


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
