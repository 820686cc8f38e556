"""The scenario file: schema, defaults and validation with errors that name the field.

A scenario is a TOML file describing one whole experiment. It is parsed into frozen
pydantic models (unknown fields are errors), then checked across fields (the graph is
connected, edge ids are in range, npz files exist). `load` raises `ScenarioError`,
whose message names the field, the value and what is allowed; the CLI turns it into
exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import string
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Topology(_Section):
    """Which graph the peers form; only the fields of the chosen kind are used."""

    kind: TopologyKind = "ring"
    peers: int = Field(8, ge=2, le=1024)
    degree: int = Field(4, ge=1)
    p: float = Field(0.3, gt=0.0, le=1.0)
    k: int = Field(4, ge=2)
    m: int = Field(2, ge=1)
    rows: int | None = Field(None, ge=1)
    edges: list[tuple[int, int]] | None = None
    file: str | None = None


class Data(_Section):
    """Dataset, how it is split among peers, and the common holdout set."""

    dataset: Literal["digits", "mnist5k", "synthetic", "npz"] = "digits"
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
    classes: int | None = Field(None, ge=2)  # npz: the label count every peer's model has

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

    kind: Literal["logreg", "mlp", "cnn"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64])
    init: Literal["shared", "per_peer"] = "shared"

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
    gone_after_rounds: int = Field(3, ge=1)


class Network(_Section):
    """Where peers listen: `host` and `base_port + id`, or one address per peer."""

    host: str = "127.0.0.1"
    base_port: int = Field(47000, ge=1024, le=65000)
    addresses: list[str] | None = None

    @field_validator("addresses")
    @classmethod
    def _tcp(cls, value: list[str] | None) -> list[str] | None:
        for addr in value or []:
            host, _, port = addr.removeprefix("tcp://").rpartition(":")
            if (
                not addr.startswith("tcp://")
                or not host
                or not port.isdigit()
                or not 1 <= int(port) <= 65535
            ):
                raise ValueError(
                    f"address {addr!r} must look like tcp://HOST:PORT with PORT in 1..65535"
                )
            if host.startswith("["):
                raise ValueError(f"address {addr!r}: IPv6 is not supported yet")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("two peers cannot share one address")
        return value


class Scenario(_Section):
    """One experiment: everything a peer or the launcher needs to know."""

    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, lt=2**31)  # JAX PRNG and numpy seeds both take it
    mode: Literal["gossip"] = "gossip"
    topology: Topology = Field(default_factory=Topology)
    data: Data = Field(default_factory=Data)
    model: Model = Field(default_factory=Model)
    training: Training = Field(default_factory=Training)
    gossip: Gossip = Field(default_factory=Gossip)
    network: Network = Field(default_factory=Network)
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

    def resolve(self, path: str) -> Path:
        """A path from the file, taken relative to the scenario file's folder."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def digest(self) -> str:
        """A short hash of the settings; peers drop messages from other scenarios."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
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
        return repr(v)

    def lines(d: dict[str, Any]) -> list[str]:
        return [
            f"{k} = {value(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict)
        ]

    sections = [f"[{k}]\n" + "\n".join(lines(v)) for k, v in raw.items() if isinstance(v, dict)]
    return "\n".join(lines(raw)) + "\n\n" + "\n\n".join(sections) + "\n"


def _format_error(err: dict[str, Any]) -> str:
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


def load(path: str | Path, peer: int | None = None) -> Scenario:
    """Read and validate a scenario file; raises ScenarioError naming what is wrong."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"scenario file {str(p)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    return parse(raw, base_dir=str(p.parent), peer=peer)


def _check_cross_fields(s: Scenario, peer: int | None) -> None:
    # Local import: topology imports this module for the Scenario type.
    from p2pfl.topology import build_graph

    n = s.topology.peers
    if s.network.addresses is not None and len(s.network.addresses) != n:
        raise ScenarioError(
            f"network.addresses has {len(s.network.addresses)} entries: "
            f"one per peer is needed (topology.peers = {n})"
        )
    if s.network.addresses is None and s.network.base_port + n > 65535:
        raise ScenarioError(f"network.base_port = {s.network.base_port}: too high for {n} peers")
    build_graph(s.topology, s.seed, s.base_dir)  # the very graph the peers will build
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
    if s.data.holdout is not None and not s.resolve(s.data.holdout).is_file():
        raise ScenarioError(f"data.holdout = {s.data.holdout!r}: file does not exist")
    if s.model.kind == "cnn" and s.data.dataset not in ("digits", "mnist5k"):
        raise ScenarioError(
            f"model.kind = 'cnn' needs image data: data.dataset = {s.data.dataset!r} "
            "(allowed: 'digits', 'mnist5k')"
        )


def _check_npz(s: Scenario, ids: range | list[int]) -> None:
    """Local files must agree with the scenario, or peers would build different models."""
    from p2pfl.learning import datasets

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


_DATASET_SIZES = {"digits": 1797, "mnist5k": 5000}  # samples in the bundled datasets


def _check_pool(s: Scenario) -> None:
    """Every peer's shard must hold at least two samples (one to train, one to test)."""
    from p2pfl.learning.partition import min_pool, pool_size

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
