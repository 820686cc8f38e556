"""Reading a scenario: TOML -> `Scenario`, then the checks across fields and sections.

`load` (a file) and `parse` (a mapping) validate field by field with the pydantic
schema (`p2pfl.config.schema`), then across fields: the graph is connected, edge ids
are in range, npz files exist and agree, every peer gets at least two samples, the
timeouts leave room for heartbeats, the coordinator has an address, a custom model's
factory and a custom dataset's loader import, run and give the right shapes. Each failure is a
`ScenarioError` naming the field, the value and what is allowed; the CLI turns it
into exit code 2.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import networkx as nx
from pydantic import ValidationError

from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.core.graphs import GraphError, build_graph
from p2pfl.learning import datasets
from p2pfl.learning.partition import min_pool, pool_size

MAX_LAUNCH_PEERS = 1024  # processes `p2pfl launch` starts at most; more: `p2pfl simulate`


def graph(s: Scenario) -> nx.Graph:
    """The scenario's graph (`[topology]`, its seed, files relative to the scenario file)."""
    try:
        return build_graph(s.topology, s.seed, s.base_dir)
    except GraphError as exc:
        raise ScenarioError(str(exc)) from None


def with_mode(s: Scenario, mode: str) -> Scenario:
    """The same scenario run in another mode, validated again."""
    return parse({**s.model_dump(exclude={"base_dir"}), "mode": mode}, s.base_dir)


def _format_error(err: Any) -> str:  # a pydantic ErrorDetails
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field (value {err['input']!r}); check the spelling"
    return f"{field} = {err['input']!r}: {err['msg']}"


def parse(raw: dict[str, Any], base_dir: str = ".", peer: int | None = None) -> Scenario:
    """Validate a parsed TOML mapping into a Scenario, checking fields across sections.

    `peer` limits the per-peer checks (its npz file) to one peer, as on a real host.
    """
    try:
        scenario = Scenario.model_validate({**raw, "base_dir": base_dir})
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ScenarioError("invalid scenario:\n  " + "\n  ".join(lines)) from None
    _check_cross_fields(scenario, peer)
    return scenario


def load(path: str | Path, peer: int | None = None, mode: str | None = None) -> Scenario:
    """Read and validate a scenario file; raises ScenarioError naming what is wrong.

    `mode` overrides the file's mode (how `p2pfl compare` runs one file both ways).
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"scenario file {str(p)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    if mode is not None:
        raw = {**raw, "mode": mode}
    return parse(raw, base_dir=str(p.parent), peer=peer)


def _check_cross_fields(s: Scenario, peer: int | None) -> None:
    n = s.topology.peers
    if s.network.addresses is not None and len(s.network.addresses) != n:
        raise ScenarioError(
            f"network.addresses has {len(s.network.addresses)} entries: "
            f"one per peer is needed (topology.peers = {n})"
        )
    # more peers than a launch runs are for the simulator, which binds no port
    if s.network.addresses is None and n <= MAX_LAUNCH_PEERS and s.network.base_port + n > 65535:
        raise ScenarioError(f"network.base_port = {s.network.base_port}: too high for {n} peers")
    graph(s)  # the very graph the peers will build
    if s.data.dataset == "npz":
        ids = range(n) if peer is None else [peer]
        missing = [i for i in ids if not s.resolve(s.data.path.format(id=i)).is_file()]
        if missing:
            first = s.resolve(s.data.path.format(id=missing[0]))
            raise ScenarioError(
                f"data.path = {s.data.path!r}: no npz file for peers {missing} (e.g. {first})"
            )
    if s.data.dataset == "npz":
        _check_npz(s, range(n) if peer is None else [peer])
    _check_pool(s)
    if s.gossip.heartbeat_s * 2 > s.gossip.peer_timeout_s:
        raise ScenarioError(
            f"gossip.heartbeat_s = {s.gossip.heartbeat_s}: must be at most half of "
            f"gossip.peer_timeout_s = {s.gossip.peer_timeout_s}, or a live neighbour "
            "could be declared gone between two heartbeats"
        )
    _check_coordinator(s)
    if s.data.holdout is not None and not s.resolve(s.data.holdout).is_file():
        raise ScenarioError(f"data.holdout = {s.data.holdout!r}: file does not exist")
    if s.model.kind == "cnn" and s.data.dataset not in ("digits", "mnist5k"):
        raise ScenarioError(
            f"model.kind = 'cnn' needs image data: data.dataset = {s.data.dataset!r} "
            "(allowed: 'digits', 'mnist5k')"
        )
    _check_custom(s, peer)
    _check_secagg(s)
    _check_privacy(s)


def _check_secagg(s: Scenario) -> None:
    """Secure aggregation needs the FedAvg server, the mean, and enough sampled peers
    that the unmasked sum hides each of them (3 at the least); crashes after masking
    need it on."""
    p, c = s.privacy, s.centralized
    after = [f.peer for f in s.faults.crash if f.phase == "after_masking"]
    if after and not (p.secure_aggregation and s.mode == "centralized"):
        raise ScenarioError(
            f"faults.crash phase = 'after_masking' (peers {after}) needs "
            "privacy.secure_aggregation = true in mode = 'centralized': no masks otherwise"
        )
    if not p.secure_aggregation:
        return
    from p2pfl.core.secagg import MIN_PEERS
    from p2pfl.protocol.fedavg_rounds import sample_size
    from p2pfl.protocol.secagg import MAX_PEERS

    if s.mode != "centralized":
        raise ScenarioError(
            f"privacy.secure_aggregation = true with mode = {s.mode!r}: secure aggregation "
            "hides each update from the FedAvg server, so it needs mode = 'centralized' (a "
            "gossip peer sees each neighbour's model: use privacy.mechanism = 'update')"
        )
    if p.where == "server" and p.mechanism != "none":
        raise ScenarioError(
            "privacy.secure_aggregation = true with privacy.where = 'server': central DP "
            "clips each update at the server, which secure aggregation hides from it; "
            "use where = 'peer' (each peer noises before masking)"
        )
    if c.aggregator != "mean":
        raise ScenarioError(
            f"privacy.secure_aggregation = true with centralized.aggregator = "
            f"{c.aggregator!r}: the server only ever sees the sum of the updates, so only "
            "'mean' (FedAvg) can be computed from it"
        )
    n = s.min_peers
    k = sample_size(n, c.fraction, c.min_updates)
    if k < MIN_PEERS:
        raise ScenarioError(
            f"privacy.secure_aggregation = true with {k} peers sampled per round "
            f"(centralized.min_peers = {n}, fraction = {c.fraction}): at least {MIN_PEERS} "
            "are needed, or the sum with one's own update gives away the other's"
        )
    if s.peers > MAX_PEERS:
        raise ScenarioError(
            f"privacy.secure_aggregation = true with {s.peers} peers: at most {MAX_PEERS} "
            "(each round's roster and shares must fit one message header)"
        )


def _check_privacy(s: Scenario) -> None:
    """Privacy settings that only make sense together; the calibration is checked here
    too, so an unreachable target ε stops the scenario before anything starts."""
    p = s.privacy
    if p.mechanism == "none":
        return
    if p.target_epsilon is not None and p.noise_multiplier is not None:
        raise ScenarioError(
            "privacy.target_epsilon and privacy.noise_multiplier are both set: the target "
            "calibrates the noise multiplier, leave one out"
        )
    if p.mechanism == "dp_sgd" and p.where == "server":
        raise ScenarioError(
            "privacy.where = 'server' is for mechanism = 'update' (the server noises the "
            "aggregate); dp_sgd noises inside each peer's training: leave where = 'peer'"
        )
    if p.where == "server":
        if s.mode != "centralized":
            raise ScenarioError(
                "privacy.where = 'server' is central DP at the FedAvg server: it needs "
                f"mode = 'centralized' (here {s.mode!r}); gossip has no server: use "
                "where = 'peer' (each peer noises what it sends)"
            )
        if s.centralized.aggregator != "mean":
            raise ScenarioError(
                f"privacy.where = 'server' with centralized.aggregator = "
                f"{s.centralized.aggregator!r}: central DP clips and sums the updates "
                "(a mean with a fixed denominator); robust rules have no accounted noise"
            )
    if s.training.rounds == 0:
        raise ScenarioError(
            "privacy.mechanism = 'update' with training.rounds = 0: nothing to protect"
        )
    from p2pfl.config.privacy import dp_plan

    dp_plan(s)


def _check_custom(s: Scenario, peer: int | None) -> None:
    """A custom model or dataset names its factory or loader, and only a custom one does;
    the factory and loader are then imported, called and shape-checked (the loader once)."""
    pairs = (
        ("model", "kind", s.model.kind, "factory", s.model.factory),
        ("data", "dataset", s.data.dataset, "loader", s.data.loader),
    )
    for section, kind_field, kind, ref_field, ref in pairs:
        if kind == "custom" and ref is None:
            raise ScenarioError(
                f"{section}.{ref_field} is missing: {section}.{kind_field} = 'custom' needs "
                f"{ref_field} = 'package.module:function'"
            )
        if kind != "custom" and ref is not None:
            raise ScenarioError(
                f"{section}.{ref_field} = {ref!r}: only allowed with {section}.{kind_field} = "
                f"'custom' (here {kind!r})"
            )
    if s.model.kind == "custom" or s.data.dataset == "custom":
        from p2pfl.config.learning import check_custom, learning_spec

        check_custom(learning_spec(s), 0 if peer is None else peer)


def _check_npz(s: Scenario, ids: range | list[int]) -> None:
    """Local files must agree with the scenario, or peers would build different models."""
    classes = s.data.classes
    if classes is None:
        raise ScenarioError(
            "data.classes is missing: with data.dataset = 'npz' every peer must build the "
            "same model, so the number of labels cannot come from each local file"
        )
    files = [("data.path", s.resolve(s.data.path.format(id=i))) for i in ids]
    if s.data.holdout is not None and s.resolve(s.data.holdout).is_file():
        files.append(("data.holdout", s.resolve(s.data.holdout)))
    widths = set()
    for field, path in files:
        try:
            widths.add(datasets.npz(path, classes).x.shape[1])
        except ValueError as exc:
            raise ScenarioError(f"{field}: {exc}") from None
    if len(widths) > 1:
        raise ScenarioError(
            f"data.path: the npz files disagree on the feature count {sorted(widths)}"
        )


_DATASET_SIZES = {
    "digits": 1797,
    "breast_cancer": 569,
    "mnist5k": 5000,
}  # samples in the bundled datasets


def _check_pool(s: Scenario) -> None:
    """Every peer's shard must hold at least two samples (one to train, one to test)."""
    d = s.data
    total = d.synthetic_samples if d.dataset == "synthetic" else _DATASET_SIZES.get(d.dataset)
    if total is None:  # npz: each peer brings its own file
        return
    if round(total * d.test_fraction) < 1:
        raise ScenarioError(
            f"data.test_fraction = {d.test_fraction}: the holdout of {total} samples would be empty"
        )
    pool = pool_size(total, d.test_fraction)
    need = min_pool(s.peers, d.partition, d.shards_per_peer)
    if pool < need:
        raise ScenarioError(
            f"topology.peers = {s.peers}: data.dataset = {d.dataset!r} leaves {pool} samples "
            f"outside the holdout (data.test_fraction = {d.test_fraction}), and the "
            f"{d.partition!r} partition needs at least {need} to give each peer two"
        )


def _check_coordinator(s: Scenario) -> None:
    """Centralized settings that must agree with the peer count, and a reachable server."""
    n, c = s.peers, s.centralized
    for kind in ("slow", "byzantine", "crash"):
        ids = [f.peer for f in getattr(s.faults, kind)]
        for i in ids:
            if i >= n:
                raise ScenarioError(f"faults.{kind}: peer = {i} is not a peer id in 0..{n - 1}")
        if len(set(ids)) != len(ids):
            raise ScenarioError(f"faults.{kind}: a peer is listed twice")
    if s.mode == "centralized" and any(f.attack == "dissensus" for f in s.faults.byzantine):
        raise ScenarioError(
            "faults.byzantine: attack = 'dissensus' needs gossip neighbours to pull apart; "
            "it has no meaning in mode = 'centralized'"
        )
    if c.min_peers is not None and c.min_peers > n:
        raise ScenarioError(
            f"centralized.min_peers = {c.min_peers}: more than the {n} peers of the scenario"
        )
    if c.min_updates > s.min_peers:
        raise ScenarioError(
            f"centralized.min_updates = {c.min_updates}: more than centralized.min_peers "
            f"= {s.min_peers}, so no round could ever close at its deadline"
        )
    if c.heartbeat_s * 2 > min(c.peer_timeout_s, c.coordinator_timeout_s):
        raise ScenarioError(
            f"centralized.heartbeat_s = {c.heartbeat_s}: must be at most half of "
            "centralized.peer_timeout_s and centralized.coordinator_timeout_s"
        )
    if not s.needs_coordinator:
        return
    if s.coordinator.address is None:
        if s.network.addresses is not None:
            raise ScenarioError(
                "coordinator.address is missing: with network.addresses the coordinator's "
                "address cannot be derived from network.base_port"
            )
        if n <= MAX_LAUNCH_PEERS and s.network.base_port + n + 1 > 65535:
            raise ScenarioError(
                f"network.base_port = {s.network.base_port}: no room for the coordinator's "
                f"two ports after {n} peers"
            )
    if s.mode == "centralized" and s.data.dataset == "npz" and s.data.holdout is None:
        raise ScenarioError(
            "data.holdout is missing: in centralized mode the server evaluates the global "
            "model on it, and learns the model's input width from it"
        )
