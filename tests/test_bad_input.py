"""Bad input thrown at a live peer during a run: each message dropped with one log line."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import zmq
from conftest import read_jsonl, send_all, wait_for_round

from p2pfl.config.learning import learning_spec
from p2pfl.config.loader import load
from p2pfl.learning.local import build
from p2pfl.protocol import wire

pytestmark = pytest.mark.slow  # a launched run


def header_maker(scenario: str, n_params: int, **base):
    """A function building msgpack headers: a valid model message, `base` and then changes."""

    def header(**changes):
        h = {
            "v": 1,
            "type": "model",
            "sender": 1,
            "round": 1,
            "scenario": scenario,
            "meta": {"degree": 2},
            "arrays": [{"name": "params", "dtype": "float32", "shape": [n_params], "frames": 1}],
        }
        h.update(base)
        h.update(changes)
        return msgpack.packb(h)

    return header


def wire_level(scenario: str, n_params: int, **base) -> list[tuple[str, list[bytes]]]:
    """(reason fragment, frames) for bad input that `wire.decode` itself refuses."""
    good = np.zeros(n_params, np.float32)
    header = header_maker(scenario, n_params, **base)

    def desc(**changes):
        d = {"name": "params", "dtype": "float32", "shape": [n_params], "frames": 1}
        d.update(changes)
        return [d]

    nan = good.copy()
    nan[7] = np.nan
    inf = good.copy()
    inf[0] = np.inf
    return [
        (
            "not valid msgpack",
            [bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))],
        ),
        ("not a map", [msgpack.packb([1, 2, 3]), good.tobytes()]),
        ("protocol version", [header(v=99), good.tobytes()]),
        ("scenario hash", [header(scenario="0" * 16), good.tobytes()]),
        ("unknown message type", [header(type="exploit"), good.tobytes()]),
        ("dtype", [header(arrays=desc(dtype="float64")), good.astype(np.float64).tobytes()]),
        (
            "does not match the model",
            [header(arrays=desc(shape=[n_params + 1])), good.tobytes() + b"\0" * 4],
        ),
        ("NaN or Inf", [header(), nan.tobytes()]),
        ("NaN or Inf", [header(), inf.tobytes()]),
        ("truncated", [header(arrays=desc(frames=2)), good.tobytes()]),
        ("carries", [header(), good.tobytes()[:-8]]),
        ("exceeds", [header(arrays=desc(frames=1)), b"\0" * (wire.MAX_FRAME_BYTES + 4096)]),
        ("frames", [header()] + [good.tobytes()] * 50),
        ("sender", [header(sender=10**9), good.tobytes()]),
        ("msgpack", [b"\x80\x04\x95" + b"cos\nsystem\n" + b"\x00" * 20]),  # a pickle
    ]


def bad_messages(scenario: str, n_params: int) -> list[tuple[str, list[bytes]]]:
    """(expected reason fragment, frames) for every kind of bad input the issue lists."""
    good = np.zeros(n_params, np.float32).tobytes()
    header = header_maker(scenario, n_params)
    return [
        *wire_level(scenario, n_params),
        ("not a neighbour", [header(sender=4), good]),
        ("too far ahead", [header(round=10**6), good]),
    ]


def test_bad_input_is_dropped_with_one_log_line_each(make_scenario, launch_run):
    """Each bad message is logged once with its reason; the run completes with normal accuracy."""
    rounds = 300  # rounds take milliseconds: enough for the messages to land mid-run
    scenario = make_scenario({"name": "badinput", "training": {"rounds": rounds}})
    s = load(scenario)
    cases = bad_messages(s.digest(), build(learning_spec(s), 0).trainer.n_params)
    run = launch_run(scenario)
    history = run.out / "peer-0.jsonl"
    wait_for_round(run, 0, 2, timeout=120)

    send_all(zmq.PUSH, s.address(0), cases)
    assert read_jsonl(history)[-1]["round"] < rounds, "the run ended before the messages were sent"

    rc, output = run.wait(timeout=240)
    assert rc == 0, output
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["final_holdout_accuracy"]["mean"] >= 0.95
    drops = [
        e for e in read_jsonl(run.out / "logs" / "peer-0.jsonl") if e["event"] == "message_dropped"
    ]
    assert len(drops) == len(cases), [d["reason"] for d in drops]
    for (fragment, _), event in zip(cases, drops, strict=True):
        assert fragment in event["reason"], (fragment, event["reason"])
