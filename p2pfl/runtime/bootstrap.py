"""The coordinator's bootstrap role (gossip mode, `coordinator.bootstrap = true`).

Peers say hello with their address; each gets a welcome with its neighbours' addresses
as soon as all of them have registered (`p2pfl.protocol.bootstrap.Registry` decides).
After that the peers never need the coordinator again. The role ends when every peer
has said bye, or when a whole run's worth of time (`gossip.startup_timeout_s` +
rounds x `gossip.round_timeout_s`) has passed since the last hello or bye: a peer that
crashed never says bye.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from p2pfl.net.transport import Hub
from p2pfl.protocol import wire
from p2pfl.protocol.bootstrap import Registry
from p2pfl.protocol.events import Event, Send
from p2pfl.runtime.node import drive
from p2pfl.runtime.ports import HubPort

if TYPE_CHECKING:
    from p2pfl.config.plan import BootstrapPlan

POLL_S = 1.0  # longest wait on the socket between looks at the idle limit
log = structlog.get_logger()


class _Idle:
    """The registry as a `node.Machine`, plus the idle limit: it gives up `idle_limit_s`
    after the last change in who is registered or has left."""

    def __init__(self, registry: Registry, idle_limit_s: float, now: float) -> None:
        self.registry = registry
        self.idle_limit_s = idle_limit_s
        self.last_change = now

    def _state(self) -> tuple[int, int]:
        return len(self.registry.members), len(self.registry.left)

    def feed(self, event: Event, now: float) -> list[Send]:
        before = self._state()
        sends = self.registry.feed(event, now)
        if self._state() != before:
            self.last_change = now
        return sends

    def tick(self, now: float) -> list[Send]:
        return []

    def gave_up(self, now: float) -> bool:
        return now - self.last_change > self.idle_limit_s

    def over(self, now: float) -> bool:
        return self.registry.finished or self.gave_up(now)

    def wake_in(self, now: float) -> float:
        if self.over(now):
            return 0.0
        return min(POLL_S, self.last_change + self.idle_limit_s - now + 1e-3)


def run_bootstrap(plan: BootstrapPlan) -> None:
    """Answer hellos until every peer has said bye, or the idle limit; sockets closed even
    on error."""
    bound = log.bind(peer="coordinator", role="bootstrap")
    registry = Registry(plan.neighbours, bound)
    machine = _Idle(registry, plan.idle_limit_s, time.monotonic())
    expect = wire.Expect(plan.run.digest, plan.run.peers - 1, {})
    hub = Hub(plan.control, None, expect.max_frames, plan.keys)
    try:
        bound.info("coordinator_started", control=plan.control, peers=plan.run.peers)
        port = HubPort(hub, expect, plan.run.peers, registry.route, registry.undelivered, bound)
        while not machine.over(time.monotonic()):
            drive(machine, port, machine.over)
        if not registry.finished:
            bound.warning("bootstrap_gave_up", no_bye=sorted(registry.members))
        else:
            bound.info("bootstrap_finished")
    finally:
        hub.close()
