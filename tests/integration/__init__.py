"""Tests against real parts: PostgreSQL, Prometheus, Alertmanager, Node and Baileys, subprocesses, images."""
