"""The scenario file's schema: every section and field, its default and its bounds.

A scenario is a TOML file describing one whole experiment, parsed into these frozen
pydantic models (unknown fields are errors). Reading a file and the checks across
fields live in `p2pfl.config.loader`; resolving a scenario into what each role runs
with, in `p2pfl.config.plan`.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from p2pfl.protocol.addresses import check_tcp

TopologyKind = Literal[
    "ring",
    "full",
    "star",
    "line",
    "grid",
    "torus",
    "regular",
    "erdos_renyi",
    "small_world",
    "barabasi_albert",
    "edges",
]


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the field and value."""


# "package.module:function": dotted Python identifiers, a colon, a (dotted) attribute
_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _reference(value: str | None) -> str | None:
    """A `package.module:function` reference, checked for its form only (not imported)."""
    if value is not None and not _REFERENCE.match(value):
        raise ValueError("expected 'package.module:function'")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Topology(_Section):
    """Which graph the peers form; only the fields of the chosen kind are used."""

    kind: TopologyKind = "ring"
    peers: int = Field(8, ge=2, le=100_000)  # p2pfl launch: at most 1024 processes
    degree: int = Field(4, ge=1)
    p: float = Field(0.3, gt=0.0, le=1.0)
    k: int = Field(4, ge=2)
    m: int = Field(2, ge=1)
    rows: int | None = Field(None, ge=1)
    edges: list[tuple[int, int]] | None = None
    file: str | None = None


class Data(_Section):
    """Dataset, how it is split among peers, and the common holdout set."""

    dataset: Literal["digits", "breast_cancer", "mnist5k", "synthetic", "npz", "custom"] = "digits"
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(0.5, gt=0.0, le=1e4)
    shards_per_peer: int = Field(2, ge=1)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    peer_test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    synthetic_samples: int = Field(2000, ge=10)
    synthetic_features: int = Field(20, ge=1)
    synthetic_classes: int = Field(4, ge=2)
    path: str = "data/peer-{id}.npz"
    holdout: str | None = None
    # npz (required) and custom (default: the largest label + 1): the label count
    classes: int | None = Field(None, ge=2)
    # custom: "package.module:function" returning (x, y) or (x, y, x_holdout, y_holdout),
    # imported with the scenario's folder on sys.path (see p2pfl.learning.custom)
    loader: str | None = None

    _loader = field_validator("loader")(_reference)

    @field_validator("path")
    @classmethod
    def _only_id(cls, value: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid path template ({exc})") from None
        if fields - {"id"}:
            raise ValueError("the only placeholder allowed is {id}")
        return value


class Model(_Section):
    """The network every peer trains; `init = shared` starts all peers identical."""

    kind: Literal["logreg", "mlp", "cnn", "custom"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64])
    init: Literal["shared", "per_peer"] = "shared"
    # custom: "package.module:function" called as factory(n_features, n_classes, key),
    # imported with the scenario's folder on sys.path (see p2pfl.learning.custom)
    factory: str | None = None

    _factory = field_validator("factory")(_reference)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(h < 1 for h in value):
            raise ValueError("every hidden layer width must be >= 1")
        return value


class Training(_Section):
    """Local training per round: epochs over the peer's shard with an optax optimizer."""

    rounds: int = Field(40, ge=0)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad"] = (
        "adam"
    )
    learning_rate: float = Field(0.005, ge=0.0)


class Gossip(_Section):
    """How a round's models are exchanged and mixed."""

    protocol: Literal["sync"] = "sync"
    mixing: Literal["metropolis", "uniform"] = "metropolis"
    round_timeout_s: float = Field(10.0, gt=0.0)
    startup_timeout_s: float = Field(60.0, gt=0.0)
    heartbeat_s: float = Field(0.5, gt=0.0, le=60.0)  # a neighbour sent nothing this long
    peer_timeout_s: float = Field(5.0, gt=0.0)  # a neighbour silent this long is gone
    # mean: Metropolis mixing; median / trimmed_mean: coordinate-wise over the
    # peer's own and its neighbours' models; clipping: self-centred clipping (tau)
    aggregator: Literal["mean", "median", "trimmed_mean", "clipping"] = "mean"
    trim: int = Field(1, ge=0)  # trimmed_mean: values dropped at each end, per coordinate
    # clipping: largest pull of one neighbour (L2); "adaptive": each round, clip the
    # farthest neighbours holding at most clip_fraction of the mixing weight
    clip_tau: Annotated[float, Field(gt=0.0)] | Literal["adaptive"] = 1.0
    clip_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    # clipping: a neighbour farther than clip_drop * tau is left out, not clipped
    clip_drop: float | None = Field(None, ge=1.0)


class Centralized(_Section):
    """The FedAvg server of `mode = "centralized"` (the talk's server, over ZeroMQ)."""

    min_peers: int | None = Field(None, ge=1)  # start once this many are connected (None: all)
    fraction: float = Field(1.0, gt=0.0, le=1.0)  # share of connected peers sampled per round
    min_updates: int = Field(1, ge=1)  # a round closed at its deadline needs this many updates
    round_timeout_s: float = Field(30.0, gt=0.0)  # deadline of a round, from its start
    startup_timeout_s: float = Field(60.0, gt=0.0)  # wait for min_peers before giving up
    weighting: Literal["samples", "uniform"] = "samples"  # FedAvg weights; uniform = the talk
    aggregator: Literal["mean", "median", "trimmed_mean", "krum"] = "mean"  # mean = FedAvg
    trim: int = Field(1, ge=0)  # trimmed_mean: values dropped at each end, per coordinate
    krum_f: int = Field(1, ge=0)  # krum: Byzantine updates it tolerates
    heartbeat_s: float = Field(0.5, gt=0.0, le=60.0)  # both sides send something this often
    peer_timeout_s: float = Field(10.0, gt=0.0)  # a peer silent this long is not sampled
    coordinator_timeout_s: float = Field(10.0, gt=0.0)  # a peer gives up after this silence


class Coordinator(_Section):
    """Where the coordinator listens: control channel at `address`, updates at its port + 1."""

    address: str | None = None  # default: tcp://network.host:(base_port + peers)
    bootstrap: bool = False  # gossip mode: peers learn their neighbours' addresses from it

    @field_validator("address")
    @classmethod
    def _tcp(cls, value: str | None) -> str | None:
        if value is not None:
            check_tcp(value, max_port=65534)
        return value


class Slow(_Section):
    """A straggler: the peer waits `delay_s` before sending each round's model."""

    peer: int = Field(ge=0)
    delay_s: float = Field(gt=0.0, le=3600.0)


Attack = Literal["sign_flip", "scale", "gaussian", "nan", "label_flip", "dissensus"]


class Byzantine(_Section):
    """A Byzantine peer: what it sends (or trains on) is an attack."""

    peer: int = Field(ge=0)
    attack: Attack
    factor: float = Field(-4.0, ge=-1e6, le=1e6)  # scale: it sends factor * its model
    sigma: float = Field(1.0, gt=0.0, le=1e6)  # gaussian: noise added to its model
    # dissensus: 1 cancels its honest neighbours' gossip step, more pushes them apart
    epsilon: float = Field(1.0, gt=0.0, le=1e6)


class Crash(_Section):
    """The peer process dies hard (SIGKILL) when it reaches `at_round`; with
    `rejoin_after_s` the launcher restarts it that long after, from its checkpoint.
    `phase = "after_masking"` (secure aggregation): it dies in the first secure round
    from `at_round` it is sampled in, once its masks are fixed, before its masked input
    goes out (the others must recover its masks)."""

    peer: int = Field(ge=0)
    at_round: int = Field(ge=1)
    rejoin_after_s: float | None = Field(None, ge=0.0, le=3600.0)
    phase: Literal["start", "after_masking"] = "start"


class Faults(_Section):
    """Faults injected on purpose, to test what survives them."""

    slow: list[Slow] = Field(default_factory=list)
    byzantine: list[Byzantine] = Field(default_factory=list)
    crash: list[Crash] = Field(default_factory=list)
    # gossip links, applied per message on send: held this long before it is queued ...
    link_delay_ms: float = Field(0.0, ge=0.0, le=3_600_000.0)
    link_drop: float = Field(0.0, ge=0.0, lt=1.0)  # ... or lost with this probability


class Output(_Section):
    """What a run keeps besides the histories."""

    models: Literal["final", "every_round"] = "final"  # every_round: models/round-<r>/


class Sim(_Section):
    """How `p2pfl simulate` runs the scenario in one process (launch ignores this)."""

    # the nominal wall time of one round: maps rejoin_after_s onto rounds
    round_s: float = Field(1.0, gt=0.0)
    chunk: int = Field(1024, ge=1)  # peers trained / evaluated per batched call: flat memory
    # gossip: evaluate every peer every this many rounds (and always the last); the lines
    # of other rounds carry no accuracy. Evaluating 1,000s of peers on the holdout each
    # round costs more than training them.
    eval_every: int = Field(1, ge=1)


class Privacy(_Section):
    """Differential privacy of what a peer releases, with ε accounted every round.

    `mechanism = "dp_sgd"` (sample-level, inside local training): per-example gradients
    clipped to `clip`, N(0, (noise_multiplier · clip)²) on each step's sum, Poisson
    sampling at rate batch_size / n_local; the ε protects each training record.
    `mechanism = "update"` (participant-level, local DP): each peer clips its round's
    update (trained model minus the model it started from) to `clip` in L2 and adds
    N(0, (noise_multiplier · clip)²) before it keeps and sends it; in gossip every
    round is a release, in centralized mode every round the peer is sampled in.
    `where = "server"` (centralized only: central DP) instead has the server clip each
    update and noise their sum, sampling each peer with probability
    `centralized.fraction` (Poisson) so the sampling amplifies privacy. ε at
    `delta` (default 1e-5, or 1/peers² when smaller) is accounted with `accountant`
    (RDP or PLD, dp-accounting). `target_epsilon` calibrates the noise multiplier
    for the scenario's rounds before anything runs (then leave noise_multiplier out).
    """

    mechanism: Literal["none", "dp_sgd", "update"] = "none"
    clip: float = Field(1.0, gt=0.0)
    noise_multiplier: float | None = Field(None, gt=0.0, le=1e4)  # default 1.0 (no target)
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    target_epsilon: float | None = Field(None, gt=0.0)
    accountant: Literal["rdp", "pld"] = "rdp"
    where: Literal["peer", "server"] = "peer"
    # centralized only: pairwise-masked updates, of which the server unmasks only the sum
    secure_aggregation: bool = False
    # ... each coordinate of an update (model after training minus the global model) is
    # clipped to ±secagg_range before it is quantised (clipped values are reported)
    secagg_range: float = Field(1.0, gt=0.0, le=1e6)

    def resolved_delta(self, peers: int) -> float:
        """`delta`, or the default: 1e-5 capped at 1/peers² (a peer is the unit)."""
        return self.delta if self.delta is not None else min(1e-5, 1.0 / peers**2)


class Security(_Section):
    """CurveZMQ on every socket: encrypted, and each message bound to its sender's key.

    `keys` is a folder made by `p2pfl keys` (relative to the scenario file; a host
    needs its `public/` and its own secret file), or "auto": `p2pfl launch` / `compare`
    make fresh keys in the run folder's `keys/` for a local run. Unset: in clear,
    which `p2pfl peer` / `coordinator` refuse on a non-loopback address unless
    `--insecure`.
    """

    keys: str | None = Field(None, min_length=1)


class Network(_Section):
    """Where peers listen: `host` and `base_port + id`, or one address per peer."""

    host: str = "127.0.0.1"
    base_port: int = Field(27000, ge=1024, le=65000)  # below the usual ephemeral range
    addresses: list[str] | None = None

    @field_validator("addresses")
    @classmethod
    def _tcp(cls, value: list[str] | None) -> list[str] | None:
        for addr in value or []:
            check_tcp(addr)
        if value is not None and len(set(value)) != len(value):
            raise ValueError("two peers cannot share one address")
        return value


class Scenario(_Section):
    """One experiment: everything a peer or the launcher needs to know."""

    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, lt=2**31)  # JAX PRNG and numpy seeds both take it
    mode: Literal["gossip", "centralized"] = "gossip"
    topology: Topology = Field(default_factory=Topology)
    data: Data = Field(default_factory=Data)
    model: Model = Field(default_factory=Model)
    training: Training = Field(default_factory=Training)
    gossip: Gossip = Field(default_factory=Gossip)
    network: Network = Field(default_factory=Network)
    centralized: Centralized = Field(default_factory=Centralized)
    coordinator: Coordinator = Field(default_factory=Coordinator)
    faults: Faults = Field(default_factory=Faults)
    output: Output = Field(default_factory=Output)
    sim: Sim = Field(default_factory=Sim)
    privacy: Privacy = Field(default_factory=Privacy)
    security: Security = Field(default_factory=Security)
    base_dir: str = Field(".", exclude=True)

    @property
    def peers(self) -> int:
        """Number of peers in the scenario."""
        return self.topology.peers

    def address(self, peer_id: int) -> str:
        """The ZeroMQ endpoint peer `peer_id` binds and its neighbours connect to."""
        if self.network.addresses is not None:
            return self.network.addresses[peer_id]
        return f"tcp://{self.network.host}:{self.network.base_port + peer_id}"

    @property
    def needs_coordinator(self) -> bool:
        """Centralized runs need the server; gossip runs only when they bootstrap from it."""
        return self.mode == "centralized" or self.coordinator.bootstrap

    @property
    def min_peers(self) -> int:
        """Peers the server waits for before round 1 (all of them unless set)."""
        return self.centralized.min_peers or self.peers

    def coordinator_addresses(self) -> tuple[str, str]:
        """(control, updates) endpoints of the coordinator."""
        control = self.coordinator.address or (
            f"tcp://{self.network.host}:{self.network.base_port + self.peers}"
        )
        host, _, port = control.rpartition(":")
        return control, f"{host}:{int(port) + 1}"

    def slow_delay(self, peer_id: int) -> float:
        """Seconds peer `peer_id` holds back each model (0 unless it is a straggler)."""
        return sum(f.delay_s for f in self.faults.slow if f.peer == peer_id)

    def byzantine(self, peer_id: int) -> Byzantine | None:
        """The attack peer `peer_id` carries out, if it is Byzantine."""
        return next((f for f in self.faults.byzantine if f.peer == peer_id), None)

    def crash_after_masking(self, peer_id: int) -> bool:
        """Whether peer `peer_id`'s injected crash comes after its masks are fixed."""
        return any(f.peer == peer_id and f.phase == "after_masking" for f in self.faults.crash)

    def crash_round(self, peer_id: int) -> int | None:
        """The round at which peer `peer_id` is killed, if any."""
        return next((f.at_round for f in self.faults.crash if f.peer == peer_id), None)

    def rejoin_after(self, peer_id: int) -> float | None:
        """Seconds after its injected crash that peer `peer_id` is restarted, if it is."""
        return next((f.rejoin_after_s for f in self.faults.crash if f.peer == peer_id), None)

    def resolve(self, path: str) -> Path:
        """A path from the file, taken relative to the scenario file's folder."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def digest(self) -> str:
        """A short hash of the settings; peers drop messages from other scenarios.

        `[security]` is left out: where a host keeps its keys is not the experiment
        (and a run with keys cannot talk to one without them anyway).
        """
        text = json.dumps(self.model_dump(mode="json", exclude={"security"}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def dumps(raw: dict[str, Any]) -> str:
    """TOML text for a scenario mapping (top-level keys and one level of sections).

    `None` values are left out (TOML has no null; the field then takes its default).
    """

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):  # an inline table, as in faults.slow
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    def lines(d: dict[str, Any]) -> list[str]:
        return [
            f"{k} = {value(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict)
        ]

    sections = [f"[{k}]\n" + "\n".join(lines(v)) for k, v in raw.items() if isinstance(v, dict)]
    return "\n".join(lines(raw)) + "\n\n" + "\n\n".join(sections) + "\n"
