"""CurveZMQ keys and the sender check, in-process: key files, keyrings, the one place a
header's sender is bound to a key, the refusal to run in clear on a reachable address."""

from __future__ import annotations

import stat

import numpy as np
import pytest
from structlog.testing import capture_logs

from p2pfl.config.keys import check_keys
from p2pfl.config.loader import parse
from p2pfl.config.plan import gossip_plan, server_plan
from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.net import keys
from p2pfl.protocol import wire
from p2pfl.protocol.addresses import is_loopback
from p2pfl.protocol.events import Malformed, Received
from p2pfl.runtime.node import decode
from p2pfl.runtime.roles import refuse_clear

PEERS = 4
EXPECT = wire.Expect("s", PEERS, {"params": (3,)})
PARAMS = {"params": np.ones(3, np.float32)}


@pytest.fixture
def folder(tmp_path):
    """A keys folder for 4 peers and the coordinator."""
    keys.create(tmp_path / "keys", PEERS)
    return tmp_path / "keys"


def test_create_writes_the_layout_with_private_modes(folder):
    for node, name in [(0, "peer-0"), (3, "peer-3"), (PEERS, "coordinator")]:
        assert keys.public_path(folder, node, PEERS) == folder / "public" / f"{name}.key"
        assert keys.secret_path(folder, node, PEERS).is_file()
        assert stat.S_IMODE(keys.secret_path(folder, node, PEERS).stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "private").stat().st_mode) == 0o700
    assert len(list((folder / "public").iterdir())) == PEERS + 1
    assert len(list((folder / "private").iterdir())) == PEERS + 1
    # the public folder holds no secret
    assert all("secret-key" not in p.read_text() for p in (folder / "public").iterdir())


def test_create_refuses_to_overwrite_without_force(folder):
    before = keys.read_public(keys.public_path(folder, 0, PEERS))
    with pytest.raises(FileExistsError, match="--force"):
        keys.create(folder, PEERS)
    assert keys.read_public(keys.public_path(folder, 0, PEERS)) == before
    keys.create(folder, PEERS, force=True)
    assert keys.read_public(keys.public_path(folder, 0, PEERS)) != before


def test_keyring_holds_own_pair_and_only_the_keys_asked_for(folder):
    ring = keys.keyring(folder, 1, PEERS, [0, 2, PEERS])
    assert set(ring.known) == {0, 2, PEERS}
    assert ring.known[0] == keys.read_public(keys.public_path(folder, 0, PEERS))
    assert ring.public == keys.read_public(keys.public_path(folder, 1, PEERS))
    assert ring.secret.decode() not in repr(ring)
    with pytest.raises(keys.KeyFileError, match="node 3"):
        ring.server_key(3)


def test_a_host_needs_only_public_keys_and_its_own_secret(folder, tmp_path):
    host = tmp_path / "host-2"
    (host / "public").mkdir(parents=True)
    (host / "private").mkdir(mode=0o700)
    for p in (folder / "public").iterdir():
        (host / "public" / p.name).write_bytes(p.read_bytes())
    secret = keys.secret_path(folder, 2, PEERS)
    mine = keys.secret_path(host, 2, PEERS)
    mine.write_bytes(secret.read_bytes())
    mine.chmod(0o600)
    assert keys.keyring(host, 2, PEERS, [1, 3]).known[1] == keys.read_public(
        keys.public_path(folder, 1, PEERS)
    )
    with pytest.raises(keys.KeyFileError, match=r"peer-1\.key_secret: key file does not exist"):
        keys.keyring(host, 1, PEERS, [0])


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing_public", r"public/peer-0\.key: key file does not exist"),
        ("garbage_public", r"public/peer-0\.key: no public key in it"),
        ("binary_public", r"public/peer-0\.key: not a ZeroMQ key file"),
        ("open_secret", r"peer-1\.key_secret: secret key file is readable by others \(mode 0644\)"),
        ("foreign_secret", r"public/peer-1\.key: does not match"),
        ("torn_secret", r"peer-1\.key_secret: the secret key does not belong"),
        ("missing_secret", r"peer-1\.key_secret: key file does not exist"),
    ],
)
def test_bad_key_files_are_refused_naming_the_file(folder, damage, match):
    public0 = keys.public_path(folder, 0, PEERS)
    secret1 = keys.secret_path(folder, 1, PEERS)
    if damage == "missing_public":
        public0.unlink()
    elif damage == "garbage_public":
        public0.write_text('metadata\ncurve\n    public-key = "short"\n')
    elif damage == "binary_public":
        public0.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "open_secret":
        secret1.chmod(0o644)
    elif damage == "foreign_secret":  # peer 2's secret file copied in as peer 1's
        secret1.write_bytes(keys.secret_path(folder, 2, PEERS).read_bytes())
    elif damage == "torn_secret":  # its public line replaced by another key's
        other = keys.read_public(keys.public_path(folder, 2, PEERS)).decode()
        text = secret1.read_text()
        mine = keys.read_public(keys.public_path(folder, 1, PEERS)).decode()
        secret1.write_text(text.replace(mine, other))
    elif damage == "missing_secret":
        secret1.unlink()
    with pytest.raises(keys.KeyFileError, match=match):
        keys.keyring(folder, 1, PEERS, [0, 2])


def test_scenario_keys_resolve_relative_to_the_file_and_errors_name_the_field(folder, tmp_path):
    raw = {"topology": {"kind": "ring", "peers": PEERS}, "security": {"keys": "keys"}}
    s = parse(raw, base_dir=str(tmp_path))
    plan = gossip_plan(s, 0, tmp_path / "run")
    assert plan.keys is not None and set(plan.keys.known) == {1, 3}
    assert plan.run.keys == folder
    server = server_plan(parse({**raw, "mode": "centralized"}, str(tmp_path)), tmp_path)
    assert server.keys is not None and set(server.keys.known) == set(range(PEERS))
    keys.public_path(folder, 3, PEERS).unlink()
    with pytest.raises(ScenarioError, match=r"security.keys = 'keys': .*peer-3\.key: key file"):
        check_keys(s, tmp_path / "run")
    assert gossip_plan(s, 1, tmp_path / "run").keys is not None  # peer 1 never needs 3's key
    auto = parse({**raw, "security": {"keys": "auto"}}, base_dir=str(tmp_path))
    with pytest.raises(ScenarioError, match=r"run/keys/private/peer-0\.key_secret"):
        gossip_plan(auto, 0, tmp_path / "run")


def test_security_is_not_part_of_the_scenario_hash():
    plain = Scenario()
    secured = parse({"security": {"keys": "somewhere"}})
    assert plain.digest() == secured.digest()
    with pytest.raises(ScenarioError, match=r"security\.keys"):
        parse({"security": {"keys": ""}})
    with pytest.raises(ScenarioError, match=r"security\.key"):
        parse({"security": {"key": "x"}})


def frames(type_: str, sender: int) -> list[bytes]:
    arrays = PARAMS if type_ == "model" else None
    meta = {"degree": 2, "samples": 10} if type_ == "model" else {}
    return [bytes(f) for f in wire.encode(type_, sender, 1, "s", meta, arrays)]


@pytest.mark.parametrize("type_", ["model", "heartbeat", "bye", "hello"])
def test_the_header_sender_must_be_the_keys_node(type_):
    ok = decode(frames(type_, 2), EXPECT, None, authenticated=2)
    assert isinstance(ok, Received) and ok.authenticated == 2 and ok.msg.sender == 2
    bad = decode(frames(type_, 7 % PEERS), EXPECT, b"conn", authenticated=2)
    assert isinstance(bad, Malformed)
    assert bad.reason.startswith("sender mismatch: the header claims 3")
    assert "the key of node 2" in bad.reason
    assert bad.sender is None and bad.round is None and bad.origin == b"conn"  # no weight
    clear = decode(frames(type_, 3), EXPECT)
    assert isinstance(clear, Received) and clear.authenticated is None


def test_a_message_without_a_vouched_key_matches_no_sender():
    bad = decode(frames("model", 0), EXPECT, None, authenticated=-1)
    assert isinstance(bad, Malformed) and "no allowed key" in bad.reason


def test_a_malformed_message_under_someone_elses_name_is_a_mismatch():
    nan = {"params": np.full(3, np.nan, np.float32)}
    raw = wire.encode("model", 1, 1, "s", {"degree": 2, "samples": 1}, nan)
    got = decode(raw, EXPECT, None, authenticated=2)
    assert isinstance(got, Malformed) and got.reason.startswith("sender mismatch")
    own = decode(raw, EXPECT, None, authenticated=1)
    assert isinstance(own, Malformed) and "NaN" in own.reason and own.sender == 1


@pytest.mark.parametrize(
    "addr, loopback",
    [
        ("tcp://127.0.0.1:1", True),
        ("tcp://127.0.0.3:1", True),
        ("tcp://localhost:1", True),
        ("tcp://10.0.0.1:1", False),
        ("tcp://0.0.0.0:1", False),
        ("tcp://*:1", False),
        ("tcp://hospital-a.example:1", False),
    ],
)
def test_loopback(addr, loopback):
    assert is_loopback(addr) is loopback


def test_clear_text_on_a_reachable_address_needs_insecure():
    s = Scenario()
    refuse_clear(s, ["tcp://127.0.0.1:27000"], insecure=False)  # loopback: fine
    with pytest.raises(ScenarioError, match=r"tcp://10\.1\.2\.3:5: not a loopback.*p2pfl keys"):
        refuse_clear(s, ["tcp://127.0.0.1:1", "tcp://10.1.2.3:5"], insecure=False)
    with capture_logs() as logs:
        refuse_clear(s, ["tcp://10.1.2.3:5"], insecure=True)
    assert [e["event"] for e in logs] == ["insecure"] and logs[0]["addresses"] == [
        "tcp://10.1.2.3:5"
    ]
    secured = parse({"security": {"keys": "k"}})
    with capture_logs() as logs:
        refuse_clear(secured, ["tcp://10.1.2.3:5"], insecure=False)
    assert logs == []
