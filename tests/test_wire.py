"""Wire format: encode/decode round trips, frame splitting, and every bad input refused."""

from __future__ import annotations

import contextlib
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl import wire
from p2pfl.wire import MAX_FRAME_BYTES, Expect, WireError, decode, encode

SCENARIO = "0123456789abcdef"
N = 10
EXPECT = Expect(scenario=SCENARIO, max_sender=7, shapes={"params": (N,)})


def _header(**changes) -> dict:
    h = {
        "v": wire.PROTOCOL_VERSION,
        "type": "model",
        "sender": 1,
        "round": 3,
        "scenario": SCENARIO,
        "meta": {"degree": 2},
        "arrays": [{"name": "params", "dtype": "float32", "shape": [N], "frames": 1}],
    }
    h.update(changes)
    return h


def _desc(**changes) -> dict:
    d = {"name": "params", "dtype": "float32", "shape": [N], "frames": 1}
    d.update(changes)
    return d


def _frames(header: dict | None = None, *arrays: bytes) -> list[bytes]:
    body = arrays if arrays else (np.arange(N, dtype=np.float32).tobytes(),)
    return [msgpack.packb(header or _header(), use_bin_type=True), *body]


def _as_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


# ---- round trips ----


def test_round_trip_small_model():
    """A model message decodes to the same type, sender, round, meta and exact values."""
    params = np.linspace(-1, 1, N, dtype=np.float32)
    frames = encode("model", 2, 5, SCENARIO, {"degree": 3}, {"params": params})
    assert len(frames) == 2
    msg = decode(_as_bytes(frames), EXPECT)
    assert (msg.type, msg.sender, msg.round) == ("model", 2, 5)
    assert msg.meta == {"degree": 3}
    assert msg.arrays["params"].dtype == np.float32
    np.testing.assert_array_equal(msg.arrays["params"], params)


def test_round_trip_without_arrays():
    """A control message (no arrays) is a single header frame and decodes back."""
    frames = encode("heartbeat", 7, 0, SCENARIO)
    assert len(frames) == 1
    msg = decode(frames, EXPECT)
    assert (msg.type, msg.sender, msg.round, dict(msg.arrays)) == ("heartbeat", 7, 0, {})


def test_encode_does_not_copy_the_model():
    """encode() returns a view on the array's memory, not a copy."""
    params = np.zeros(N, np.float32)
    frames = encode("model", 0, 0, SCENARIO, arrays={"params": params})
    params[0] = 42.0
    assert np.frombuffer(frames[1], np.float32)[0] == 42.0


def test_decode_single_frame_is_zero_copy():
    """A one-frame array is a read-only view on the received buffer."""
    buf = bytearray(np.ones(N, np.float32).tobytes())
    msg = decode([msgpack.packb(_header()), memoryview(buf)], EXPECT)
    buf[:4] = np.float32(7).tobytes()
    assert msg.arrays["params"][0] == 7.0


def test_large_model_split_into_frames_of_at_most_8_mib():
    """A model over 8 MiB travels as several frames of ≤ 8 MiB and reassembles exactly."""
    n = 5_000_003  # ~20 MB of float32: three frames, the last a partial one
    params = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    frames = encode("model", 1, 9, SCENARIO, arrays={"params": params})
    arrays = frames[1:]
    assert len(arrays) == math.ceil(4 * n / MAX_FRAME_BYTES) == 3
    assert all(len(memoryview(f).cast("B")) <= MAX_FRAME_BYTES for f in arrays)
    assert sum(len(memoryview(f).cast("B")) for f in arrays) == 4 * n
    header = msgpack.unpackb(frames[0])
    assert header["arrays"][0]["frames"] == 3
    expect = Expect(SCENARIO, 7, {"params": (n,)})
    assert expect.max_frames == 4
    msg = decode(_as_bytes(frames), expect)
    np.testing.assert_array_equal(msg.arrays["params"], params)


def test_model_of_exactly_8_mib_is_one_frame():
    """A model of exactly MAX_FRAME_BYTES fits one frame."""
    n = MAX_FRAME_BYTES // 4
    frames = encode("model", 0, 0, SCENARIO, arrays={"params": np.ones(n, np.float32)})
    assert len(frames) == 2
    msg = decode(frames, Expect(SCENARIO, 0, {"params": (n,)}))
    assert msg.arrays["params"].shape == (n,)


def test_two_arrays_round_trip():
    """Several named arrays come back under their names and shapes."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full(4, 0.5, np.float32)
    expect = Expect(SCENARIO, 3, {"a": (2, 3), "b": (4,)})
    msg = decode(encode("update", 3, 1, SCENARIO, arrays={"a": a, "b": b}), expect)
    np.testing.assert_array_equal(msg.arrays["a"], a)
    np.testing.assert_array_equal(msg.arrays["b"], b)


def test_expect_max_frame_bytes_bounds():
    """ZMQ's message limit covers the header and at most one 8 MiB frame."""
    assert Expect(SCENARIO, 1, {"p": (10,)}).max_frame_bytes == wire.MAX_HEADER_BYTES
    assert Expect(SCENARIO, 1, {"p": (10**8,)}).max_frame_bytes == MAX_FRAME_BYTES


# ---- bad input ----

_GOOD = np.arange(N, dtype=np.float32).tobytes()
_BIG_N = 3 * MAX_FRAME_BYTES // 4  # 24 MiB: must arrive as three frames
_BIG = Expect(SCENARIO, 7, {"params": (_BIG_N,)})

# (id, frames, expect, fragment of the reason)
BAD = [
    ("empty message", [], EXPECT, "empty"),
    ("random bytes", [bytes(range(7, 250, 3))], EXPECT, "msgpack"),
    ("msgpack with trailing garbage", [msgpack.packb(_header()) + b"\x00\x01"], EXPECT, "msgpack"),
    ("header is a list", [msgpack.packb([1, 2, 3])], EXPECT, "not a map"),
    ("header is an int", [msgpack.packb(5)], EXPECT, "not a map"),
    ("header with int keys", [msgpack.packb({1: 2})], EXPECT, "msgpack"),
    ("missing header key", [msgpack.packb({"v": 1, "type": "model"})], EXPECT, "header keys"),
    ("extra header key", _frames(_header(evil=1)), EXPECT, "header keys"),
    ("wrong version", _frames(_header(v=2)), EXPECT, "protocol version"),
    ("version as string", _frames(_header(v="1")), EXPECT, "protocol version"),
    ("wrong scenario hash", _frames(_header(scenario="ffffffffffffffff")), EXPECT, "scenario hash"),
    ("unknown type", _frames(_header(type="exec")), EXPECT, "unknown message type"),
    ("type is a list", _frames(_header(type=["model"])), EXPECT, "unknown message type"),
    ("type is a map", _frames(_header(type={"a": 1})), EXPECT, "unknown message type"),
    ("bool as sender", _frames(_header(sender=True)), EXPECT, "sender"),
    ("sender out of range", _frames(_header(sender=8)), EXPECT, "sender"),
    ("negative sender", _frames(_header(sender=-1)), EXPECT, "sender"),
    ("sender as string", _frames(_header(sender="1")), EXPECT, "sender"),
    ("negative round", _frames(_header(round=-1)), EXPECT, "round"),
    ("huge round", _frames(_header(round=2**63)), EXPECT, "round"),
    ("round as float", _frames(_header(round=1.0)), EXPECT, "round"),
    ("meta not a map", _frames(_header(meta=[1])), EXPECT, "meta"),
    ("arrays not a list", _frames(_header(arrays={"x": 1})), EXPECT, "arrays"),
    ("descriptor not a map", _frames(_header(arrays=[1])), EXPECT, "descriptor"),
    ("descriptor missing key", _frames(_header(arrays=[{"name": "params"}])), EXPECT, "descriptor"),
    ("unexpected array name", _frames(_header(arrays=[_desc(name="grads")])), EXPECT, "unexpected"),
    ("array name a list", _frames(_header(arrays=[_desc(name=["params"])])), EXPECT, "unexpected"),
    ("wrong dtype", _frames(_header(arrays=[_desc(dtype="float64")])), EXPECT, "dtype"),
    ("object dtype", _frames(_header(arrays=[_desc(dtype="object")])), EXPECT, "dtype"),
    ("dtype a list", _frames(_header(arrays=[_desc(dtype=["float32"])])), EXPECT, "dtype"),
    ("wrong shape", _frames(_header(arrays=[_desc(shape=[N + 1])])), EXPECT, "does not match"),
    ("wrong rank", _frames(_header(arrays=[_desc(shape=[2, 5])])), EXPECT, "does not match"),
    ("shape not ints", _frames(_header(arrays=[_desc(shape=["10"])])), EXPECT, "shape"),
    ("zero frames", _frames(_header(arrays=[_desc(frames=0)])), EXPECT, "frame count"),
    (
        "duplicate array",
        _frames(_header(arrays=[_desc(), _desc()]), _GOOD, _GOOD),
        Expect(SCENARIO, 7, {"params": (N,), "b": (1,)}),  # room for three frames
        "appears twice",
    ),
    ("NaN values", _frames(None, np.full(N, np.nan, np.float32).tobytes()), EXPECT, "NaN or Inf"),
    (
        "one Inf value",
        _frames(None, np.r_[np.zeros(N - 1), np.inf].astype(np.float32).tobytes()),
        EXPECT,
        "NaN or Inf",
    ),
    ("array frame too short", _frames(None, _GOOD[:-4]), EXPECT, "carries"),
    ("array frame too long", _frames(None, _GOOD + b"\0\0\0\0"), EXPECT, "carries"),
    ("truncated: array frame missing", [msgpack.packb(_header())], EXPECT, "truncated"),
    (
        "truncated: fewer frames than the descriptor says",
        [msgpack.packb(_header(arrays=[_desc(shape=[_BIG_N], frames=3)])), b"\0" * MAX_FRAME_BYTES],
        _BIG,
        "truncated",
    ),
    (
        "extra frame",
        _frames(None, _GOOD, b"x"),
        Expect(SCENARIO, 7, {"params": (N,), "b": (1,)}),
        "beyond",
    ),
    ("extra frame without arrays", [msgpack.packb(_header(arrays=[])), b"x"], EXPECT, "beyond"),
    ("too many frames", _frames(None, _GOOD, _GOOD, _GOOD), EXPECT, "frames, at most"),
    (
        "oversized frame",
        [
            msgpack.packb(_header(arrays=[_desc(shape=[_BIG_N], frames=2)])),
            b"\0" * (MAX_FRAME_BYTES + 4),
            b"\0" * (2 * MAX_FRAME_BYTES - 4),
        ],
        _BIG,
        "exceeds",
    ),
    (
        "frame splitting an element",
        [
            msgpack.packb(_header(arrays=[_desc(frames=2)])),
            _GOOD[:6],
            _GOOD[6:],
        ],
        Expect(SCENARIO, 7, {"params": (N,), "b": (1,)}),
        "splits an element",
    ),
    (
        "huge header",
        [msgpack.packb(_header(meta={"pad": "x" * (wire.MAX_HEADER_BYTES + 1)})), _GOOD],
        EXPECT,
        "exceeds",
    ),
    (
        "long string inside a small header",
        [msgpack.packb(_header(meta={"pad": "x" * 5000})), _GOOD],
        EXPECT,
        "msgpack",
    ),
    (
        "long array inside a small header",
        [msgpack.packb(_header(meta={"k": list(range(1000))})), _GOOD],
        EXPECT,
        "msgpack",
    ),
    (
        "msgpack ext type",
        [msgpack.packb(_header(meta={"t": msgpack.ExtType(5, b"abc")})), _GOOD],
        EXPECT,
        "msgpack",
    ),
]


@pytest.mark.parametrize(
    ("frames", "expect", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_input_raises_wire_error_with_reason(frames, expect, reason):
    """Each kind of bad message raises WireError whose text names the problem."""
    with pytest.raises(WireError) as info:
        decode(frames, expect)
    assert reason in str(info.value), str(info.value)


def test_bad_input_table_starts_from_a_good_message():
    """The unmodified template decodes, so each bad case differs only by its defect."""
    msg = decode(_frames(), EXPECT)
    np.testing.assert_array_equal(msg.arrays["params"], np.arange(N, dtype=np.float32))


def test_wire_error_is_a_value_error():
    """Callers that catch ValueError also catch WireError."""
    assert issubclass(WireError, ValueError)


# ---- fuzzing: nothing but WireError may escape decode ----

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _headers(draw) -> bytes:
    """Mostly-valid headers with some fields replaced by random values."""
    h = _header()
    for key in draw(st.lists(st.sampled_from(sorted(h)), max_size=3, unique=True)):
        h[key] = draw(_values)
    if draw(st.booleans()):
        d = _desc()
        for key in draw(st.lists(st.sampled_from(sorted(d)), max_size=2, unique=True)):
            d[key] = draw(_values)
        h["arrays"] = [d]
    return msgpack.packb(h, use_bin_type=True)


_FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

_frame = st.binary(max_size=64) | st.just(_GOOD) | st.just(_GOOD[:-1])


@_FUZZ
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_decode_random_frames_only_raises_wire_error(frames):
    """Random frame lists are either decoded or refused with WireError, never another error."""
    with contextlib.suppress(WireError):
        decode(frames, EXPECT)


@_FUZZ
@given(_headers(), st.lists(_frame, max_size=3))
def test_decode_mutated_headers_only_raises_wire_error(header, body):
    """Headers with random field values and random bodies raise only WireError."""
    try:
        msg = decode([header, *body], EXPECT)
    except WireError:
        return
    # Anything accepted must satisfy every promise of the checks.
    assert msg.type in wire.MESSAGE_TYPES
    assert 0 <= msg.sender <= EXPECT.max_sender
    for name, array in msg.arrays.items():
        assert array.shape == EXPECT.shapes[name]
        assert np.isfinite(array).all()
