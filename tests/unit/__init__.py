"""The inner loop: pure tests (no PostgreSQL, no servers, no subprocesses); `pytest tests/unit` runs in seconds."""
