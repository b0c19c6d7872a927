"""whatsapp-session-sidecar: keeps WhatsApp Web session fleets healthy and visible."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("whatsapp-session-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
