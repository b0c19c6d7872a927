"""whatsapp-session-sidecar: keeps WhatsApp Web session fleets healthy and visible.

Layers, inward first: rules/ (pure decisions) <- runtime/ (carries them out through ports.py) <- adapters:
store/, link/, http/, notify/, telemetry/, ingest/, sim/. app.py wires them (create_app); cli.py runs them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("whatsapp-session-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
