"""Restriction lines in a Baileys (7.x) log: the `account.restriction` fields each one means, as the adapter
reports the same from Baileys' events (integrations/baileys/index.cjs). Pure: no I/O, no clock.

- `reachout timelock restriction set` (`enforcementType`, `timeEnforcementEnds`) / `… lifted`;
- `received message capping update` (`payload.capping_status`, `CAPPED` is in force);
- `error 463: account restricted or missing tctoken for contact` and `smax-invalid (479): …`: a refused message
  (held by the sidecar for an hour after the last one; rules/restrictions.py).

A close with 402, 403 or 405 is logged as `connection errored` with "Connection Failure" and no status code:
the log cannot say which, so those are the adapter's alone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sidecar.rules.restrictions import RestrictionKind

NEEDLES: Final = (
    "reachout timelock restriction",
    "received message capping update",
    "error 463:",
    "smax-invalid (479)",
)
TIMELOCK_SET: Final = "reachout timelock restriction set"
TIMELOCK_LIFTED: Final = "reachout timelock restriction lifted"
CAPPING: Final = "received message capping update"
REFUSALS: Final = {"error 463:": (RestrictionKind.ACK_463, 463), "smax-invalid (479)": (RestrictionKind.ACK_479, 479)}
NO_ENFORCEMENT: Final = "DEFAULT"  # Baileys' ReachoutTimelockEnforcementType for "no restriction"


def restriction_fields(record: dict[str, Any]) -> dict[str, Any] | None:
    """The event's restriction fields (kind, active, and until/code/detail where the line has them), or None."""
    message = record.get("msg")
    if not isinstance(message, str):
        return None
    if message == TIMELOCK_SET:
        kind = record.get("enforcementType")
        return _fields(
            RestrictionKind.REACHOUT_TIMELOCK, True, until=_instant(record.get("timeEnforcementEnds")),
            detail=kind if isinstance(kind, str) and kind != NO_ENFORCEMENT else None,
        )  # fmt: skip
    if message == TIMELOCK_LIFTED:
        return _fields(RestrictionKind.REACHOUT_TIMELOCK, False)
    if message == CAPPING:
        payload = record.get("payload")
        status = payload.get("capping_status") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or not isinstance(status, str):
            return None
        if status != "CAPPED":
            return _fields(RestrictionKind.MESSAGE_CAP, False)
        total, used = payload.get("total_quota"), payload.get("used_quota")
        quota = f" {used if used is not None else '?'}/{total} new chats this cycle" if isinstance(total, int) else ""
        return _fields(
            RestrictionKind.MESSAGE_CAP, True, until=_instant(payload.get("cycle_end_timestamp")),
            detail=f"{status}{quota}",
        )  # fmt: skip
    for prefix, (kind, code) in REFUSALS.items():
        if message.startswith(prefix):
            return _fields(kind, True, code=code, detail=message.split(": ", 1)[-1].split(" — ", 1)[0])
    return None


def _fields(kind: RestrictionKind, active: bool, **optional: object) -> dict[str, Any]:
    return {"kind": str(kind), "active": active} | {name: value for name, value in optional.items() if value}


def _instant(value: object) -> str | None:
    """An RFC 3339 instant with its zone (pino's Date) or Unix seconds as text (the capping cycle's end)."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 12:
        return datetime.fromtimestamp(int(value), UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return value if moment.tzinfo is not None else None
    return None
