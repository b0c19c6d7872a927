"""Where a phone's auth keys live, when not in the session store's own PostgreSQL table: a Redis hash per phone
(keystores/redis_hash.py), a folder per phone as `useMultiFileAuthState` writes it (keystores/folder.py), or the
runtime's own store (the runtime deletes and says how many in `command.ack`). `--key-store` picks one
(keystores/spec.py)."""
