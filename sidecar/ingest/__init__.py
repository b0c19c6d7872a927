"""Log ingest: Baileys pino lines and libsignal console blocks turned into link events (wa-sidecar ingest-logs)."""
