"""Scenario validation: bad files exit with code 2 and name the field; good ones load."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from p2pfl.app.cli import main
from p2pfl.config.loader import load, parse
from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.core.graphs import build_graph

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))

SECAGG = "[privacy]\nsecure_aggregation = true\n"

# (id, TOML text, fragments the error message must contain)
BAD = [
    ("unknown top-level field", 'nmae = "x"\n', ["nmae", "unknown field"]),
    ("unknown section field", "[topology]\npeer = 8\n", ["topology.peer", "unknown field"]),
    ("unknown section", "[trainning]\nrounds = 3\n", ["trainning", "unknown field"]),
    (
        "unknown topology kind",
        '[topology]\nkind = "hexagon"\n',
        ["topology.kind", "hexagon", "ring"],
    ),
    ("unknown dataset", '[data]\ndataset = "cifar"\n', ["data.dataset", "cifar", "digits"]),
    ("unknown partition", '[data]\npartition = "skewed"\n', ["data.partition", "skewed"]),
    ("unknown model kind", '[model]\nkind = "resnet"\n', ["model.kind", "resnet"]),
    ("unknown optimizer", '[training]\noptimizer = "lbfgs"\n', ["training.optimizer", "lbfgs"]),
    ("unknown mixing", '[gossip]\nmixing = "maxdegree"\n', ["gossip.mixing", "maxdegree"]),
    ("unknown mode", 'mode = "centralised"\n', ["mode", "centralised"]),
    ("zero fraction", "[centralized]\nfraction = 0\n", ["centralized.fraction", "0"]),
    ("fraction above one", "[centralized]\nfraction = 1.5\n", ["centralized.fraction", "1.5"]),
    ("zero min_peers", "[centralized]\nmin_peers = 0\n", ["centralized.min_peers", "0"]),
    (
        "min_peers above peers",
        "[centralized]\nmin_peers = 9\n",
        ["centralized.min_peers = 9", "8 peers"],
    ),
    (
        "min_updates above min_peers",
        "[centralized]\nmin_peers = 2\nmin_updates = 3\n",
        ["centralized.min_updates = 3", "min_peers = 2"],
    ),
    (
        "heartbeat too slow",
        "[centralized]\nheartbeat_s = 6\n",
        ["centralized.heartbeat_s = 6", "half"],
    ),
    ("unknown weighting", '[centralized]\nweighting = "loss"\n', ["centralized.weighting"]),
    (
        "bad coordinator address",
        '[coordinator]\naddress = "udp://1.2.3.4:9"\n',
        ["coordinator.address", "tcp://HOST:PORT"],
    ),
    (
        "coordinator port without room for updates",
        '[coordinator]\naddress = "tcp://127.0.0.1:65535"\n',
        ["coordinator.address", "65534"],
    ),
    (
        "centralized addresses without coordinator address",
        'mode = "centralized"\n[topology]\npeers = 2\n'
        '[network]\naddresses = ["tcp://10.0.0.1:1", "tcp://10.0.0.2:1"]\n',
        ["coordinator.address is missing", "network.addresses"],
    ),
    (
        "straggler out of range",
        "[faults]\nslow = [{peer = 8, delay_s = 1.0}]\n",
        ["faults.slow", "peer = 8", "0..7"],
    ),
    (
        "straggler without delay",
        "[faults]\nslow = [{peer = 1}]\n",
        ["faults.slow.0.delay_s", "required"],
    ),
    ("unknown output", '[output]\nmodels = "best"\n', ["output.models", "best"]),
    ("one peer", "[topology]\npeers = 1\n", ["topology.peers", "1", "greater than or equal to 2"]),
    ("zero peers", "[topology]\npeers = 0\n", ["topology.peers", "0"]),
    ("negative rounds", "[training]\nrounds = -1\n", ["training.rounds", "-1"]),
    ("negative learning rate", "[training]\nlearning_rate = -0.1\n", ["training.learning_rate"]),
    ("zero local epochs", "[training]\nlocal_epochs = 0\n", ["training.local_epochs", "0"]),
    ("zero batch size", "[training]\nbatch_size = 0\n", ["training.batch_size", "0"]),
    ("fractional rounds", "[training]\nrounds = 2.5\n", ["training.rounds", "2.5"]),
    ("wrong type peers", '[topology]\npeers = "eight"\n', ["topology.peers", "eight"]),
    ("wrong type section", "topology = 3\n", ["topology", "3"]),
    ("wrong type hidden", '[model]\nhidden = "64"\n', ["model.hidden"]),
    ("zero hidden width", "[model]\nhidden = [64, 0]\n", ["model.hidden", "hidden layer width"]),
    ("test fraction one", "[data]\ntest_fraction = 1.0\n", ["data.test_fraction", "1.0"]),
    ("zero alpha", '[data]\npartition = "dirichlet"\nalpha = 0\n', ["data.alpha", "0"]),
    ("zero round timeout", "[gossip]\nround_timeout_s = 0\n", ["gossip.round_timeout_s"]),
    ("bad name", 'name = "my run/1"\n', ["name", "my run/1"]),
    ("low base port", "[network]\nbase_port = 80\n", ["network.base_port", "80"]),
    (
        "disconnected edge list",
        '[topology]\nkind = "edges"\npeers = 4\nedges = [[0, 1], [2, 3]]\n',
        ["topology.edges", "disconnected", "2 parts"],
    ),
    (
        "edge out of range",
        '[topology]\nkind = "edges"\npeers = 4\nedges = [[0, 1], [1, 2], [2, 7]]\n',
        ["topology.edges", "[2, 7]", "0..3"],
    ),
    (
        "self loop edge",
        '[topology]\nkind = "edges"\npeers = 3\nedges = [[0, 1], [1, 1], [1, 2]]\n',
        ["topology.edges", "[1, 1]"],
    ),
    (
        "edge of three ids",
        '[topology]\nkind = "edges"\npeers = 3\nedges = [[0, 1, 2]]\n',
        ["topology.edges"],
    ),
    ("edges kind without edges", '[topology]\nkind = "edges"\npeers = 3\n', ["topology.edges"]),
    (
        "edges and file both",
        '[topology]\nkind = "edges"\npeers = 2\nedges = [[0, 1]]\nfile = "g.edgelist"\n',
        ["topology.edges", "topology.file"],
    ),
    (
        "missing edge-list file",
        '[topology]\nkind = "edges"\npeers = 3\nfile = "nowhere.edgelist"\n',
        ["topology.file", "nowhere.edgelist", "does not exist"],
    ),
    (
        "disconnected line",
        '[topology]\nkind = "regular"\npeers = 4\ndegree = 1\n',
        ["disconnected"],
    ),
    (
        "missing npz file",
        '[data]\ndataset = "npz"\npath = "absent/peer-{id}.npz"\n',
        ["data.path", "absent/peer-{id}.npz", "no npz file"],
    ),
    ("missing holdout file", '[data]\nholdout = "absent.npz"\n', ["data.holdout", "absent.npz"]),
    ("negative seed", "seed = -1\n", ["seed", "-1"]),
    ("seed beyond 31 bits", "seed = 2147483648\n", ["seed", "2147483648"]),
    ("infinite timeout", "[gossip]\nround_timeout_s = inf\n", ["gossip.round_timeout_s", "inf"]),
    ("nan learning rate", "[training]\nlearning_rate = nan\n", ["training.learning_rate"]),
    ("huge alpha", "[data]\nalpha = 1e300\n", ["data.alpha"]),
    ("unknown path placeholder", '[data]\npath = "d/{x}.npz"\n', ["data.path", "{id}"]),
    (
        "duplicate addresses",
        '[topology]\npeers = 2\n[network]\naddresses = ["tcp://a:1", "tcp://a:1"]\n',
        ["network.addresses", "share"],
    ),
    ("npz without classes", '[data]\ndataset = "npz"\npath = "absent/{id}.npz"\n', ["data."]),
    (
        "address without scheme",
        '[topology]\npeers = 2\n[network]\naddresses = ["localhost:5000", "localhost:5001"]\n',
        ["network.addresses", "localhost:5000", "tcp://HOST:PORT"],
    ),
    (
        "address without port",
        '[topology]\npeers = 2\n[network]\naddresses = ["tcp://a", "tcp://b:5001"]\n',
        ["network.addresses", "tcp://a"],
    ),
    (
        "address with a non-numeric port",
        '[topology]\npeers = 2\n[network]\naddresses = ["tcp://a:http", "tcp://b:5001"]\n',
        ["network.addresses", "tcp://a:http"],
    ),
    (
        "address with a port out of range",
        '[topology]\npeers = 2\n[network]\naddresses = ["tcp://a:70000", "tcp://b:5001"]\n',
        ["network.addresses", "tcp://a:70000"],
    ),
    (
        "too few addresses",
        '[topology]\npeers = 3\n[network]\naddresses = ["tcp://a:1", "tcp://b:2"]\n',
        ["network.addresses", "topology.peers = 3"],
    ),
    (
        "base port too high for peers",
        "[topology]\npeers = 600\n[network]\nbase_port = 65000\n",
        ["network.base_port", "65000"],
    ),
    (
        "grid rows not dividing",
        '[topology]\nkind = "grid"\npeers = 8\nrows = 3\n',
        ["topology.rows", "3", "divide"],
    ),
    (
        "torus rows not dividing",
        '[topology]\nkind = "torus"\npeers = 10\nrows = 4\n',
        ["topology.rows", "4"],
    ),
    (
        "regular odd degree on odd peers",
        '[topology]\nkind = "regular"\npeers = 7\ndegree = 3\n',
        ["topology.degree", "3", "even"],
    ),
    (
        "regular degree too large",
        '[topology]\nkind = "regular"\npeers = 4\ndegree = 4\n',
        ["topology.degree", "4"],
    ),
    (
        "small world k too large",
        '[topology]\nkind = "small_world"\npeers = 4\nk = 4\n',
        ["topology.k", "4"],
    ),
    (
        "barabasi m too large",
        '[topology]\nkind = "barabasi_albert"\npeers = 3\nm = 3\n',
        ["topology.m", "3"],
    ),
    ("erdos p zero", '[topology]\nkind = "erdos_renyi"\np = 0.0\n', ["topology.p", "0.0"]),
    (
        "cnn on synthetic",
        '[data]\ndataset = "synthetic"\n[model]\nkind = "cnn"\n',
        ["model.kind", "cnn", "data.dataset", "synthetic"],
    ),
    (
        "more peers than the synthetic data can feed",
        '[topology]\npeers = 8\n[data]\ndataset = "synthetic"\nsynthetic_samples = 10\n',
        ["topology.peers = 8", "synthetic", "8 samples"],
    ),
    ("more peers than digits can feed", "[topology]\npeers = 1000\n", ["topology.peers = 1000"]),
    (
        "more shards than samples",
        '[data]\ndataset = "synthetic"\nsynthetic_samples = 100\npartition = "shards"\n'
        "shards_per_peer = 20\n",
        ["topology.peers = 8", "'shards'", "160"],
    ),
    (
        "secure aggregation in gossip",
        SECAGG,
        ["privacy.secure_aggregation", "mode = 'gossip'"],
    ),
    (
        "secure aggregation with 2 sampled peers",
        'mode = "centralized"\n[centralized]\nfraction = 0.25\n' + SECAGG,
        ["privacy.secure_aggregation", "2 peers sampled", "fraction = 0.25"],
    ),
    (
        "secure aggregation with a robust aggregator",
        'mode = "centralized"\n[centralized]\naggregator = "median"\n' + SECAGG,
        ["privacy.secure_aggregation", "centralized.aggregator = 'median'"],
    ),
    (
        "secure aggregation with central DP",
        'mode = "centralized"\n' + SECAGG + 'mechanism = "update"\nwhere = "server"\n',
        ["privacy.secure_aggregation", "where = 'server'"],
    ),
    (
        "secure aggregation range not positive",
        'mode = "centralized"\n' + SECAGG + "secagg_range = 0.0\n",
        ["privacy.secagg_range", "0.0"],
    ),
    (
        "crash after masking without secure aggregation",
        'mode = "centralized"\n[[faults.crash]]\npeer = 1\nat_round = 2\nphase = "after_masking"\n',
        ["faults.crash phase = 'after_masking'", "privacy.secure_aggregation"],
    ),
    ("invalid TOML", "[topology\npeers = 8\n", ["not valid TOML"]),
    ("duplicate key", "[topology]\npeers = 8\npeers = 9\n", ["not valid TOML"]),
]


def _run_topology(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["topology", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("text", "fragments"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_scenario_exits_2_naming_the_field(tmp_path, capsys, text, fragments):
    """Each bad scenario file makes the CLI exit 2 with a message naming the field and value."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, err = _run_topology(path, capsys)
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} missing from: {err}"


@pytest.mark.parametrize(("text", "fragments"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_scenario_raises_scenario_error(tmp_path, text, fragments):
    """load() itself raises ScenarioError (not a bare pydantic or TOML error) for each bad file."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load(path)
    assert fragments[0] in str(info.value)


def test_missing_scenario_file_exits_2(tmp_path, capsys):
    """A scenario path that does not exist exits 2 and names the path."""
    missing = tmp_path / "nope.toml"
    code, err = _run_topology(missing, capsys)
    assert code == 2
    assert "nope.toml" in err and "does not exist" in err


def test_launch_validates_before_anything_starts(tmp_path, capsys):
    """`p2pfl launch` on a bad file exits 2 naming the field, and creates no run folder."""
    path = tmp_path / "bad.toml"
    path.write_text("[topology]\npeers = 1\n")
    out = tmp_path / "run"
    code = main(["launch", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "topology.peers" in err
    assert not out.exists()


def test_compare_validates_both_modes_before_either_runs(tmp_path, capsys):
    """Secure aggregation is centralized-only: `p2pfl compare` refuses it (exit 2, the
    field named) before the centralized run starts, not after it finished."""
    path = tmp_path / "secure.toml"
    path.write_text('mode = "centralized"\n' + SECAGG)
    out = tmp_path / "both"
    code = main(["compare", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "privacy.secure_aggregation" in err and "mode = 'gossip'" in err
    assert not out.exists()


def test_unknown_field_lists_every_error(tmp_path):
    """Several bad fields in one file are all reported, not only the first."""
    path = tmp_path / "bad.toml"
    path.write_text("[topology]\npeers = 1\ncolour = 1\n[training]\nrounds = -3\n")
    with pytest.raises(ScenarioError) as info:
        load(path)
    message = str(info.value)
    assert "topology.peers" in message
    assert "topology.colour" in message
    assert "training.rounds" in message


def test_default_scenario_is_valid():
    """The built-in defaults form a runnable scenario (connected ring of 8, digits, MLP)."""
    s = Scenario()
    assert s.peers == 8
    assert s.topology.kind == "ring"
    assert s.mode == "gossip"
    g = build_graph(s.topology, s.seed, s.base_dir)
    assert g.number_of_nodes() == 8
    assert parse({}) == s


def test_default_addresses_are_distinct_ports():
    """Without explicit addresses each peer listens on base_port + id."""
    s = Scenario()
    addresses = [s.address(i) for i in range(s.peers)]
    assert addresses[0] == "tcp://127.0.0.1:27000"
    assert len(set(addresses)) == s.peers


def test_explicit_addresses_are_used(tmp_path):
    """Per-peer addresses from the file override host and base_port."""
    path = tmp_path / "hosts.toml"
    path.write_text(
        '[topology]\npeers = 2\n[network]\naddresses = ["tcp://10.0.0.1:5000", "tcp://h2:5001"]\n'
    )
    s = load(path)
    assert s.address(0) == "tcp://10.0.0.1:5000"
    assert s.address(1) == "tcp://h2:5001"


def test_zero_rounds_and_zero_learning_rate_are_allowed():
    """rounds = 0 and learning_rate = 0 are valid (pure averaging runs use them)."""
    s = parse({"training": {"rounds": 0, "learning_rate": 0}})
    assert s.training.rounds == 0
    assert s.training.learning_rate == 0.0


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_load(path):
    """Every scenario shipped in scenarios/ validates and yields a connected graph."""
    s = load(path)
    assert s.peers >= 2
    g = build_graph(s.topology, s.seed, s.base_dir)
    assert g.number_of_nodes() == s.peers


def test_quickstart_is_the_documented_default():
    """scenarios/quickstart.toml is 8 peers on a ring learning digits with an MLP."""
    s = load(ROOT / "scenarios" / "quickstart.toml")
    assert (s.peers, s.topology.kind, s.data.dataset, s.model.kind) == (8, "ring", "digits", "mlp")


def test_npz_dataset_with_files_present(tmp_path):
    """A per-peer npz dataset validates when every peer's file exists, relative to the file."""
    (tmp_path / "data").mkdir()
    for i in range(3):
        np.savez(tmp_path / "data" / f"peer-{i}.npz", x=np.zeros((4, 2)), y=np.zeros(4, dtype=int))
    path = tmp_path / "npz.toml"
    path.write_text('[topology]\npeers = 3\n[data]\ndataset = "npz"\nclasses = 2\n')
    s = load(path)
    assert s.resolve(s.data.path.format(id=2)).is_file()


def test_npz_peer_checks_only_its_own_file(tmp_path):
    """On a real host a peer needs only its own npz file; others may be absent."""
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "peer-1.npz", x=np.zeros((4, 2)), y=np.zeros(4, dtype=int))
    path = tmp_path / "npz.toml"
    path.write_text('[topology]\npeers = 3\n[data]\ndataset = "npz"\nclasses = 2\n')
    assert load(path, peer=1).peers == 3
    with pytest.raises(ScenarioError, match=r"data\.path"):
        load(path, peer=0)
    with pytest.raises(ScenarioError, match=r"data\.path"):
        load(path)


def test_edge_list_file_relative_to_scenario(tmp_path):
    """topology.file is read relative to the scenario's folder."""
    (tmp_path / "g.edgelist").write_text("0 1\n1 2\n2 0\n")
    path = tmp_path / "edges.toml"
    path.write_text('[topology]\nkind = "edges"\npeers = 3\nfile = "g.edgelist"\n')
    s = load(path)
    assert sorted(build_graph(s.topology, s.seed, s.base_dir).edges()) == [(0, 1), (0, 2), (1, 2)]


def test_edge_list_file_with_garbage(tmp_path, capsys):
    """A non-integer edge-list file exits 2 naming topology.file."""
    (tmp_path / "g.edgelist").write_text("a b\n")
    path = tmp_path / "edges.toml"
    path.write_text('[topology]\nkind = "edges"\npeers = 3\nfile = "g.edgelist"\n')
    code, err = _run_topology(path, capsys)
    assert code == 2
    assert "topology.file" in err


def test_random_graph_validated_with_the_scenario_seed():
    """Connectivity of a random graph is judged on the graph the peers will build (its seed)."""
    raw = {"topology": {"kind": "erdos_renyi", "peers": 10, "p": 0.25}}
    # With these parameters seed 0 draws a disconnected graph and seed 1 a connected one.
    with pytest.raises(ScenarioError, match="disconnected"):
        parse({**raw, "seed": 0})
    s = parse({**raw, "seed": 1})
    assert build_graph(s.topology, s.seed, s.base_dir).number_of_nodes() == 10


def test_digest_changes_with_settings():
    """The scenario hash differs when a setting differs and is stable otherwise."""
    a, b = Scenario(), parse({"training": {"rounds": 41}})
    assert a.digest() == Scenario().digest()
    assert a.digest() != b.digest()


def test_shipped_scenarios_are_toml_without_unknown_sections():
    """Every shipped scenario uses only the known sections (a cheap guard on the schema)."""
    known = set(Scenario.model_fields)
    for path in SCENARIOS:
        assert set(tomllib.loads(path.read_text())) <= known, path


def test_npz_labels_must_fit_data_classes(tmp_path):
    """An npz file with a label >= data.classes is refused: peers would build other models."""
    (tmp_path / "data").mkdir()
    for i in range(2):
        np.savez(tmp_path / "data" / f"peer-{i}.npz", x=np.zeros((4, 2)), y=np.arange(4) * i)
    path = tmp_path / "npz.toml"
    path.write_text('[topology]\npeers = 2\n[data]\ndataset = "npz"\nclasses = 2\n')
    with pytest.raises(ScenarioError, match=r"data\.path.*peer-1\.npz.*labels outside 0\.\.1"):
        load(path)
    assert load(path, peer=0).data.classes == 2


def test_dumps_round_trips_every_scenario(tmp_path):
    """`scenario.dumps` writes TOML that loads back to the same scenario (None fields omitted)."""
    from p2pfl.config.schema import dumps

    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        original = load(path)
        raw = original.model_dump(mode="json")
        copy = tmp_path / path.name
        copy.write_text(dumps(raw))
        assert load(copy).model_dump() == original.model_dump(), path.name
