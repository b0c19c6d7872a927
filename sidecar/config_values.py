"""Reading one setting's text (a flag's or an environment variable's) into its value, or a ConfigError that
names the setting and says what is wrong."""

from __future__ import annotations

import re

_TEAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


class ConfigError(ValueError):
    """A bad setting; `key` names the flag or variable."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def positive_int(key: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(key, f"must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(key, f"must be a positive integer, got {raw!r}")
    return value


def positive_float(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(key, f"must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(key, f"must be greater than 0, got {raw!r}")
    return value


DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def duration(key: str, raw: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `30d` as seconds (greater than 0)."""
    text = raw.strip()
    unit = DURATION_UNITS.get(text[-1:].lower())
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise ConfigError(key, f"must be a duration like 3600, 90s, 15m, 12h or 30d, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(key, f"must be greater than 0, got {raw!r}")
    return value


def boolean(key: str, raw: str) -> bool:
    folded = raw.strip().lower()
    if folded in {"1", "true", "yes", "on"}:
        return True
    if folded in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(key, f"must be true or false, got {raw!r}")


def listen_address(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ConfigError("listen", f"must be host:port, got {raw!r}")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError("listen", f"port must be a number from 0 to 65535 (0: any free port), got {port!r}")
    port_number = int(port)
    return host.strip("[]"), port_number


def status_codes(raw: str) -> frozenset[int]:
    codes = [part.strip() for part in raw.split(",") if part.strip()]
    result = set()
    for code in codes:
        value = positive_int("critical-status-codes", code)
        if not 100 <= value <= 599:
            raise ConfigError("critical-status-codes", f"{value} is not a status code (100-599)")
        result.add(value)
    return frozenset(result)


def organization_teams(raw: str) -> dict[int, str]:
    teams: dict[int, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        organization, sep, team = item.partition("=")
        if not sep:
            raise ConfigError("organization-teams", f"expected organizationId=team, got {item!r}")
        organization_id = positive_int("organization-teams", organization.strip())
        if not _TEAM.match(team.strip()):
            raise ConfigError("organization-teams", f"team {team!r} must be 1-63 letters, digits, '_', '-' or '.'")
        teams[organization_id] = team.strip()
    return teams


MIN_TOKEN_LENGTH = 16


def bearer_token(key: str, raw: str) -> str:
    """A bearer token from the environment: at least MIN_TOKEN_LENGTH printable ASCII characters, no spaces. The
    problem never repeats the value (it is a secret)."""
    if len(raw) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            key,
            f"must be at least {MIN_TOKEN_LENGTH} characters, got {len(raw)}: a short token is guessable "
            "(generate one with `openssl rand -hex 24`)",
        )
    if not all("!" <= c <= "~" for c in raw):
        raise ConfigError(key, "must be printable ASCII without spaces (an HTTP Authorization header carries it)")
    return raw
