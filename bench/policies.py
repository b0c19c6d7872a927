"""Health policies on one simulated month of a fleet: QR re-scans against messages lost and broken sessions.

    python -m bench.policies [--sessions 1000] [--days 30] [--rates 0.0005,0.002,0.005] [--seed 7]

One trace per fault rate, run through the seed's policy (`counters`), the windowed policy and the loss-aware policy
(sidecar/rules/policy.py `decide`, with rules/loss.py's deadline for loss-aware). The faults are produced with real
cryptography (sidecar/sim/crypto.py: X25519, HKDF-SHA256, AES-256-CBC, HMAC) and their error texts classified by
the sidecar's own rules (rules/classification.py). The fault model, its parameters printed with the figures:
- transient peer-session faults: an inbound message finds its peer session desynchronized with probability
  `rate` and fails MAC verification ("Bad MAC"); the phone's retry receipt is answered by the sender with
  probability `--answered`: a new session (X25519 again) and the same message re-encrypted, which decrypts (the
  rest are never re-sent: lost);
- stale app-state keys: a session has a burst of 1 to 3 patches under a corrupted app-state-sync key on a day with
  probability `--stale-app-state` ("bad decrypt" from the unpadding, or "Invalid patch mac"; no message id:
  counted at once by every policy; healed);
- truly broken sessions: a share `--broken` of the sessions breaks at a random time (its own keys: every session
  with it is desynchronized, the retry's new one too): from then on every message and its re-send fail, until the
  session is logged out (the customer re-scans; the new pairing is healthy);
- every session reconnects every `--reconnect-hours` (an open resets the counters, as in the seed).
Per policy: logouts (QR re-scans) per 1,000 session-months, needless ones (of sessions not broken), messages lost
(failed and never recovered, including those of a broken session while it stays open), broken sessions never
closed, and how long a broken session stays open (p50, max).

The messages in between that decrypt are counted, not encrypted (a month is 6 million of them per trace); every
message that fails, and every re-send, is real ciphertext. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.rules.classification import ErrorClass, ErrorSource, classify
from sidecar.rules.loss import DEFAULT_DEADLINE_SECONDS
from sidecar.rules.policy import (
    ZERO,
    BadDecrypt,
    BadMac,
    Close,
    ConnectionOpened,
    HealthPolicy,
    Phase,
    PolicyConfig,
    SessionState,
    decide,
)
from sidecar.sim.crypto import AppStateKey, DecryptFailure, PeerSession, corrupt

DAY = 86_400.0
POLICIES = (HealthPolicy.COUNTERS, HealthPolicy.WINDOWED, HealthPolicy.LOSS_AWARE)


@dataclass(frozen=True)
class Failure:
    at: float
    kind: str  # "mac" (a message with an id) or "decrypt" (app state, no id)
    recovered: bool
    peer: str | None = None


@dataclass
class SessionTrace:
    failures: list[Failure]
    broken_at: float | None
    rate_per_second: float  # inbound messages


@dataclass
class Figures:
    logouts: int = 0
    needless: int = 0
    lost: int = 0
    never_closed: int = 0
    open_while_broken: list[float] = field(default_factory=list)


@dataclass
class Crypto:
    """What the trace's real cryptography did."""

    failed: int = 0  # messages that failed MAC verification
    resent: int = 0  # re-sends after a retry receipt that decrypted
    resend_failed: int = 0  # re-sends that failed too (a broken phone)
    patches_failed: int = 0


PEERS = 50


def transient_failure(rng: random.Random, peers: dict[str, PeerSession], args: argparse.Namespace,
                      crypto: Crypto) -> tuple[str, bool]:  # fmt: skip
    """A message on a desynchronized peer session: it must fail as Bad MAC; then the sender answers the retry
    receipt (or not). Returns (peer, recovered)."""
    peer = f"peer{rng.randrange(PEERS)}"
    session = peers.setdefault(peer, PeerSession())
    plaintext = f"message {crypto.failed}".encode()
    session.desynchronize()
    text = _failure_text(lambda: session.deliver(plaintext))
    assert classify(text, ErrorSource.MESSAGE) is ErrorClass.BAD_MAC, text
    crypto.failed += 1
    if rng.random() >= args.answered:
        return peer, False  # never re-sent
    assert session.retry(plaintext) == plaintext  # a new session from the phone's fresh key bundle: decrypts
    crypto.resent += 1
    return peer, True


def broken_failure(crypto: Crypto) -> None:
    """A message to a phone whose own keys are broken: it fails, and its re-send fails too."""
    session = PeerSession()
    session.desynchronize()
    text = _failure_text(lambda: session.deliver(b"to a broken phone"))
    assert classify(text, ErrorSource.MESSAGE) is ErrorClass.BAD_MAC, text
    assert classify(_failure_text(lambda: session.retry(b"to a broken phone", receiver_broken=True)),
                    ErrorSource.MESSAGE) is ErrorClass.BAD_MAC  # fmt: skip
    crypto.failed += 1
    crypto.resend_failed += 1


def stale_patch(crypto: Crypto) -> None:
    server = AppStateKey()
    patch = server.encrypt(b'{"index":["mute","15550000000@s.whatsapp.net"],"value":true}')
    text = _failure_text(lambda: corrupt(server).decrypt(patch))
    assert classify(text, ErrorSource.APP_STATE) is ErrorClass.BAD_DECRYPT, text
    crypto.patches_failed += 1


def _failure_text(attempt: Callable[[], bytes]) -> str:
    try:
        attempt()
    except DecryptFailure as failure:
        return str(failure)
    raise AssertionError("the faulty decryption succeeded")


def trace_of(rng: random.Random, args: argparse.Namespace, rate: float, crypto: Crypto) -> list[SessionTrace]:
    month = args.days * DAY
    sessions = []
    for _ in range(args.sessions):
        per_second = args.messages_per_day / DAY
        failures: list[Failure] = []
        peers: dict[str, PeerSession] = {}
        # transient faults: a Poisson process of failing messages
        t = rng.expovariate(per_second * rate) if rate > 0 else month
        while t < month:
            peer, recovered = transient_failure(rng, peers, args, crypto)
            failures.append(Failure(t, "mac", recovered, peer))
            t += rng.expovariate(per_second * rate)
        for day in range(args.days):
            if rng.random() < args.stale_app_state:
                start = day * DAY + rng.random() * DAY
                for n in range(rng.randint(1, 3)):
                    stale_patch(crypto)
                    failures.append(Failure(start + n * 30.0, "decrypt", False))
        broken_at = rng.random() * month if rng.random() < args.broken else None
        sessions.append(SessionTrace(sorted(failures, key=lambda f: f.at), broken_at, per_second))
    return sessions


def run(policy: HealthPolicy, sessions: list[SessionTrace], args: argparse.Namespace, crypto: Crypto) -> Figures:
    config = PolicyConfig(health=policy)
    month, deadline, reconnect = args.days * DAY, args.loss_deadline, args.reconnect_hours * 3600.0
    figures = Figures()
    for trace in sessions:
        # the broken session's failures: every message from broken_at until it is closed
        queue: list[tuple[float, int, str, Failure | None]] = []  # (time, order, what, failure)
        order = 0
        for drawn in trace.failures:
            queue.append((drawn.at, order, "fail", drawn))
            order += 1
        t = reconnect
        while t < month:
            queue.append((t, order, "open", None))
            order += 1
            t += reconnect
        if trace.broken_at is not None:
            queue.append((trace.broken_at, order, "next-broken", None))
            order += 1
        heapq.heapify(queue)
        state = SessionState(ZERO, Phase.ACTIVE)
        broken_since = trace.broken_at
        closed_broken = False
        while queue:
            at, _, what, failure = heapq.heappop(queue)
            if at >= month:
                break
            event: BadMac | BadDecrypt | ConnectionOpened
            if what == "open":
                event = ConnectionOpened()
            elif what == "next-broken":
                if closed_broken:
                    continue
                broken_failure(crypto)
                failure = Failure(at, "mac", False, f"peer{order % PEERS}")  # its own keys: every peer fails
                heapq.heappush(queue, (at + 1 / trace.rate_per_second, order, "next-broken", None))
                order += 1
                event = _error(failure, policy, deadline, queue, order)
                order += 1
            elif what == "late":
                assert failure is not None
                event = BadMac(failure.peer, at, late=True)
            else:
                assert failure is not None
                event = _error(failure, policy, deadline, queue, order)
                order += 1
            if failure is not None and what != "late" and failure.kind == "mac" and not failure.recovered:
                figures.lost += 1
            transition = decide(state, event, config)
            state = transition.state
            if isinstance(transition.decision, Close):
                figures.logouts += 1
                broken = broken_since is not None and at >= broken_since and not closed_broken
                if broken:
                    figures.open_while_broken.append(at - broken_since)  # type: ignore[operator]
                    closed_broken = True
                else:
                    figures.needless += 1
                state = SessionState(ZERO, Phase.ACTIVE)  # re-scanned: a new pairing (a broken one is healthy now)
                # what was pending belongs to the old pairing
                queue = [item for item in queue if item[2] != "late"]
                heapq.heapify(queue)
        if broken_since is not None and not closed_broken and broken_since < month:
            figures.never_closed += 1
            figures.open_while_broken.append(month - broken_since)
    return figures


def _error(
    failure: Failure,
    policy: HealthPolicy,
    deadline: float,
    queue: list[tuple[float, int, str, Failure | None]],
    order: int,
) -> BadMac | BadDecrypt:
    """The failure as the policy sees it: under loss-aware a Bad MAC of a message is pending, and counted at its
    deadline if nothing recovered it."""
    if failure.kind == "decrypt":
        return BadDecrypt(failure.at)
    if policy is HealthPolicy.LOSS_AWARE:
        if not failure.recovered:
            heapq.heappush(queue, (failure.at + deadline, order, "late", failure))
        return BadMac(failure.peer, failure.at, pending=True)
    return BadMac(failure.peer, failure.at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rates", default="0.0005,0.002,0.005", help="transient Bad MAC per inbound message")
    parser.add_argument("--messages-per-day", type=float, default=200.0)
    parser.add_argument("--answered", type=float, default=0.97, help="share of retry receipts the sender answers")
    parser.add_argument("--stale-app-state", type=float, default=0.01, help="per session and day")
    parser.add_argument("--broken", type=float, default=0.005, help="share of sessions that truly break")
    parser.add_argument("--reconnect-hours", type=float, default=8.0)
    parser.add_argument("--loss-deadline", type=float, default=DEFAULT_DEADLINE_SECONDS)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(
        f"fault model: {args.sessions} sessions x {args.days} days, {args.messages_per_day:g} inbound messages per "
        f"session-day, retry receipts answered {args.answered:.0%}, stale app-state bursts "
        f"{args.stale_app_state:g}/session-day, truly broken sessions {args.broken:.1%}, reconnect every "
        f"{args.reconnect_hours:g} h, loss deadline {args.loss_deadline:g} s; seed {args.seed}; real crypto for every "
        "failing message and re-send"
    )
    session_months = args.sessions * args.days / 30.0
    print(f"{'rate':>8} {'policy':>10} {'logouts/1k':>11} {'needless':>9} {'lost':>7} {'never closed':>13} "
          f"{'open broken p50':>16} {'max':>9}")  # fmt: skip
    for rate in (float(r) for r in args.rates.split(",")):
        crypto = Crypto()
        sessions = trace_of(random.Random(args.seed), args, rate, crypto)
        results = {policy: run(policy, sessions, args, crypto) for policy in POLICIES}
        seed = results[HealthPolicy.COUNTERS]
        for policy, figures in results.items():
            opened = figures.open_while_broken or [0.0]
            print(
                f"{rate:>8g} {policy:>10} {figures.logouts * 1000 / session_months:>11.1f} {figures.needless:>9} "
                f"{figures.lost:>7} {figures.never_closed:>13} {statistics.median(opened):>15.0f}s "
                f"{max(opened):>8.0f}s"
            )
        aware = results[HealthPolicy.LOSS_AWARE]
        fewer = 1 - aware.logouts / seed.logouts if seed.logouts else 0.0
        print(f"{'':>8} loss-aware vs the seed's: {fewer:.0%} fewer logouts, lost {aware.lost - seed.lost:+d}")
        print(f"{'':>8} crypto: {crypto.failed} messages failed MAC verification ({crypto.resent} re-sends decrypted, "
              f"{crypto.resend_failed} failed too), {crypto.patches_failed} patches failed to decrypt")  # fmt: skip


if __name__ == "__main__":
    main()
