"""Telemetry adapters (runtime observers): every Prometheus metric, per-session families, tracing, the
action log and closure log file, JSON log formatting."""
