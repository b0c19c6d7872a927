"""Keys in a Redis hash per phone, as Evolution API writes them: the hash named by the template, one field per key
(`${type}-${id}`) and `creds`. A deletion is one round trip: a script that takes the hash's field names, keeps
those with a prefix and deletes them (a close deletes the whole hash); never a KEYS or SCAN over the database."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.exceptions

from sidecar.keystores.template import KeyTemplate
from sidecar.ports import KeysRemoved, KeyStoreFailed, StoreUnavailable
from sidecar.rules.records import PhoneRef

# ARGV[1]: 'delete' or 'count'; ARGV[2..]: the prefixes (none: every field, the hash itself deleted).
_SCRIPT = """
local mode = ARGV[1]
if #ARGV == 1 then
  local n = redis.call('HLEN', KEYS[1])
  if mode == 'delete' and n > 0 then redis.call('DEL', KEYS[1]) end
  return n
end
local doomed = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  for i = 2, #ARGV do
    if string.sub(field, 1, #ARGV[i]) == ARGV[i] then
      doomed[#doomed + 1] = field
      break
    end
  end
end
if mode == 'delete' then
  for i = 1, #doomed, 1000 do
    redis.call('HDEL', KEYS[1], unpack(doomed, i, math.min(i + 999, #doomed)))
  end
end
return #doomed
"""
UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class RedisKeyStore:
    def __init__(self, url: str, template: KeyTemplate, description: str, timeout: float = 5.0) -> None:
        self._template = template
        self._client: redis.asyncio.Redis = redis.asyncio.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._script: Any = self._client.register_script(_SCRIPT)
        self.description = description  # KeyStoreSpec.describe(): where, never a password

    def name_of(self, phone: PhoneRef) -> str:
        return self._template.render(phone)

    async def delete(self, phone: PhoneRef, prefixes: Sequence[str] | None, only_count: bool = False) -> KeysRemoved:
        key = self.name_of(phone)
        args = ["count" if only_count else "delete", *(prefixes or ())]
        if prefixes is not None and not prefixes:
            return KeysRemoved(0)
        try:
            count = await self._script(keys=[key], args=args)
        except UNAVAILABLE as error:
            raise StoreUnavailable(f"redis: {error}") from error
        except redis.exceptions.RedisError as error:  # WRONGTYPE and the like: this store's own failure
            raise KeyStoreFailed(f"redis: {error}") from error
        return KeysRemoved(int(count))

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except UNAVAILABLE as error:
            raise StoreUnavailable(f"redis: {error}") from error

    async def close(self) -> None:
        await self._client.aclose()
