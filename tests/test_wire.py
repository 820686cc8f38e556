"""Wire format: encode/decode round trips, frame splitting, and every bad input refused."""

from __future__ import annotations

import contextlib
import itertools
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.protocol import wire
from p2pfl.protocol.wire import MAX_FRAME_BYTES, Chunked, Expect, WireError, decode, encode

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
    """A one-frame array is one read-only view on the received buffer; join() copies nothing."""
    buf = bytearray(np.ones(N, np.float32).tobytes())
    msg = decode([msgpack.packb(_header()), memoryview(buf)], EXPECT)
    params = msg.arrays["params"]
    assert isinstance(params, Chunked)
    assert len(params.chunks) == 1
    joined = params.join()
    buf[:4] = np.float32(7).tobytes()
    assert params.chunks[0][0] == 7.0
    assert joined[0] == 7.0
    assert np.asarray(params, copy=False)[0] == 7.0
    assert not params.chunks[0].flags.writeable
    assert not joined.flags.writeable


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
    received = _as_bytes(frames)
    msg = decode(received, expect)
    got = msg.arrays["params"]
    assert (got.shape, got.size, got.dtype) == ((n,), n, np.float32)
    np.testing.assert_array_equal(got.join(), params)
    np.testing.assert_array_equal(got, params)  # np.asarray joins


def test_multi_frame_array_is_not_joined():
    """A multi-frame array comes back as read-only views on the received frames, in order."""
    n = 2 * MAX_FRAME_BYTES // 4 + 3  # two full frames and a 12-byte one
    params = np.arange(n, dtype=np.float32)
    received = [bytearray(f) for f in encode("model", 1, 9, SCENARIO, arrays={"params": params})]
    got = decode(received, Expect(SCENARIO, 7, {"params": (n,)})).arrays["params"]
    assert [c.size for c in got.chunks] == [MAX_FRAME_BYTES // 4, MAX_FRAME_BYTES // 4, 3]
    for chunk, frame in zip(got.chunks, received[1:], strict=True):
        assert np.shares_memory(chunk, np.frombuffer(frame, np.uint8))
        assert not chunk.flags.writeable
    np.testing.assert_array_equal(np.concatenate(got.chunks), params)
    joined = got.join()
    assert not any(np.shares_memory(joined, c) for c in got.chunks)
    assert not joined.flags.writeable
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(got, copy=False)


def test_chunked_join_keeps_the_shape():
    """join() gives the declared shape whether the array arrived in one chunk or several."""
    a = np.arange(6, dtype=np.float32)
    assert Chunked((a,), (2, 3)).join().shape == (2, 3)
    two = Chunked((a[:4], a[4:]), (3, 2))
    np.testing.assert_array_equal(two.join(), a.reshape(3, 2))
    assert np.asarray(two, dtype=np.float64).dtype == np.float64


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


# ---- non-finite values: every position of every frame is read ----

_MULTI_N = 2 * MAX_FRAME_BYTES // 4 + 5  # three frames: two full ones and a 20-byte one
_MULTI = Expect(SCENARIO, 7, {"params": (_MULTI_N,)})
_FRAME_N = MAX_FRAME_BYTES // 4
_POSITIONS = {
    "first element": 0,
    "last of frame 1": _FRAME_N - 1,
    "first of frame 2": _FRAME_N,
    "middle of frame 2": _FRAME_N + _FRAME_N // 2,
    "last of frame 2": 2 * _FRAME_N - 1,
    "first of frame 3": 2 * _FRAME_N,
    "last element": _MULTI_N - 1,
}
_NON_FINITE = {"NaN": np.nan, "-NaN": -np.nan, "+Inf": np.inf, "-Inf": -np.inf}


@pytest.fixture(scope="module")
def multi_frame_params() -> np.ndarray:
    return np.random.default_rng(3).standard_normal(_MULTI_N, dtype=np.float32)


@pytest.mark.parametrize("value", list(_NON_FINITE.values()), ids=list(_NON_FINITE))
@pytest.mark.parametrize("pos", list(_POSITIONS.values()), ids=list(_POSITIONS))
def test_non_finite_value_anywhere_in_a_multi_frame_array_is_refused(
    multi_frame_params, pos, value
):
    """NaN, +Inf or -Inf at the edges of each frame or inside one: WireError."""
    params = multi_frame_params.copy()
    params[pos] = value
    frames = encode("model", 1, 2, SCENARIO, arrays={"params": params})
    assert len(frames) == 4
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(frames, _MULTI)


def test_multi_frame_template_is_accepted(multi_frame_params):
    """The array the table above pokes holes in decodes when left alone."""
    frames = encode("model", 1, 2, SCENARIO, arrays={"params": multi_frame_params})
    np.testing.assert_array_equal(decode(frames, _MULTI).arrays["params"], multi_frame_params)


def test_extreme_finite_values_are_accepted():
    """The largest and smallest float32 values (and subnormals, and -0.0) are finite: kept."""
    info = np.finfo(np.float32)
    params = np.array(
        [info.max, -info.max, info.max, info.tiny, info.smallest_subnormal, -0.0, 0, 1, 2, 3],
        np.float32,
    )
    msg = decode(encode("model", 1, 2, SCENARIO, arrays={"params": params}), EXPECT)
    np.testing.assert_array_equal(msg.arrays["params"], params)


# Room for up to six frames of one small array: each extra expected array adds one.
_SPLIT = Expect(SCENARIO, 7, {"params": (N,), **{f"pad{i}": (1,) for i in range(5)}})


@st.composite
def _split_with_a_non_finite(draw) -> list[bytes]:
    """A 10-element model cut at random element boundaries, one value NaN or ±Inf."""
    values = np.array(
        draw(
            st.lists(
                st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=N, max_size=N
            )
        ),
        np.float32,
    )
    pos = draw(st.integers(0, N - 1))
    values[pos] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    cuts = sorted(draw(st.sets(st.integers(1, N - 1), max_size=5)))
    bounds = [0, *cuts, N]
    body = [values[a:b].tobytes() for a, b in itertools.pairwise(bounds)]
    header = msgpack.packb(_header(arrays=[_desc(frames=len(body))]))
    return [header, *body]


@settings(max_examples=200, deadline=None, database=None)
@given(_split_with_a_non_finite())
def test_non_finite_in_any_frame_of_any_split_is_refused(frames):
    """However the array is cut into frames, a NaN or ±Inf in any of them is refused."""
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(frames, _SPLIT)


# ---- the fused finiteness check and its exact fallback ----

_F32 = np.finfo(np.float32)
_HUGE = [_F32.max, -_F32.max, 1e20, -1e20, 2e19]  # finite, but their squares overflow float32
_element = st.floats(width=32) | st.sampled_from([*_HUGE, np.nan, np.inf, -np.inf])


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_element, max_size=70))
def test_all_finite_is_exactly_isfinite_all(values):
    """The fused check agrees with `np.isfinite(x).all()` on any float32 array, empty too."""
    x = np.array(values, np.float32)
    assert wire._all_finite(x) is bool(np.isfinite(x).all())


def _overflowing(n: int) -> np.ndarray:
    """A finite array of ±float32 max, whose sum of squares overflows in every frame."""
    return np.where(np.arange(n) % 2 == 0, _F32.max, -_F32.max).astype(np.float32)


def test_finite_model_whose_fused_sum_overflows_is_accepted():
    """Every frame's sum of squares is +Inf, yet all values are finite: the fallback keeps it."""
    params = _overflowing(_MULTI_N)
    for chunk in np.split(params, [_FRAME_N, 2 * _FRAME_N]):
        with np.errstate(over="ignore"):
            assert not math.isfinite(np.dot(chunk, chunk))  # so the exact check decides
    msg = decode(encode("model", 1, 2, SCENARIO, arrays={"params": params}), _MULTI)
    np.testing.assert_array_equal(msg.arrays["params"], params)


@pytest.mark.parametrize("value", list(_NON_FINITE.values()), ids=list(_NON_FINITE))
@pytest.mark.parametrize(
    "pos",
    [_POSITIONS[k] for k in ("first element", "middle of frame 2", "last element")],
    ids=["first", "middle", "last"],
)
def test_non_finite_among_overflowing_values_is_refused(pos, value):
    """A NaN or ±Inf hidden among finite values that overflow the fused sum: still refused."""
    params = _overflowing(_MULTI_N)
    params[pos] = value
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(encode("model", 1, 2, SCENARIO, arrays={"params": params}), _MULTI)


@pytest.mark.parametrize("value", list(_NON_FINITE.values()), ids=list(_NON_FINITE))
@pytest.mark.parametrize("pos", [0, N // 2, N - 1], ids=["first", "middle", "last"])
def test_non_finite_in_a_single_frame_is_refused(pos, value):
    """NaN, -NaN, +Inf or -Inf as the first, a middle or the last of one frame: WireError."""
    params = np.linspace(-1, 1, N, dtype=np.float32)
    params[pos] = value
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(encode("model", 1, 2, SCENARIO, arrays={"params": params}), EXPECT)


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


@pytest.mark.parametrize("field", ["v", "type", "scenario", "sender", "round"])
def test_deeply_nested_header_values_are_refused_not_crashed_on(field):
    """A value nested ~1000 deep (msgpack allows it) is a WireError, never a RecursionError."""
    deep: object = None
    for _ in range(1000):
        deep = [deep]
    h = {"v": 1, "type": "model", "sender": 0, "round": 0, "scenario": "s", "meta": {}}
    h["arrays"] = []
    h[field] = deep
    with pytest.raises(wire.WireError):
        wire.decode([msgpack.packb(h)], wire.Expect("s", 3, {}))


@pytest.mark.parametrize("key", ["name", "dtype", "frames"])
def test_deeply_nested_descriptor_values_are_refused(key):
    """The same for an array descriptor's fields."""
    deep: object = None
    for _ in range(1000):
        deep = [deep]
    d = {"name": "params", "dtype": "float32", "shape": [2], "frames": 1}
    d[key] = deep
    h = {"v": 1, "type": "model", "sender": 0, "round": 0, "scenario": "s", "meta": {}}
    h["arrays"] = [d]
    with pytest.raises(wire.WireError):
        wire.decode([msgpack.packb(h), bytes(8)], wire.Expect("s", 3, {"params": (2,)}))
