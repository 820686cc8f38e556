"""CurveZMQ over real sockets on loopback: who gets in, who is refused, what a run does
under attack, and the CLI around keys."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import free_base_port, read_jsonl, to_toml
from structlog.testing import capture_logs

from p2pfl.config.loader import load
from p2pfl.net import keys
from p2pfl.net.transport import Hub, Link, Transport
from p2pfl.protocol import wire
from p2pfl.protocol.events import Malformed, Received
from p2pfl.protocol.fedavg_server import FedAvgServer, ServerConfig
from p2pfl.runtime.node import decode

pytestmark = pytest.mark.slow  # real sockets and processes

PEERS = 8
MAX_FRAMES = 4
EXPECT = wire.Expect("s", PEERS, {"params": (3,)})
PARAMS = {"params": np.ones(3, np.float32)}


@pytest.fixture
def folder(tmp_path):
    keys.create(tmp_path / "keys", PEERS)
    return tmp_path / "keys"


@pytest.fixture
def closing():
    """Transports, links and hubs made by a test; closed at teardown, pass or fail."""
    made: list = []
    yield made.append
    for t in reversed(made):
        with contextlib.suppress(Exception):
            t.close(0) if isinstance(t, Transport) else t.close()


def addr(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def msg(type_: str, sender: int, round_: int = 1, scenario: str = "s") -> list[bytes]:
    model = type_ in ("model", "update")
    meta = {"model": {"degree": 2, "samples": 10}, "update": {"samples": 10, "loss": 0.5}}
    return [
        bytes(f)
        for f in wire.encode(
            type_, sender, round_, scenario, meta.get(type_, {}), PARAMS if model else None
        )
    ]


def received(port, timeout: float = 1.0) -> list:
    """Everything the port's transport hands over within `timeout` of the last message."""
    out = []
    while (env := port.recv(timeout)) is not None:
        out.append(env)
    return out


def intruder(me: int, server: int, server_key: bytes, tmp_path: Path) -> keys.Keyring:
    """A keypair nobody allowed, claiming to be node `me`, knowing the server's public key."""
    keys.create(tmp_path / f"fake-{me}", PEERS, force=True)
    fake = keys.keyring(tmp_path / f"fake-{me}", me, PEERS, [])
    return keys.Keyring(me, fake.public, fake.secret, {server: server_key})


def test_only_allowed_keys_reach_the_inbox_and_each_is_vouched_for(folder, tmp_path, closing):
    """Peer 0 (neighbours 1, 7) hears its neighbours, vouched for by key; a fresh keypair
    claiming to be neighbour 1, and a client with no CURVE at all, send models,
    heartbeats and byes: none reaches the receiver; the real neighbour still does."""
    port = free_base_port(1)
    ring0 = keys.keyring(folder, 0, PEERS, [1, 7])
    peer0 = Transport(addr(port), {}, MAX_FRAMES, ring0)
    closing(peer0)
    assert peer0._sockets.allow is not None
    with capture_logs() as logs:
        fake = Transport(
            addr(port + 100), {0: addr(port)}, MAX_FRAMES, intruder(1, 0, ring0.public, tmp_path)
        )
        clear = Transport(addr(port + 101), {0: addr(port)}, MAX_FRAMES)
        closing(fake)
        closing(clear)
        for t in (fake, clear):
            for type_ in ("model", "heartbeat", "bye"):
                t.send(0, msg(type_, 1))
        assert received(peer0, 1.5) == []
    refused = [e for e in logs if e["event"] == "message_dropped"]
    assert [e["reason"] for e in refused] == ["key not allowed"]  # once per key, not per try
    assert peer0._sockets.allow.refused >= 1
    real = Transport(
        addr(port + 102), {0: addr(port)}, MAX_FRAMES, keys.keyring(folder, 1, PEERS, [0])
    )
    closing(real)
    real.send(0, msg("model", 1))
    [env] = received(peer0, 2.0)
    assert env.authenticated == 1
    event = decode(env.frames, EXPECT, env.origin, env.authenticated)
    assert isinstance(event, Received) and event.msg.type == "model"


def test_a_valid_neighbour_key_cannot_speak_for_another_peer(folder, closing):
    """Neighbour 2's own key with a header that claims sender 7: dropped as a mismatch."""
    port = free_base_port(1)
    peer1 = Transport(addr(port), {}, MAX_FRAMES, keys.keyring(folder, 1, PEERS, [0, 2]))
    two = Transport(
        addr(port + 100), {1: addr(port)}, MAX_FRAMES, keys.keyring(folder, 2, PEERS, [1])
    )
    closing(peer1)
    closing(two)
    two.send(1, msg("model", 7))
    two.send(1, msg("heartbeat", 0))
    two.send(1, msg("model", 2))
    events = [decode(e.frames, EXPECT, e.origin, e.authenticated) for e in received(peer1, 2.0)]
    assert len(events) == 3
    assert all(isinstance(e, Malformed) and "sender mismatch" in e.reason for e in events[:2])
    assert "header claims 7" in events[0].reason and "key of node 2" in events[0].reason
    assert isinstance(events[2], Received) and events[2].msg.sender == 2


def test_a_peer_with_a_rotated_key_is_refused_not_crashed_on(folder, tmp_path, closing):
    """Peer 1 comes back with a new keypair nobody allowed: refused at the handshake, the
    receiver goes on, and peer 1 with its real key is heard again."""
    port = free_base_port(1)
    ring0 = keys.keyring(folder, 0, PEERS, [1])
    peer0 = Transport(addr(port), {}, MAX_FRAMES, ring0)
    closing(peer0)
    rotated = Transport(
        addr(port + 100), {0: addr(port)}, MAX_FRAMES, intruder(1, 0, ring0.public, tmp_path)
    )
    closing(rotated)
    for r in range(5):
        rotated.send(0, msg("model", 1, r + 1))
    assert received(peer0, 1.0) == []
    again = Transport(
        addr(port + 101), {0: addr(port)}, MAX_FRAMES, keys.keyring(folder, 1, PEERS, [0])
    )
    closing(again)
    again.send(0, msg("model", 1, 6))
    [env] = received(peer0, 2.0)
    assert env.authenticated == 1 and decode(env.frames, EXPECT, None, 1).msg.round == 6  # type: ignore[union-attr]


def test_a_peer_refuses_a_server_without_the_neighbours_secret(folder, tmp_path, closing):
    """Someone binds neighbour 0's address with their own keys: peer 1's link to it never
    completes the handshake, so nothing it sends is readable there."""
    port = free_base_port(1)
    impostor_ring = intruder(0, 1, keys.keyring(folder, 1, PEERS, []).public, tmp_path)
    impostor = Transport(
        addr(port),
        {},
        MAX_FRAMES,
        keys.Keyring(
            0,
            impostor_ring.public,
            impostor_ring.secret,
            {1: keys.keyring(folder, 1, PEERS, []).public},
        ),
    )
    closing(impostor)
    one = Transport(
        addr(port + 100), {0: addr(port)}, MAX_FRAMES, keys.keyring(folder, 1, PEERS, [0])
    )
    closing(one)
    one.send(0, msg("model", 1))
    assert received(impostor, 1.5) == []


def test_the_coordinator_binds_hello_and_updates_to_keys(folder, tmp_path, closing):
    """At the coordinator: a hello for peer 3 with peer 5's key is refused as a mismatch
    and peer 3 is not a member; peer 5's own hello is; an update over a connection
    without a valid key is never received at all."""
    control = free_base_port(2)
    updates = control + 1
    hub = Hub(
        addr(control),
        addr(updates),
        MAX_FRAMES + 1,
        keys.keyring(folder, PEERS, PEERS, range(PEERS)),
    )
    closing(hub)
    five = Link(
        addr(control), addr(updates), MAX_FRAMES, keys.keyring(folder, 5, PEERS, [PEERS]), PEERS
    )
    closing(five)
    five.send(msg("hello", 3))
    five.send(msg("hello", 5))
    server = FedAvgServer(
        ServerConfig(peers=PEERS, rounds=2, seed=0, min_peers=8), PARAMS["params"], 0.0
    )
    events = [decode(e.frames, EXPECT, e.origin, e.authenticated) for e in received(hub, 2.0)]
    assert len(events) == 2 and isinstance(events[0], Malformed)
    assert "sender mismatch: the header claims 3" in events[0].reason
    for e in events:
        server.feed(e, 1.0)
    assert server.live(1.0) == [5]
    ring_coord = keys.keyring(folder, PEERS, PEERS, [])
    fake = Link(
        addr(control),
        addr(updates),
        MAX_FRAMES,
        intruder(2, PEERS, ring_coord.public, tmp_path),
        PEERS,
    )
    closing(fake)
    fake.send(msg("hello", 2))
    fake.push(msg("update", 2))
    ctx = zmq.Context()
    try:
        clear = ctx.socket(zmq.PUSH)
        clear.setsockopt(zmq.LINGER, 0)
        clear.connect(addr(updates))
        clear.send_multipart(msg("update", 5), flags=zmq.NOBLOCK)
        assert received(hub, 1.5) == []
        clear.close()
    finally:
        ctx.term()


def test_a_peer_refuses_a_coordinator_without_its_secret(folder, tmp_path, closing):
    """A fake coordinator (own keys) on the coordinator's address: the peer's link never
    completes the handshake, so it hears no welcome and no start_round from it."""
    control = free_base_port(2)
    peer_ring = keys.keyring(folder, 2, PEERS, [PEERS])
    fake_coord = intruder(PEERS, 2, peer_ring.public, tmp_path)
    hub = Hub(
        addr(control),
        None,
        MAX_FRAMES,
        keys.Keyring(PEERS, fake_coord.public, fake_coord.secret, {2: peer_ring.public}),
    )
    closing(hub)
    link = Link(addr(control), None, MAX_FRAMES, peer_ring, PEERS)
    closing(link)
    link.send(msg("hello", 2))
    assert received(hub, 1.5) == []


# -- whole runs -----------------------------------------------------------------------


def scenario_file(tmp_path: Path, name: str, security: dict | None, **overrides) -> Path:
    port = free_base_port(5)
    raw = {
        "name": name,
        "topology": {"kind": "line", "peers": 3},
        "model": {"kind": "logreg"},
        "training": {"rounds": 30, "local_epochs": 1},
        "network": {"base_port": port},
        **overrides,
    }
    if security is not None:
        raw["security"] = security
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(raw))
    return path


def flood_until(
    stop: threading.Event, target: str, server_key: bytes, digest: str, tmp: Path
) -> int:
    """Well-formed models, heartbeats and byes claiming neighbours 0 and 2 of the run, from
    a fresh keypair and from a client in clear, until `stop`. Returns messages offered."""
    ring = intruder(0, 1, server_key, tmp)
    ctx = zmq.Context()
    curve, plain = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
    curve.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    curve.setsockopt(zmq.CURVE_PUBLICKEY, ring.public)
    curve.setsockopt(zmq.CURVE_SECRETKEY, ring.secret)
    offered, r = 0, 0
    try:
        for sock in (curve, plain):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(target)
        while not stop.is_set():
            r += 1
            for sender in (0, 2):
                for type_ in ("model", "heartbeat", "bye"):
                    for sock in (curve, plain):
                        with contextlib.suppress(zmq.Again):
                            sock.send_multipart(msg(type_, sender, r, digest), flags=zmq.NOBLOCK)
                        offered += 1
            time.sleep(0.002)
    finally:
        curve.close()
        plain.close()
        ctx.term()
    return offered


def test_a_run_under_attack_keeps_the_same_models(tmp_path, launch_run):
    """A 3-peer run with keys while outsiders flood peer 1 with its neighbours' messages:
    nothing reaches peer 1's machine, and every final model is bit-identical to the run
    without security and without the attack. Must-show 1 (encryption leaves the maths
    alone) and 2 (0 accepted)."""
    plain = scenario_file(tmp_path, "plain", None)
    secured = scenario_file(tmp_path, "secured", {"keys": "auto"})
    rc, out = launch_run(plain, "plain").wait(timeout=180)
    assert rc == 0, out
    run = launch_run(secured, "secured")
    key_file = run.out / "keys" / "public" / "peer-1.key"
    deadline = time.monotonic() + 60
    while not (run.out / "pids.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    s = load(secured)
    stop = threading.Event()
    offered: list[int] = []
    server_key = keys.read_public(key_file)
    attacker = threading.Thread(
        target=lambda: offered.append(
            flood_until(stop, s.address(1), server_key, s.digest(), tmp_path)
        )
    )
    attacker.start()
    try:
        rc, out = run.wait(timeout=180)
    finally:
        stop.set()
        attacker.join(10)
    assert rc == 0, out
    assert offered and offered[0] > 100
    for i in range(3):
        a = np.load(tmp_path / "plain" / "models" / f"peer-{i}.npz")["params"]
        b = np.load(run.out / "models" / f"peer-{i}.npz")["params"]
        assert np.array_equal(a, b), i
    log = read_jsonl(run.out / "logs" / "peer-1.jsonl")
    drops = [e for e in log if e["event"] == "message_dropped"]
    assert drops and {e["reason"] for e in drops} == {"key not allowed"}
    assert not any(e["event"] == "neighbour_gone" for e in log)
    rows = read_jsonl(run.out / "peer-1.jsonl")
    assert rows[-1]["round"] == 30 and all(r["neighbours_missing"] == [] for r in rows[1:])


# -- the CLI and a per-host deployment ------------------------------------------------


def p2pfl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One `p2pfl` command run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_keys_command_writes_refuses_overwrite_and_forces(tmp_path):
    scenario = scenario_file(tmp_path, "cli", None)
    done = p2pfl("keys", str(scenario), "--out", str(tmp_path / "k"))
    assert done.returncode == 0, done.stderr
    assert "4 keypairs (3 peers and the coordinator)" in done.stdout
    assert sorted(p.name for p in (tmp_path / "k" / "public").iterdir()) == [
        "coordinator.key",
        "peer-0.key",
        "peer-1.key",
        "peer-2.key",
    ]
    again = p2pfl("keys", str(scenario), "--out", str(tmp_path / "k"))
    assert (
        again.returncode == 2 and "already holds keys" in again.stderr and "--force" in again.stderr
    )
    assert p2pfl("keys", str(scenario), "--out", str(tmp_path / "k"), "--force").returncode == 0
    nowhere = p2pfl("keys", str(scenario))
    assert nowhere.returncode == 2 and "--out DIR" in nowhere.stderr


def test_bad_keys_stop_a_launch_and_a_peer_naming_the_file(tmp_path):
    keys.create(tmp_path / "keys", 3)
    scenario = scenario_file(tmp_path, "badkeys", {"keys": "keys"})
    (tmp_path / "keys" / "public" / "peer-2.key").unlink()
    done = p2pfl("launch", str(scenario), "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "public/peer-2.key: key file does not exist" in done.stderr
    assert not (tmp_path / "run" / "pids.json").exists()  # nothing was started
    secret = tmp_path / "keys" / "private" / "peer-0.key_secret"
    secret.chmod(0o640)
    done = p2pfl("peer", str(scenario), "--id", "0", "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "peer-0.key_secret: secret key file is readable" in done.stderr
    secret.write_text("not a key file\n")
    secret.chmod(0o600)
    done = p2pfl("peer", str(scenario), "--id", "0", "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "peer-0.key_secret: not a ZeroMQ key file" in done.stderr


def test_clear_text_off_loopback_needs_insecure(tmp_path):
    """A peer whose coordinator is on another host, without keys: refused (exit 2, saying
    how to make keys); with --insecure it starts, warns, and gives up on the unreachable
    coordinator by itself. 192.0.2.1 is TEST-NET-1: nothing answers there."""
    control = f"tcp://192.0.2.1:{free_base_port(2)}"
    scenario = scenario_file(
        tmp_path,
        "remote",
        None,
        mode="centralized",
        coordinator={"address": control},
        centralized={"startup_timeout_s": 1.0, "coordinator_timeout_s": 1.0},
    )
    out = str(tmp_path / "run")
    done = p2pfl("peer", str(scenario), "--id", "0", "--out", out)
    assert done.returncode == 2
    assert control in done.stderr and "not a loopback address" in done.stderr
    assert "p2pfl keys" in done.stderr
    assert "--insecure" in done.stderr
    done = p2pfl("peer", str(scenario), "--id", "0", "--out", out, "--insecure")
    assert done.returncode == 1, done.stderr  # no coordinator: it gave up, it did start
    log = read_jsonl(tmp_path / "run" / "logs" / "peer-0.jsonl")
    [warning] = [e for e in log if e["event"] == "insecure"]
    assert warning["level"] == "warning" and warning["addresses"][0] == control
    done = p2pfl("coordinator", str(scenario), "--out", out)
    assert done.returncode == 2 and "not a loopback address" in done.stderr


def host_folder(root: Path, keys_dir: Path, node: int, peers: int, scenario: dict) -> Path:
    """What one host holds: the scenario, `public/`, and its own secret file only."""
    host = root / keys.node_name(node, peers)
    shutil.copytree(keys_dir / "public", host / "keys" / "public")
    (host / "keys" / "private").mkdir(mode=0o700)
    secret = keys.secret_path(keys_dir, node, peers)
    shutil.copy2(secret, keys.secret_path(host / "keys", node, peers))
    (host / "run.toml").write_text(to_toml(scenario))
    return host


def test_per_host_deployment_with_keys(tmp_path, cli_procs):
    """Coordinator (bootstrap) and 3 peers on 127.0.0.1-3, each host with `public/` and
    only its own secret: the run completes, every message vouched for by a key."""
    port, control = free_base_port(1), free_base_port(2)
    scenario = {
        "name": "hosts",
        "topology": {"kind": "line", "peers": 3},
        "model": {"kind": "logreg"},
        "training": {"rounds": 10},
        "coordinator": {"address": f"tcp://127.0.0.1:{control}", "bootstrap": True},
        "security": {"keys": "keys"},
    }
    keys.create(tmp_path / "made", 3)
    hosts = {
        n: host_folder(tmp_path / "hosts", tmp_path / "made", n, 3, scenario) for n in range(4)
    }
    assert sorted(p.name for p in (hosts[1] / "keys" / "private").iterdir()) == [
        "peer-1.key_secret"
    ]
    out = tmp_path / "run"
    procs = [cli_procs("coordinator", "coordinator", str(hosts[3] / "run.toml"), "--out", str(out))]
    for i in (2, 0, 1):
        address = f"tcp://127.0.0.{i + 1}:{port}"
        procs.append(
            cli_procs(
                f"peer-{i}",
                "peer",
                str(hosts[i] / "run.toml"),
                "--id",
                str(i),
                "--address",
                address,
                "--out",
                str(out),
            )
        )
    for p in procs:
        p.wait(180)
        assert p.returncode == 0, p.output_path.read_text()  # type: ignore[attr-defined]
    for i in range(3):
        rows = read_jsonl(out / f"peer-{i}.jsonl")
        assert rows[-1]["round"] == 10 and all(r["neighbours_missing"] == [] for r in rows[1:])
        log = read_jsonl(out / "logs" / f"peer-{i}.jsonl")
        assert not [e for e in log if e["event"] == "message_dropped"]


def test_crash_and_rejoin_over_curve(make_scenario, launch_run):
    """With keys: peer 2 of a ring is killed at round 5, restarted from its checkpoint
    with the same key, caught up by its neighbours over CURVE, and finishes."""
    scenario = make_scenario(
        {
            "name": "curve-rejoin",
            "topology": {"kind": "ring", "peers": 4},
            "model": {"kind": "logreg"},
            "gossip": {"round_timeout_s": 10.0, "peer_timeout_s": 1.0, "heartbeat_s": 0.25},
            "training": {"rounds": 40, "local_epochs": 1},
            "faults": {
                "crash": [{"peer": 2, "at_round": 5, "rejoin_after_s": 0.5}],
                "slow": [{"peer": 0, "delay_s": 0.1}],
            },
            "security": {"keys": "auto"},
        }
    )
    run = launch_run(scenario, "rejoin")
    rc, out = run.wait(timeout=240)
    assert rc == 0, out
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["completed_peers"] == [0, 1, 2, 3] and summary["rejoined_peers"] == [2]
    log = read_jsonl(run.out / "logs" / "peer-2.jsonl")
    [caught] = [e for e in log if e["event"] == "caught_up"]
    assert sorted(caught["neighbours"]) == ["1", "3"]
    rows = read_jsonl(run.out / "peer-2.jsonl")
    assert rows[-1]["round"] == 40 and rows[-1]["neighbours_heard"] == [1, 3]
    for j in (1, 3):  # nothing of the restarted peer's was refused: same key, same id
        drops = [
            e
            for e in read_jsonl(run.out / "logs" / f"peer-{j}.jsonl")
            if e["event"] == "message_dropped"
        ]
        assert not [e for e in drops if "key" in e["reason"] or "mismatch" in e["reason"]], drops


def test_fuzz_from_a_valid_neighbour_key(make_scenario, launch_run):
    """An authenticated but malicious neighbour is still only a neighbour: 2,000 fuzzed
    messages sent with neighbour 1's own key at peer 0 of a run with keys are each
    dropped once (wire checks, or a sender mismatch), RSS stays bounded, the run ends."""
    from test_fuzz import ROUNDS, Rss, corpus, dropped, finished, fuzz_scenario

    count = 2000
    scenario, s, n = fuzz_scenario(make_scenario, "fuzzcurve", security={"keys": "auto"})

    def usable(m):  # what neighbour 1 may legitimately send: taken, not dropped
        if m.sender == 1 and m.type in ("heartbeat", "bye"):
            return True
        degree = m.meta.get("degree")
        model = m.type == "model" and m.sender == 1 and "params" in m.arrays
        return model and m.round <= ROUNDS + 2 and wire.is_int(degree) and 0 < degree < 4

    messages, _ = corpus(s, n, usable, count - 20)
    # and well-formed models that claim to be peer 0's other neighbour, 3
    params = {"params": np.zeros(n, np.float32)}
    meta = {"degree": 2, "samples": 10}
    claims = [wire.encode("model", 3, r, s.digest(), meta, params) for r in range(1, 21)]
    messages += [[bytes(f) for f in frames] for frames in claims]
    run = launch_run(scenario)
    wait_deadline = time.monotonic() + 120
    while len(read_jsonl(run.out / "peer-0.jsonl")) < 3 and time.monotonic() < wait_deadline:
        time.sleep(0.05)
    ring1 = keys.keyring(run.out / "keys", 1, s.peers, [0])
    rss = Rss(run.peer_pids()[0])
    log = run.out / "logs" / "peer-0.jsonl"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.CURVE_SERVERKEY, ring1.known[0])
    sock.setsockopt(zmq.CURVE_PUBLICKEY, ring1.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, ring1.secret)
    sock.setsockopt(zmq.SNDTIMEO, 30_000)
    sock.connect(s.address(0))
    try:
        for frames in messages:
            sock.send_multipart(frames)
    finally:
        sock.close(linger=30_000)
        ctx.term()
    deadline = time.monotonic() + 60
    while dropped(log) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    rss.stop()
    assert read_jsonl(run.out / "peer-0.jsonl")[-1]["round"] < ROUNDS, "the run ended first"
    finished(run, log, count)
    reasons = [e["reason"] for e in read_jsonl(log) if e["event"] == "message_dropped"]
    assert sum(r.startswith("sender mismatch: the header claims 3") for r in reasons) >= 20
    assert not any(r == "key not allowed" for r in reasons)  # its key was a neighbour's
