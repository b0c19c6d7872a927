"""The restriction book's rules: what is news, what ends by itself, and how a refusal (463/479) is held."""

from sidecar.rules.restrictions import (
    REFUSAL_HOLD_SECONDS,
    Change,
    Restriction,
    RestrictionBook,
    RestrictionKind,
)

PHONE = 42


def test_a_time_lock_starts_updates_and_ends_by_itself() -> None:
    book = RestrictionBook()
    lock = Restriction(RestrictionKind.REACHOUT_TIMELOCK, True, at=100.0, until=200.0)
    assert book.report(PHONE, lock, now=100.0) is Change.STARTED
    assert book.report(PHONE, lock, now=101.0) is Change.NONE
    later = Restriction(RestrictionKind.REACHOUT_TIMELOCK, True, at=150.0, until=300.0)
    assert book.report(PHONE, later, now=150.0) is Change.UPDATED
    assert book.of(PHONE, now=150.0)[0].at == 100.0  # keeps the time it started
    assert book.expired(now=299.0) == []
    assert [r.kind for _, r in book.expired(now=300.0)] == [RestrictionKind.REACHOUT_TIMELOCK]
    assert len(book) == 0


def test_a_lift_of_nothing_held_is_still_a_lift_for_the_shared_timeline() -> None:
    book = RestrictionBook()
    lifted = Restriction(RestrictionKind.FORBIDDEN, False, at=1.0)
    assert book.report(PHONE, lifted, now=1.0) is Change.LIFTED


def test_a_refusal_is_held_for_an_hour_after_the_last_one_and_repeats_within_a_minute_change_nothing() -> None:
    book = RestrictionBook()
    refused = Restriction(RestrictionKind.ACK_463, True, at=1000.0, code=463)
    assert book.report(PHONE, refused, now=1000.0) is Change.STARTED
    (held,) = book.of(PHONE, now=1000.0)
    assert held.until == 1000.0 + REFUSAL_HOLD_SECONDS
    again = Restriction(RestrictionKind.ACK_463, True, at=1030.0, code=463)
    assert book.report(PHONE, again, now=1030.0) is Change.NONE
    assert book.of(PHONE, now=1030.0)[0].until == 1000.0 + REFUSAL_HOLD_SECONDS
    later = Restriction(RestrictionKind.ACK_463, True, at=1100.0, code=463)
    assert book.report(PHONE, later, now=1100.0) is Change.UPDATED
    assert book.of(PHONE, now=1100.0)[0].until == 1100.0 + REFUSAL_HOLD_SECONDS
    assert book.expired(now=1100.0 + REFUSAL_HOLD_SECONDS)[0][1].kind is RestrictionKind.ACK_463


def test_a_lock_without_an_end_is_not_held_for_an_hour() -> None:
    book = RestrictionBook()
    ban = Restriction(RestrictionKind.FORBIDDEN, True, at=5.0, code=403)
    book.report(PHONE, ban, now=5.0)
    assert book.of(PHONE, now=1e9)[0].until is None


def test_an_open_connection_ends_a_ban_a_403_and_a_405_but_not_a_time_lock() -> None:
    book = RestrictionBook()
    for kind in (RestrictionKind.TEMPORARY_BAN, RestrictionKind.CLIENT_OUTDATED, RestrictionKind.REACHOUT_TIMELOCK):
        book.report(PHONE, Restriction(kind, True, at=1.0, until=1e9), now=1.0)
    ended = book.opened(PHONE)
    assert [r.kind for r in ended] == [RestrictionKind.CLIENT_OUTDATED, RestrictionKind.TEMPORARY_BAN]
    assert [r.kind for r in book.of(PHONE, now=2.0)] == [RestrictionKind.REACHOUT_TIMELOCK]
    assert book.opened(PHONE) == []
