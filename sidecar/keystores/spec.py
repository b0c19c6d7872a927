"""`--key-store`: where the phone's auth keys are, read once at start-up and refused with a clear error when wrong.

- `postgresql` (the default with --database-url): the seed's table (or another one through --schema-override),
  deleted inside the same transaction as the session's state;
- `redis://HOST:PORT/DB?key=TEMPLATE` (or `rediss://`): a hash per phone (keystores/redis_hash.py);
- `file:///DIR/…` with the placeholders in the path: a folder per phone (keystores/folder.py);
- `runtime`: the runtime deletes them through its own auth state and says how many in `command.ack`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from sidecar.config_values import ConfigError
from sidecar.keystores.template import KeyTemplate
from sidecar.ports import KeyStore

KEY = "key-store"


class KeyPlace(StrEnum):
    DATABASE = "postgresql"  # the session store's own (embedded: its memory), deleted in the step's transaction
    REDIS = "redis"
    FOLDER = "file"
    RUNTIME = "runtime"


@dataclass(frozen=True, slots=True)
class KeyStoreSpec:
    place: KeyPlace = KeyPlace.DATABASE
    url: str | None = None  # Redis: the connection URL without `key`
    template: KeyTemplate | None = None
    given: bool = False  # set by the operator (not the default)

    def describe(self) -> str:
        if self.place is KeyPlace.REDIS and self.url is not None and self.template is not None:
            parts = urlsplit(self.url)
            host = parts.hostname or "?"
            return f"redis {host}:{parts.port or 6379}{parts.path or '/0'} key {self.template.text}"
        if self.place is KeyPlace.FOLDER and self.template is not None:
            return f"folder {self.template.text}"
        return str(self.place)


def parse_key_store(raw: str) -> KeyStoreSpec:
    text = raw.strip()
    if text in (KeyPlace.DATABASE, KeyPlace.RUNTIME):
        return KeyStoreSpec(KeyPlace(text), given=True)
    scheme = text.partition(":")[0].lower()
    if scheme in ("redis", "rediss"):
        return _redis(text)
    if scheme == "file":
        return _folder(text)
    raise ConfigError(
        KEY,
        f"must be postgresql, runtime, redis://HOST:PORT/DB?key=TEMPLATE or file:///DIR/{{organizationPhoneId}}, "
        f"got {raw!r}",
    )


def _redis(text: str) -> KeyStoreSpec:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise ConfigError(KEY, f"not a Redis URL: {error}") from None
    if not parts.hostname:
        raise ConfigError(KEY, "the Redis URL names no host (redis://HOST:PORT/DB?key=TEMPLATE)")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigError(KEY, f"the Redis database must be a number (redis://HOST:PORT/0), got {database!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    keys = [value for name, value in query if name == "key"]
    if len(keys) != 1:
        raise ConfigError(
            KEY,
            "the Redis URL needs one key=TEMPLATE naming each phone's hash, for example "
            "key=evolution:baileys:{organizationPhoneId}",
        )
    template = KeyTemplate.parse(KEY, keys[0])
    rest = urlencode([(name, value) for name, value in query if name != "key"])
    del port
    return KeyStoreSpec(KeyPlace.REDIS, urlunsplit(parts._replace(query=rest)), template, given=True)


def _folder(text: str) -> KeyStoreSpec:
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(KEY, f"a file: URL names a local folder (file:///DIR/…), not host {parts.netloc!r}")
    if parts.query or parts.fragment:
        raise ConfigError(KEY, "a file: URL takes no ?query or #fragment; the placeholders go in the path")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ConfigError(KEY, f"the folder must be an absolute path (file:///DIR/…), got {path!r}")
    if any(segment in ("..", ".") for segment in PurePosixPath(path).parts) or "/./" in path or "/../" in path:
        raise ConfigError(KEY, f"the folder template may not hold '..' or '.' segments: {path!r}")
    if "\x00" in path:
        raise ConfigError(KEY, "the folder template holds a NUL")
    template = KeyTemplate.parse(KEY, path.rstrip("/") or "/")
    if template.fixed_folder().rstrip("/") == "":
        raise ConfigError(KEY, f"the folder before the first placeholder is /: name a folder of its own ({path!r})")
    return KeyStoreSpec(KeyPlace.FOLDER, None, template, given=True)


def open_key_store(spec: KeyStoreSpec, timeout: float) -> KeyStore | None:
    """The store for a Redis or folder spec (None: the session store's own, or the runtime's)."""
    if spec.place is KeyPlace.REDIS:
        from sidecar.keystores.redis_hash import RedisKeyStore

        assert spec.url is not None and spec.template is not None
        return RedisKeyStore(spec.url, spec.template, spec.describe(), timeout)
    if spec.place is KeyPlace.FOLDER:
        from sidecar.keystores.folder import FolderKeyStore

        assert spec.template is not None
        return FolderKeyStore(spec.template, spec.describe())
    return None
