"""Bad input thrown at the coordinator: each message dropped with one log line, run completes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import zmq
from conftest import read_jsonl, send_all, wait_for
from structlog.testing import capture_logs
from test_bad_input import header_maker, wire_level

from p2pfl.config.learning import learning_spec
from p2pfl.config.loader import load
from p2pfl.config.plan import server_plan
from p2pfl.learning.local import build
from p2pfl.protocol import wire
from p2pfl.protocol.events import Received
from p2pfl.protocol.fedavg_server import FedAvgServer

ROUNDS = 400


def drops(out):
    """The coordinator's message_dropped events, in order."""
    log = out / "logs" / "coordinator.jsonl"
    return [e for e in read_jsonl(log) if e["event"] == "message_dropped"]


def test_bad_input_to_the_server_is_dropped_and_the_run_completes(
    make_scenario, cli_procs, tmp_path
):
    """Wire-level garbage, unknown peers, wrong rounds and spoofed ids on both channels."""
    scenario = make_scenario(
        {
            "name": "serverinput",
            "mode": "centralized",
            "topology": {"kind": "ring", "peers": 4},  # peer 3 never joins: an unknown peer
            "model": {"kind": "logreg"},
            "training": {"rounds": ROUNDS, "local_epochs": 1},
            "centralized": {"min_peers": 3},
            "faults": {"slow": [{"peer": 0, "delay_s": 0.01}]},  # rounds of >= 10 ms
        }
    )
    s = load(scenario)
    n = build(learning_spec(s), 0).trainer.n_params
    control, updates = s.coordinator_addresses()
    good = np.zeros(n, np.float32).tobytes()
    update = header_maker(s.digest(), n, type="update", sender=0, meta={"samples": 10})
    update_cases = [
        *wire_level(s.digest(), n, type="update", sender=0, meta={"samples": 10}),
        ("has not joined", [update(sender=3), good]),
        ("update for round 1000000", [update(round=10**6), good]),
        ("unexpected message type 'model' on the update channel", [update(type="model"), good]),
    ]
    beat = header_maker(s.digest(), n, type="heartbeat", sender=0, meta={}, arrays=[])
    control_cases = [
        *wire_level(s.digest(), n, type="heartbeat", sender=0, meta={}),
        ("claimed from another connection", [beat()]),  # peer 0 is alive elsewhere
        ("has not joined", [beat(sender=3)]),
    ]

    out = tmp_path / "run"
    common = [str(scenario), "--out", str(out)]
    procs = [cli_procs("coordinator", "coordinator", *common)]
    procs += [cli_procs(f"peer-{i}", "peer", *common, "--id", str(i)) for i in range(3)]
    rows = out / "coordinator.jsonl"
    wait_for(lambda: len(read_jsonl(rows)) > 2, 120, "round 2", procs)
    send_all(zmq.PUSH, updates, update_cases)
    wait_for(lambda: len(drops(out)) >= len(update_cases), 30, "update drops", procs)
    send_all(zmq.DEALER, control, control_cases)
    cases = update_cases + control_cases
    wait_for(lambda: len(drops(out)) >= len(cases), 30, "control drops", procs)
    assert read_jsonl(rows)[-1]["round"] < ROUNDS, "the run ended before the messages landed"

    for p in procs:
        assert p.wait(240) == 0, p.output_path.read_text()
    events = drops(out)
    assert len(events) == len(cases), [e["reason"] for e in events]
    for (fragment, _), event in zip(cases, events, strict=True):
        assert fragment in event["reason"], (fragment, event["reason"])
    history = read_jsonl(rows)
    assert history[-1]["round"] == ROUNDS and history[-1]["holdout_accuracy"] >= 0.9
    assert all(r["participants"] == [0, 1, 2] for r in history[1:])


def test_update_checks_in_the_server(make_scenario, tmp_path):
    """Not sampled, bad samples or loss, late, early, duplicate: dropped; one good one kept."""
    scenario = make_scenario(
        {"name": "updates", "mode": "centralized", "topology": {"kind": "ring", "peers": 3}}
    )
    s = load(scenario)
    plan = server_plan(s, tmp_path)
    n = build(plan.learning, 0).trainer.n_params  # the model's size: the wire checks it
    expect = wire.Expect(s.digest(), s.peers - 1, {"params": (n,)})
    params = np.ones(n, np.float32)
    c = FedAvgServer(dataclasses.replace(plan.server, fraction=0.5, min_peers=3), params, 0.0)

    def feed(type_, sender, round_, meta, **kw):
        arrays = {"params": params} if type_ == "update" else None
        frames = wire.encode(type_, sender, round_, s.digest(), meta, arrays)
        return c.feed(Received(wire.decode(frames, expect), **kw), 0.0)

    for i in range(3):
        feed("hello", i, 0, {}, origin=bytes([i]))
    for i in c.open.sampled:
        feed("update", i, 1, {"samples": 5})
    c.close_round(params, 0.0)
    c.tick(0.0)
    assert c.round == 2 and len(c.open.sampled) == 2
    ok, other = c.open.sampled  # sampled in round 2, and the one that is not:
    (out,) = {0, 1, 2} - {ok, other}
    with capture_logs() as logs:
        feed("update", out, 2, {"samples": 5})
        feed("update", ok, 2, {"samples": 0})
        feed("update", ok, 2, {"samples": True})
        feed("update", ok, 2, {"samples": 5, "loss": "0.1"})
        feed("update", ok, 2, {"samples": 5, "loss": math.inf})
        feed("update", ok, 1, {"samples": 5})
        feed("update", ok, 2, {"samples": 5, "loss": 0.25})
        feed("update", ok, 2, {"samples": 5, "loss": 0.25})
        feed("update", other, 3, {"samples": 5})
    reasons = [e["reason"] for e in logs if e["event"] == "message_dropped"]
    assert reasons == [
        "update from a peer not sampled this round",
        "meta.samples missing or out of range",
        "meta.samples missing or out of range",
        "meta.loss is not a finite float",
        "meta.loss is not a finite float",
        "duplicate update for this round",
        "update for round 3, the open round is 2",
    ]
    assert [e["sender"] for e in logs if e["event"] == "late_update"] == [ok]
    assert list(c.open.updates) == [ok]
    assert c.open.updates[ok].samples == 5 and c.open.updates[ok].loss == 0.25
