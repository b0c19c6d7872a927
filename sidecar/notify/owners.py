"""The owners file: which team owns each organization (or single phone), and each team's webhook.

    defaultTeam: platform
    teams:
      platform: {webhookUrl: https://hooks.example.com/platform, secretEnv: PLATFORM_WEBHOOK_SECRET}
      sales:    {webhookUrl: https://hooks.example.com/sales, secretFile: /run/secrets/sales}
    organizations: {"7": sales}
    phones: {"42": platform}          # optional override by organizationPhoneId

Secrets never sit in the file: each team names an environment variable or a file. A file that does not
validate is refused with the key that is wrong; `OwnersWatcher` keeps the previous mapping in force then.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

log = logging.getLogger("sidecar.owners")

UNASSIGNED = "unassigned"
_TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_TOP_LEVEL = {"defaultTeam", "teams", "organizations", "phones"}


WHOLE_FILE = "(file)"  # the key of a problem with the file itself (unreadable, not YAML, not a mapping)


class OwnersError(ValueError):
    """A problem with the owners file; said after the file's path, so one with the whole file names no key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem if key == WHOLE_FILE else f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Team:
    name: str
    webhook_url: str
    secret: bytes = field(repr=False)
    previous_secret: bytes | None = field(default=None, repr=False)  # rotation: deliveries carry both signatures

    @property
    def secrets(self) -> tuple[bytes, ...]:
        return (self.secret,) if self.previous_secret is None else (self.secret, self.previous_secret)


@dataclass(frozen=True)
class Owners:
    default_team: str | None = None
    teams: Mapping[str, Team] = field(default_factory=dict)
    organizations: Mapping[int, str] = field(default_factory=dict)
    phones: Mapping[int, str] = field(default_factory=dict)

    def team_name(self, organization_id: int, organization_phone_id: int | None = None) -> str:
        if organization_phone_id is not None and organization_phone_id in self.phones:
            return self.phones[organization_phone_id]
        return self.organizations.get(organization_id) or self.default_team or UNASSIGNED

    def team(self, organization_id: int, organization_phone_id: int | None = None) -> Team | None:
        return self.teams.get(self.team_name(organization_id, organization_phone_id))


def _mapping(value: object, key: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OwnersError(key, "must be a mapping")
    return value


def _id(raw: object, key: str) -> int:
    text = str(raw)
    if isinstance(raw, bool) or not text.isdigit() or int(text) < 1:
        raise OwnersError(key, f"{raw!r} is not a positive integer id")
    return int(text)


def _secret(spec: dict[Any, Any], key: str, env: Mapping[str, str], prefix: str = "secret") -> bytes | None:
    """The team's secret from `<prefix>Env` or `<prefix>File` (`previousSecret…`: optional, for rotation)."""
    if "secret" in spec:
        raise OwnersError(f"{key}.secret", "secrets never sit in the owners file; use secretEnv or secretFile")
    env_key, file_key = f"{prefix}Env", f"{prefix}File"
    has_env, has_file = env_key in spec, file_key in spec
    if not has_env and not has_file and prefix != "secret":
        return None
    if has_env == has_file:
        raise OwnersError(key, f"needs exactly one of {env_key} or {file_key}")
    if has_env:
        name = spec[env_key]
        if not isinstance(name, str) or not name:
            raise OwnersError(f"{key}.{env_key}", "must name an environment variable")
        value = env.get(name)
        if not value:
            raise OwnersError(f"{key}.{env_key}", f"environment variable {name} is not set or empty")
        return _key_bytes(value.encode(), f"{key}.{env_key}")
    path = spec[file_key]
    if not isinstance(path, str) or not path:
        raise OwnersError(f"{key}.{file_key}", "must be a file path")
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as error:
        raise OwnersError(f"{key}.{file_key}", f"cannot read {path}: {error.strerror}") from None
    if not secret:
        raise OwnersError(f"{key}.{file_key}", f"{path} is empty")
    return _key_bytes(secret, f"{key}.{file_key}")


def _key_bytes(secret: bytes, field_name: str) -> bytes:
    """A Standard Webhooks secret (`whsec_<base64>`) is its decoded bytes; any other secret is used as written."""
    if not secret.startswith(b"whsec_"):
        return secret
    try:
        key = base64.b64decode(secret[len(b"whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise OwnersError(field_name, "a whsec_ secret must be base64 after the prefix") from None
    if not key:
        raise OwnersError(field_name, "the whsec_ secret is empty")
    return key


_TEAM_KEYS = {"webhookUrl", "secretEnv", "secretFile", "previousSecretEnv", "previousSecretFile", "secret"}


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's problem and where, on one line (its own text spans four, with a caret)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def parse_owners(text: str, env: Mapping[str, str]) -> Owners:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise OwnersError(WHOLE_FILE, f"not valid YAML: {_one_line(error)}") from None
    root = _mapping(document, WHOLE_FILE)
    unknown = set(root) - _TOP_LEVEL
    if unknown:
        raise OwnersError(sorted(map(str, unknown))[0], f"unknown key; expected {', '.join(sorted(_TOP_LEVEL))}")
    teams: dict[str, Team] = {}
    for name, spec in _mapping(root.get("teams"), "teams").items():
        key = f"teams.{name}"
        if not isinstance(name, str) or not _TEAM_NAME.match(name):
            raise OwnersError(key, "team names are 1-63 letters, digits, '_', '-' or '.'")
        spec = _mapping(spec, key)
        url = spec.get("webhookUrl")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise OwnersError(f"{key}.webhookUrl", "must be an http(s) URL")
        extra = set(spec) - _TEAM_KEYS
        if extra:
            raise OwnersError(f"{key}.{sorted(map(str, extra))[0]}", "unknown key")
        secret = _secret(spec, key, env)
        assert secret is not None  # required: _secret raised otherwise
        teams[name] = Team(name, str(url), secret, _secret(spec, key, env, prefix="previousSecret"))

    def team_ref(value: object, key: str) -> str:
        if not isinstance(value, str) or value not in teams:
            raise OwnersError(key, f"unknown team {value!r}; teams: {', '.join(sorted(teams)) or '(none)'}")
        return value

    default = root.get("defaultTeam")
    default_team = team_ref(default, "defaultTeam") if default is not None else None
    organizations = {
        _id(org, f"organizations.{org}"): team_ref(team, f"organizations.{org}")
        for org, team in _mapping(root.get("organizations"), "organizations").items()
    }
    phones = {
        _id(phone, f"phones.{phone}"): team_ref(team, f"phones.{phone}")
        for phone, team in _mapping(root.get("phones"), "phones").items()
    }
    return Owners(default_team, teams, organizations, phones)


def load_owners(path: Path, env: Mapping[str, str] | None = None) -> Owners:
    try:
        text = path.read_text()
    except OSError as error:
        raise OwnersError(WHOLE_FILE, f"cannot read it: {error.strerror}") from None
    return parse_owners(text, os.environ if env is None else env)


class OwnersWatcher:
    """Holds the mapping in force; `reload()` (SIGHUP, or a change seen by `poll()`) swaps it if it validates."""

    def __init__(self, path: Path | None, on_change: Callable[[Owners], None] | None = None) -> None:
        self.path = path
        self.current = load_owners(path) if path is not None else Owners()
        self.on_change = on_change
        self._stamp = self._file_stamp()
        self.reloads = 0
        self.rejected = 0

    def _file_stamp(self) -> tuple[float, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def reload(self) -> bool:
        if self.path is None:
            return False
        self._stamp = self._file_stamp()
        try:
            owners = load_owners(self.path)
        except OwnersError as error:
            self.rejected += 1
            log.error("owners file rejected; the previous mapping stays in force: %s", error)
            return False
        self.current = owners
        self.reloads += 1
        log.info("owners file reloaded: %d teams", len(owners.teams))
        if self.on_change is not None:
            self.on_change(owners)
        return True

    def poll(self) -> bool:
        """Reload when the file changed since it was last read (ConfigMap updates swap it in place)."""
        if self.path is not None and self._file_stamp() != self._stamp:
            return self.reload()
        return False
