"""The liveness tracker shared by every role: a fake clock, explicit `now`."""

from __future__ import annotations

import pytest

from p2pfl.protocol.liveness import Liveness


def test_silence_makes_gone_and_speaking_takes_back():
    """Silent for timeout_s: gone (with its silence); speaking again: back (True once)."""
    lv = Liveness([1, 2], timeout_s=2.0)
    lv.heard(1, 1.0)
    lv.heard(2, 1.5)
    assert lv.expire(2.9) == []
    assert lv.expire(3.0) == [(1, 2.0)]
    assert lv.alive() == {2} and lv.gone == {1}
    assert lv.expire(3.2) == []  # declared gone once
    assert lv.heard(1, 4.0) is True and lv.heard(1, 4.1) is False
    assert lv.alive() == {1, 2} and lv.gone == set()


def test_grace_counts_as_heard_until_the_first_word():
    """A party never heard is judged timeout_s after the grace; its first word ends the
    grace (its silence counts from then), later words never move time back."""
    lv = Liveness([1, 2], timeout_s=1.0, grace_until=10.0)
    assert lv.expire(10.9) == [] and lv.silent_s(1, 5.0) == -5.0
    lv.heard(1, 3.0)
    assert lv.expire(4.0) == [(1, 1.0)]
    lv.heard(2, 10.5)
    lv.heard(2, 10.2)  # an older time from another thread: ignored
    assert lv.last_heard[2] == 10.5
    assert lv.expire(11.5) == [(2, 1.0)]


def test_bye_is_gone_without_expiry_and_next_expiry_names_the_first():
    """left(): gone at once, True only the first time; next_expiry: seconds until the first
    of `among` is gone, inf if none, never negative."""
    lv = Liveness([1, 2, 3], timeout_s=2.0)
    for j, t in ((1, 0.0), (2, 1.0), (3, 1.5)):
        lv.heard(j, t)
    assert lv.left(3) is True and lv.left(3) is False and lv.left(9) is False
    assert lv.alive() == {1, 2}
    assert lv.next_expiry(0.5, [1, 2]) == 1.5
    assert lv.next_expiry(0.5, [2]) == 2.5
    assert lv.next_expiry(5.0, [1]) == 0.0
    assert lv.next_expiry(0.5, []) == float("inf")


def test_add_forget_fresh_and_bad_timeout():
    """add tracks from now (not gone), forget drops it, fresh lists those heard lately."""
    lv: Liveness[int] = Liveness([], timeout_s=1.0)
    lv.add(4, 2.0)
    assert 4 in lv and lv.fresh(2.5) == [4] and lv.fresh(3.0) == []
    assert lv.expire(3.0) == [(4, 1.0)]
    lv.add(4, 3.5)
    assert lv.alive() == {4}
    lv.forget(4)
    assert 4 not in lv and lv.alive() == set()
    with pytest.raises(KeyError):
        lv.heard(4, 4.0)
    with pytest.raises(ValueError, match="positive"):
        Liveness([1], timeout_s=0.0)
