"""The plan: a `Scenario` resolved once, per role, into the plain values the layers below take.

Only the config layer reads a `Scenario`. Each role (gossip peer, centralized client,
FedAvg server, bootstrap registry) gets one frozen plan: its identity and addresses,
its protocol machine's settings, its aggregation rule and outgoing-model transform
(built once from the registry, called every round), its PRNG streams, its faults, and
its learning set-up. The runtime composes a node from a plan and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from p2pfl.config.keys import keys_dir, node_keys, secagg_auth
from p2pfl.config.learning import DataLike, ModelLike, learning_spec
from p2pfl.config.loader import graph
from p2pfl.config.privacy import dp_plan
from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.core import streams
from p2pfl.core.aggregators import (
    GossipAggregator,
    ServerAggregator,
    gossip_aggregator,
    server_aggregator,
)
from p2pfl.core.attacks import dissensus_gains
from p2pfl.core.graphs import Mixing
from p2pfl.core.privacy import DpPlan
from p2pfl.core.transforms import OUTGOING_ATTACKS, ModelTransform, attack_transform, identity
from p2pfl.learning.local import LearningSpec
from p2pfl.net.keys import Keyring
from p2pfl.protocol.fedavg_client import ClientConfig
from p2pfl.protocol.fedavg_server import ServerConfig
from p2pfl.protocol.secagg import KeyAuth
from p2pfl.protocol.sync import SyncConfig


@dataclass(frozen=True)
class Run:
    """What every role of a run shares."""

    name: str
    mode: str
    digest: str  # the scenario hash every message carries
    peers: int
    rounds: int
    seed: int
    out: Path  # the run folder
    every_round: bool  # [output] models = "every_round": models/round-<r>/ as well
    keys: Path | None = None  # [security] keys, resolved: the CURVE keys folder, or None


@dataclass(frozen=True)
class PeerFaults:
    """Faults injected into one peer ([faults]); all off by default."""

    slow_delay_s: float = 0.0  # a straggler holds back each model this long
    crash_round: int | None = None  # SIGKILLed on reaching this round (not when resumed)
    crash_after_masking: bool = False  # ... or in a secure round, once its masks are fixed
    label_flip: bool = False  # a label_flip Byzantine peer trains on flipped labels
    link_delay_ms: float = 0.0  # gossip links: each message held back this long ...
    link_drop: float = 0.0  # ... or lost with this probability
    link_seed: tuple[int, ...] = ()  # which messages the link loses


@dataclass(frozen=True)
class GossipPlan:
    """One gossip peer."""

    run: Run
    peer_id: int
    address: str  # where it binds (and, with bootstrap, what it advertises)
    neighbour_addresses: Mapping[int, str]  # empty with bootstrap: the welcome names them
    bootstrap: str | None  # the coordinator's control address when bootstrapping
    sync: SyncConfig
    mixing: Mixing
    aggregator: GossipAggregator
    catch_up: ServerAggregator  # combines the neighbours' newest models after a rejoin
    transform: ModelTransform  # what an attacker does to the model it sends
    gains: Mapping[int, float]  # dissensus: the gain per honest neighbour (else empty)
    faults: PeerFaults
    learning: LearningSpec
    resume: bool = False
    keys: Keyring | None = None  # CURVE: its pair, its neighbours' (and coordinator's) keys
    privacy: DpPlan | None = None  # [privacy] mechanism = "update" (local or central)


@dataclass(frozen=True)
class ClientPlan:
    """One peer in centralized mode."""

    run: Run
    peer_id: int
    control: str  # the coordinator's control channel
    updates: str  # ... and its update channel
    client: ClientConfig  # samples = 0 until the runtime knows its shard
    transform: ModelTransform
    faults: PeerFaults
    learning: LearningSpec
    resume: bool = False
    keys: Keyring | None = None  # CURVE: its pair and the coordinator's key
    privacy: DpPlan | None = None  # [privacy] mechanism = "update" (local or central)
    secagg_auth: KeyAuth | None = None  # secure aggregation with keys: every peer's key


@dataclass(frozen=True)
class ServerPlan:
    """The coordinator as the FedAvg server."""

    run: Run
    control: str
    updates: str
    server: ServerConfig
    aggregator: ServerAggregator
    learning: LearningSpec
    keys: Keyring | None = None  # CURVE: the coordinator's pair and every peer's key
    privacy: DpPlan | None = None  # central DP (where = "server"): replaces `aggregator`


@dataclass(frozen=True)
class BootstrapPlan:
    """The coordinator as the bootstrap registry of a gossip run."""

    run: Run
    control: str
    neighbours: Mapping[int, tuple[int, ...]]  # each peer's neighbours, sorted
    idle_limit_s: float  # give up this long after the last change (a crashed peer says no bye)
    keys: Keyring | None = None  # as the server's


def _run(s: Scenario, out: Path) -> Run:
    return Run(
        s.name,
        s.mode,
        s.digest(),
        s.peers,
        s.training.rounds,
        s.seed,
        out,
        s.output.models == "every_round",
        keys_dir(s, out),
    )


def _faults(s: Scenario, peer_id: int) -> PeerFaults:
    attack = s.byzantine(peer_id)
    return PeerFaults(
        slow_delay_s=s.slow_delay(peer_id),
        crash_round=s.crash_round(peer_id),
        crash_after_masking=s.crash_after_masking(peer_id),
        label_flip=attack is not None and attack.attack == "label_flip",
        link_delay_ms=s.faults.link_delay_ms,
        link_drop=s.faults.link_drop,
        link_seed=(s.seed, streams.LINK, peer_id),
    )


def _transform(s: Scenario, peer_id: int) -> ModelTransform:
    attack = s.byzantine(peer_id)
    if attack is None:
        return identity()
    return attack_transform(attack.attack, factor=attack.factor, sigma=attack.sigma)


def _gains(s: Scenario, g: nx.Graph, peer_id: int) -> dict[int, float]:
    attack = s.byzantine(peer_id)
    if attack is None or attack.attack != "dissensus":
        return {}
    colluders = {f.peer for f in s.faults.byzantine if f.attack == "dissensus"}
    return dissensus_gains(g, peer_id, colluders, attack.epsilon, s.gossip.mixing)


def _gossip_rule(s: Scenario) -> GossipAggregator:
    gs = s.gossip
    return gossip_aggregator(
        gs.aggregator,
        trim=gs.trim,
        tau=None if gs.clip_tau == "adaptive" else gs.clip_tau,
        clip_fraction=gs.clip_fraction,
        clip_drop=gs.clip_drop,
    )


def _catch_up(s: Scenario) -> ServerAggregator:
    """How a rejoined gossip peer combines its neighbours' newest models: their mean, or
    with a robust aggregator their coordinate-wise median."""
    return server_aggregator("mean" if s.gossip.aggregator == "mean" else "median")


def _server_rule(s: Scenario) -> ServerAggregator:
    c = s.centralized
    return server_aggregator(c.aggregator, trim=c.trim, f=c.krum_f)


def gossip_plan(
    s: Scenario, peer_id: int, out: Path, address: str | None = None, resume: bool = False
) -> GossipPlan:
    """Peer `peer_id` of a gossip run."""
    g = graph(s)
    neighbours = tuple(sorted(g.neighbors(peer_id)))
    gs = s.gossip
    gs_boot = s.coordinator.bootstrap  # then it also talks to the coordinator (node n)
    gains = _gains(s, g, peer_id)
    sync = SyncConfig(
        peer_id=peer_id,
        neighbours=neighbours,
        peers=s.peers,
        rounds=s.training.rounds,
        round_timeout_s=gs.round_timeout_s,
        startup_timeout_s=gs.startup_timeout_s,
        heartbeat_s=gs.heartbeat_s,
        peer_timeout_s=gs.peer_timeout_s,
        targets=frozenset(gains),
    )
    return GossipPlan(
        run=_run(s, out),
        peer_id=peer_id,
        address=address or s.address(peer_id),
        neighbour_addresses={}
        if s.coordinator.bootstrap
        else {j: s.address(j) for j in neighbours},
        bootstrap=s.coordinator_addresses()[0] if s.coordinator.bootstrap else None,
        sync=sync,
        mixing=gs.mixing,
        aggregator=_gossip_rule(s),
        catch_up=_catch_up(s),
        transform=_transform(s, peer_id),
        gains=gains,
        faults=_faults(s, peer_id),
        learning=learning_spec(s),
        resume=resume,
        keys=node_keys(s, out, peer_id, [*neighbours, *([s.peers] if gs_boot else [])]),
        privacy=dp_plan(s),
    )


def client_plan(s: Scenario, peer_id: int, out: Path, resume: bool = False) -> ClientPlan:
    """Peer `peer_id` of a centralized run."""
    c = s.centralized
    control, updates = s.coordinator_addresses()
    client = ClientConfig(
        peer=peer_id,
        coordinator=s.peers,
        samples=0,
        heartbeat_s=c.heartbeat_s,
        coordinator_timeout_s=c.coordinator_timeout_s,
        startup_timeout_s=c.startup_timeout_s,
        secagg_range=_secagg_range(s),
    )
    return ClientPlan(
        run=_run(s, out),
        peer_id=peer_id,
        control=control,
        updates=updates,
        client=client,
        transform=_transform(s, peer_id),
        faults=_faults(s, peer_id),
        learning=learning_spec(s),
        resume=resume,
        keys=node_keys(s, out, peer_id, [s.peers]),
        privacy=dp_plan(s),
        secagg_auth=secagg_auth(s, out, peer_id),
    )


def _secagg_range(s: Scenario) -> float | None:
    """Secure aggregation's clipping range, None when it is off."""
    return s.privacy.secagg_range if s.privacy.secure_aggregation else None


def _server_config(s: Scenario) -> ServerConfig:
    """The FedAvg server machine's settings (the server's, and the simulator's)."""
    c = s.centralized
    dp = dp_plan(s)
    return ServerConfig(
        peers=s.peers,
        rounds=s.training.rounds,
        seed=s.seed,
        min_peers=s.min_peers,
        fraction=c.fraction,
        min_updates=c.min_updates,
        round_timeout_s=c.round_timeout_s,
        startup_timeout_s=c.startup_timeout_s,
        heartbeat_s=c.heartbeat_s,
        peer_timeout_s=c.peer_timeout_s,
        coordinator_timeout_s=c.coordinator_timeout_s,
        weighting=c.weighting,
        poisson=dp is not None and dp.where == "server",
        secagg_range=_secagg_range(s),
    )


def server_plan(s: Scenario, out: Path) -> ServerPlan:
    """The FedAvg server of a centralized run."""
    control, updates = s.coordinator_addresses()
    dp = dp_plan(s)
    server = _server_config(s)
    return ServerPlan(
        run=_run(s, out),
        control=control,
        updates=updates,
        server=server,
        aggregator=_server_rule(s),
        learning=learning_spec(s),
        keys=node_keys(s, out, s.peers, range(s.peers)),
        privacy=dp if dp is not None and dp.where == "server" else None,
    )


def bootstrap_plan(s: Scenario, out: Path) -> BootstrapPlan:
    """The bootstrap registry of a gossip run with `coordinator.bootstrap = true`."""
    g = graph(s)
    gs = s.gossip
    return BootstrapPlan(
        run=_run(s, out),
        control=s.coordinator_addresses()[0],
        neighbours={i: tuple(sorted(g.neighbors(i))) for i in range(s.peers)},
        idle_limit_s=gs.startup_timeout_s + s.training.rounds * gs.round_timeout_s,
        keys=node_keys(s, out, s.peers, range(s.peers)),
    )


@dataclass(frozen=True)
class SimPlan:
    """Every peer of a run in one process (`p2pfl simulate`): the per-peer plans' values,
    gathered once for the whole network (O(peers + edges), no per-peer plan objects).

    Wall-time faults map onto rounds (see `sim_plan`); the rest keep their meaning.
    """

    run: Run
    neighbours: tuple[tuple[int, ...], ...]  # peer i's neighbours, sorted
    mixing: Mixing
    aggregator: GossipAggregator
    catch_up: ServerAggregator  # a rejoined gossip peer's rule for its neighbours' models
    server: ServerConfig
    server_aggregator: ServerAggregator
    transforms: Mapping[int, ModelTransform]  # peers whose outgoing model is attacked
    gains: Mapping[int, Mapping[int, float]]  # dissensus attacker -> honest neighbour -> gain
    label_flips: frozenset[int]
    crashes: Mapping[int, tuple[int, int | None]]  # peer -> (crash round, rejoin round)
    link_drop: float
    learning: LearningSpec
    chunk: int  # peers per batched call ([sim] chunk)
    eval_every: int = 1  # gossip: evaluate every this many rounds (and the last)
    privacy: DpPlan | None = None  # [privacy] mechanism = "update", as every peer applies it


def _rounds_until(seconds: float, round_s: float) -> int:
    """Rounds a wall-time span covers in the simulator: at least one."""
    return max(1, math.ceil(seconds / round_s))


def _sim_wall_time_faults(s: Scenario) -> None:
    """Refuse wall-time faults the simulator cannot map onto rounds, naming the field.

    A straggler or a link delay shorter than the round deadline only costs time (its
    model is still heard that round), so the simulator runs it as a plain peer or link.
    Longer ones make models miss rounds by how the clocks fall: refused.
    """
    deadline, field = (
        (s.gossip.round_timeout_s, "gossip.round_timeout_s")
        if s.mode == "gossip"
        else (s.centralized.round_timeout_s, "centralized.round_timeout_s")
    )
    for k, slow in enumerate(s.faults.slow):
        if slow.delay_s >= deadline:
            raise ScenarioError(
                f"faults.slow[{k}].delay_s = {slow.delay_s:g}: not below {field} = "
                f"{deadline:g}, so whether its model is heard depends on wall time, which "
                "the simulator does not have (run it with p2pfl launch)"
            )
    if s.faults.link_delay_ms / 1000 >= deadline:
        raise ScenarioError(
            f"faults.link_delay_ms = {s.faults.link_delay_ms:g}: not below {field}, so "
            "whether a model is heard depends on wall time (run it with p2pfl launch)"
        )


def sim_plan(
    s: Scenario, out: Path, model: ModelLike | None = None, data: DataLike | None = None
) -> SimPlan:
    """The whole run of `s` for the simulator.

    Raises ScenarioError for wall-time faults it cannot map (`_sim_wall_time_faults`).
    A crash with `rejoin_after_s` rejoins `ceil(rejoin_after_s / sim.round_s)` rounds
    (at least one) after the round it crashed in. `model` / `data` (Python objects:
    a factory, a loader or arrays) override the file's, as `learning_spec` takes them.
    """
    _sim_wall_time_faults(s)
    g = graph(s)
    gs = s.gossip
    byzantine = {f.peer: f for f in s.faults.byzantine}
    crashes = {
        f.peer: (
            f.at_round,
            None
            if f.rejoin_after_s is None
            else f.at_round + _rounds_until(f.rejoin_after_s, s.sim.round_s),
        )
        for f in s.faults.crash
    }
    return SimPlan(
        run=_run(s, out),
        neighbours=tuple(tuple(sorted(g.neighbors(i))) for i in range(s.peers)),
        mixing=gs.mixing,
        aggregator=_gossip_rule(s),
        catch_up=_catch_up(s),
        server=_server_config(s),
        server_aggregator=_server_rule(s),
        transforms={
            i: _transform(s, i) for i, f in byzantine.items() if f.attack in OUTGOING_ATTACKS
        },
        gains={i: _gains(s, g, i) for i, f in byzantine.items() if f.attack == "dissensus"},
        label_flips=frozenset(i for i, f in byzantine.items() if f.attack == "label_flip"),
        crashes=crashes,
        link_drop=s.faults.link_drop,
        learning=learning_spec(s, model=model, data=data),
        chunk=s.sim.chunk,
        eval_every=s.sim.eval_every,
        privacy=dp_plan(s),
    )
