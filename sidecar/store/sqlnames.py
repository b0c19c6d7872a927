"""SQL identifiers taken from config: validated against a strict pattern, then quoted."""

from __future__ import annotations

import re

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


class InvalidIdentifier(ValueError):
    pass


def quote_identifier(name: str) -> str:
    """Quote one identifier (table, column or schema name) after checking it is a plain name."""
    if not _IDENTIFIER.match(name):
        raise InvalidIdentifier(
            f"{name!r} is not a valid SQL identifier (letters, digits and '_', starting with a letter or '_', "
            "at most 63 characters)"
        )
    return f'"{name}"'


def quote_qualified(name: str) -> str:
    """Quote `table` or `schema.table`."""
    parts = name.split(".")
    if len(parts) > 2:
        raise InvalidIdentifier(f"{name!r} has more than one '.' (expected table or schema.table)")
    return ".".join(quote_identifier(part) for part in parts)
