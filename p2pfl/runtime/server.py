"""The centralized FedAvg server process: the Hub's sockets, the `FedAvgServer` machine,
the aggregator, the holdout evaluation and `coordinator.jsonl`.

The machine decides everything about peers and rounds (`p2pfl.protocol.fedavg_server`);
this module drives it with `node.drive` and, whenever it closes a round, aggregates
the round's updates with `centralized.aggregator`, evaluates the new global model on
the common holdout, hands it back to the machine and writes the round's line. After
the last round the final model is saved and the machine waits for the byes.

Unlike the talk's server: nothing is unpickled; a round starts with *at least*
`min_peers` (peers that join later take part from the next round); a round waits on
sockets with a deadline, not a fixed idle timeout; history is written every round.
One message carries an update and its metrics, so there is no race between the talk's
fl_update event and its Kafka record.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import structlog

from p2pfl.net.transport import Hub
from p2pfl.protocol import wire
from p2pfl.protocol.fedavg_server import ClosedRound, FedAvgServer, stack_updates
from p2pfl.record.history import HistoryWriter, ServerRecord, save_model
from p2pfl.runtime.node import drive
from p2pfl.runtime.ports import HubPort

if TYPE_CHECKING:
    from p2pfl.config.plan import ServerPlan

log = structlog.get_logger()


def secagg_record(closed: ClosedRound | None) -> dict[str, object] | None:
    """A secure round's line: how many fixed masks, who dropped, the threshold, and how
    many coordinates were clipped to the declared range (None for round 0)."""
    if closed is None:
        return None
    if closed.secure is None:
        return {"failure": closed.secure_failure}
    return closed.secure.summary()


class SessionAbortedError(RuntimeError):
    """The server gave up (too few peers); peers were told why in end_session."""


class FedServer:
    """Owns the server's sockets, model and history; `serve` runs the whole session."""

    def __init__(self, plan: ServerPlan) -> None:
        # JAX only in a process that serves (the coordinator module imports light)
        from p2pfl.learning.local import build_server
        from p2pfl.learning.trainer import as_numpy

        self.plan = plan
        self.out_dir = plan.run.out
        self.server = build_server(plan.learning)
        model = as_numpy(self.server.params)
        n = self.server.trainer.n_params
        shapes = {"params": (n,), "masked": (n,)}
        self.log = log.bind(peer="coordinator", role="server")
        self.machine = FedAvgServer(plan.server, model, time.monotonic(), self.log)
        expect = wire.Expect(plan.run.digest, plan.run.peers - 1, shapes, {"masked": "uint32"})
        self.hub = Hub(plan.control, plan.updates, expect.max_frames, plan.keys)
        self.saved = False  # the final model is saved (once end_session went out)
        self.port = HubPort(
            self.hub,
            expect,
            plan.run.peers,  # the coordinator's sender id
            self.machine.route,
            self.machine.undelivered,
            self.log,
            hold=self._hand_over,
        )
        self.t0 = time.perf_counter()
        self.history = HistoryWriter(self.out_dir / "coordinator.jsonl")
        self.log.info(
            "coordinator_started", control=plan.control, updates=plan.updates, peers=plan.run.peers
        )

    def _hand_over(self) -> bool:
        """The machine has something for this runtime to do before it reads on."""
        m = self.machine
        return m.done or m.closing is not None or (m.ending and not self.saved)

    def _evaluate(self, params: np.ndarray) -> tuple[float, float]:
        import jax

        trainer, holdout = self.server.trainer, self.server.holdout
        results = jax.device_get(trainer.evaluate_sets(params, (holdout,)))
        return float(results[0][0]), float(results[0][1])

    def _record(
        self, round_: int, closed: ClosedRound | None, started: float, aggregate_s: float
    ) -> None:
        """The line of `round_` (`closed` None: round 0, the initial model)."""
        t = time.perf_counter()
        acc, loss = self._evaluate(self.machine.model)
        eval_s = time.perf_counter() - t
        sent, received = self.port.take_bytes()
        self.history.write(
            ServerRecord(
                round=round_,
                holdout_accuracy=acc,
                holdout_loss=loss,
                train_loss=closed.train_loss if closed else None,
                sampled=list(closed.sampled) if closed else [],
                participants=closed.participants if closed else [],
                missing=closed.missing if closed else [],
                connected=list(closed.connected) if closed else [],
                closed_by=closed.closed_by if closed else "initial",
                bytes_sent=sent,
                bytes_received=received,
                quorum_wait_s=closed.quorum_wait_s if closed else 0.0,
                round_s=time.monotonic() - started,
                aggregate_s=aggregate_s,
                eval_s=eval_s,
                t=time.perf_counter() - self.t0,
                time=time.time(),
                secagg=secagg_record(closed) if self.plan.server.secagg_range else None,
            )
        )
        if self.plan.run.every_round and round_ > 0:
            path = self.out_dir / "models" / f"round-{round_}" / "global.npz"
            save_model(path, self.machine.model)
        closed_by = closed.closed_by if closed else "initial"
        self.log.info("round_closed", round=round_, closed_by=closed_by, holdout_accuracy=acc)

    def _close(self, closed: ClosedRound) -> None:
        """Aggregate the closed round, hand the model back (end_session goes out with the
        last round, so its bytes are on its line), record it."""
        t = time.perf_counter()
        model = self.machine.model
        if closed.secure is not None:  # only the masked inputs' sum is ever unmasked
            model = (model + closed.secure.mean_update()).astype(np.float32)
        elif closed.weights:  # quorum_missed: the global model is kept
            models, weights = stack_updates(closed)
            dp = self.plan.privacy
            if dp is None:
                model = np.asarray(self.plan.aggregator(models, weights))
            else:  # central DP: clipped sum + noise over a fixed denominator
                from p2pfl.core import privacy  # JAX's noise, loaded only when it is used

                key = privacy.noise_key(self.plan.run.seed, self.plan.run.peers, closed.round)
                expected = dp.q * len(closed.connected)
                model = np.asarray(privacy.central_mean(model, models, dp, expected, key))
        aggregate_s = time.perf_counter() - t
        self.port.carry_out(self.machine.close_round(model, time.monotonic()))
        self._record(closed.round, closed, closed.started, aggregate_s)

    def serve(self) -> None:
        """The whole centralized session: quorum, every round, end_session, byes.

        Raises:
            SessionAbortedError: too few peers came (each was told why).
        """
        m = self.machine
        self._record(0, None, time.monotonic(), 0.0)
        if m.round > 0:
            structlog.contextvars.bind_contextvars(round=m.round)
        while not m.done:
            drive(m, self.port, lambda _now: self._hand_over())
            if m.closing is not None:
                self._close(m.closing)
                if not m.ending:
                    structlog.contextvars.bind_contextvars(round=m.round)
            if m.ending and not self.saved:
                structlog.contextvars.unbind_contextvars("round")
                save_model(self.out_dir / "models" / "global.npz", m.model)
                self.saved = True
        structlog.contextvars.unbind_contextvars("round")
        if m.aborted is not None:
            raise SessionAbortedError(m.aborted)
        self.log.info("session_finished", rounds=self.plan.run.rounds)

    def close(self) -> None:
        """Release the sockets and the history file."""
        self.hub.close()
        self.history.close()


def run_server(plan: ServerPlan) -> None:
    """Serve one centralized session; sockets closed even on error."""
    server = FedServer(plan)
    try:
        server.serve()
    finally:
        server.close()
