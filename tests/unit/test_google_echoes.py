"""The Google connector's expected-echo credits and remembered etags: what decides that a push
costs nothing, and that a listed session event needs no text read."""

from __future__ import annotations

from syncbridge_connectors.google_calendar.echoes import EchoCredits, KnownEtags


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_write_makes_one_push_an_echo_in_its_own_calendar() -> None:
    """Two writes to calendar A: two pushes for A are echoes, a third is pulled; B's pushes are never A's echoes."""
    credits = EchoCredits(60, clock=Clock())
    credits.expect("a")
    credits.expect("a")
    assert not credits.consume("b")
    assert credits.consume("a") and credits.consume("a")
    assert not credits.consume("a")


def test_a_credit_expires_after_the_window() -> None:
    """A push arriving after the window (Google dropped our echo long ago) is an outside change and is pulled."""
    clock = Clock()
    credits = EchoCredits(60, clock=clock)
    credits.expect("a")
    clock.now += 60.5
    assert not credits.consume("a")
    credits.expect("a")
    clock.now += 59
    assert credits.consume("a")


def test_a_refused_write_leaves_no_credit() -> None:
    """A write Google refused notifies nothing: the next push for that calendar is pulled."""
    credits = EchoCredits(60, clock=Clock())
    credits.expect("a")
    credits.withdraw("a")
    credits.withdraw("a")  # nothing left to withdraw: harmless
    assert not credits.consume("a")


def test_a_zero_window_turns_credits_off() -> None:
    credits = EchoCredits(0, clock=Clock())
    credits.expect("a")
    assert not credits.consume("a")


def test_known_etags_are_bounded_and_forget_deleted_events() -> None:
    """Only the last etag counts; the least recently used entries go beyond the bound."""
    etags = KnownEtags(limit=2)
    etags.note("cal/x", '"1"')
    assert etags.knows("cal/x", '"1"') and not etags.knows("cal/x", '"2"')
    etags.note("cal/y", '"1"')
    etags.knows("cal/x", '"1"')  # x used again: y is now the oldest
    etags.note("cal/z", '"1"')
    assert len(etags) == 2 and etags.knows("cal/x", '"1"') and not etags.knows("cal/y", '"1"')
    etags.note("cal/x", None)
    assert not etags.knows("cal/x", '"1"')
