"""Runtime versions: how they compare, and which published advisories name one (the table in advisories.json,
data with its sources). Pure.

Versions compare as semver (a prerelease before its release), with one allowance for how Baileys tags its
prereleases: `7.0.0-rc14` and `7.0.0-rc.14` are the same version (letters and digits of a prerelease are split
into separate identifiers), so `rc9` sorts before `rc.12` as it should.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_PART = re.compile(r"\d+|[A-Za-z]+")

Key = tuple[tuple[int, int, int], tuple[int, tuple[tuple[int, int | str], ...]]]


def version_key(version: str) -> Key | None:
    """A sortable key for a version, or None when it is not one (nothing is then said about it)."""
    match = _VERSION.match(version.strip())
    if match is None:
        return None
    major, minor, patch, pre = match.groups()
    release = (int(major), int(minor or 0), int(patch or 0))
    if pre is None:
        return release, (1, ())  # a release sorts after each of its prereleases
    parts = tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in _PART.findall(pre))
    return release, (0, parts)


def library_name(library: str) -> str:
    """`@whiskeysockets/baileys` and `Baileys` are both `baileys`."""
    return library.strip().lower().rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Advisory:
    advisory_id: str
    library: str
    summary: str
    source: str
    affected: tuple[tuple[Key | None, Key], ...]  # [from, below) ranges

    def affects(self, library: str, version: str) -> bool:
        if library_name(library) != self.library:
            return False
        key = version_key(version)
        if key is None:
            return False
        return any((low is None or low <= key) and key < high for low, high in self.affected)


def _key(text: str) -> Key:
    key = version_key(text)
    if key is None:
        raise ValueError(f"advisories.json: {text!r} is not a version")
    return key


def parse_advisories(data: dict[str, Any]) -> tuple[Advisory, ...]:
    return tuple(
        Advisory(
            item["id"],
            library_name(item["library"]),
            item["summary"],
            item["source"],
            tuple((_key(r["from"]) if "from" in r else None, _key(r["below"])) for r in item["affected"]),
        )
        for item in data["advisories"]
    )


@cache
def known_advisories() -> tuple[Advisory, ...]:
    """The table shipped with the sidecar (sidecar/rules/advisories.json)."""
    text = resources.files("sidecar.rules").joinpath("advisories.json").read_text(encoding="utf-8")
    return parse_advisories(json.loads(text))


def advisories_for(library: str, version: str) -> list[str]:
    """The ids of the known advisories that name this version of this library."""
    return [a.advisory_id for a in known_advisories() if a.affects(library, version)]
