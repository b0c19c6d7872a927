"""The session rules, pure: no I/O, no clock reads (callers pass the time), no globals. Everything the sidecar
decides is decided here; the runtime carries the decisions out. Modules import nothing from the package but
each other."""
