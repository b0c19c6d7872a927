"""A local journal of database steps not yet applied (and, in fleet mode, of events not yet decided), so a
restart during a PostgreSQL outage loses none.

The file starts with `format\\t1` and holds lines `<position>\\t<step json>` as steps are accepted,
`applied\\t<position>` as they are applied; once it is past `COMPACT_BYTES` and nothing is pending it is
rewritten to the format line and a single `next\\t<position>` line. A journal of another format, or with an
entry this version cannot read (other than a last line torn by a crash), is refused with a JournalError and
left as it is. Lines reach the
kernel before a step is accepted (a killed process loses nothing); there is no fsync per step, so a power
loss may lose the last moments. The store remembers the last position it applied in the same transaction as
the steps, so a replay skips what already happened.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from sidecar.rules.records import Step, step_from_json, step_to_json

JOURNAL_FILE = "pending-steps.jsonl"
EVENTS_FILE = "undecided-events.jsonl"
INSTANCE_FILE = "instance-id"
FORMAT_VERSION = 1
COMPACT_BYTES = 1 << 20


class JournalError(RuntimeError):
    """The journal cannot be read by this version; the file is kept for an operator (or a newer sidecar)."""


T = TypeVar("T")


class Journal(Generic[T]):
    """`instance_id` keys the position the database remembers; a second journal in one state directory
    (the undecided events) names itself with `suffix`."""

    def __init__(
        self,
        state_dir: Path,
        file_name: str = JOURNAL_FILE,
        encode: Callable[[T], str] = step_to_json,  # type: ignore[assignment]
        decode: Callable[[str], T] = step_from_json,  # type: ignore[assignment]
        suffix: str = "",
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._path = state_dir / file_name
        self._encode, self._decode = encode, decode
        instance_file = state_dir / INSTANCE_FILE
        if not instance_file.exists():
            instance_file.write_text(uuid.uuid4().hex + "\n")
        self.instance_id = instance_file.read_text().strip() + suffix
        self._fd: int | None = None
        self._size = 0  # bytes written since the last compaction
        self.last_position = 0

    def load(self) -> list[tuple[int, T]]:
        """The entries accepted and not yet applied, in order."""
        pending: dict[int, T] = {}
        applied = 0
        lines = self._path.read_text().splitlines() if self._path.exists() else []
        if lines and lines[0].startswith("format\t"):
            found = lines.pop(0).partition("\t")[2]
            if found != str(FORMAT_VERSION):
                raise JournalError(
                    f"{self._path} is journal format {found!r}; this sidecar reads format {FORMAT_VERSION} "
                    "(written by a newer version?). The file was left as it is: start the version that wrote it, "
                    "or move the file away to start without its entries."
                )
        for number, line in enumerate(lines, start=2):
            tag, sep, payload = line.partition("\t")
            try:
                if not sep:
                    raise ValueError("no tab")
                if tag == "next":
                    self.last_position = max(self.last_position, int(payload) - 1)
                elif tag == "applied":
                    applied = max(applied, int(payload))
                else:
                    position = int(tag)
                    pending[position] = self._decode(payload)
                    self.last_position = max(self.last_position, position)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                if number == len(lines) + 1:
                    continue  # the last line, torn by a crash mid-write
                raise JournalError(
                    f"{self._path} line {number} cannot be read ({type(error).__name__}: {error}); the file was "
                    "left as it is: repair or move it away to start"
                ) from None
        fresh = not lines
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o600)
        if fresh:
            self._write(f"format\t{FORMAT_VERSION}\n")
        return [(position, step) for position, step in sorted(pending.items()) if position > applied]

    def append(self, entry: T) -> int:
        self.last_position += 1
        self._write(f"{self.last_position}\t{self._encode(entry)}\n")
        return self.last_position

    def mark_applied(self, position: int, nothing_pending: bool) -> None:
        self._write(f"applied\t{position}\n")
        if nothing_pending and self._size > COMPACT_BYTES:
            self._compact()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, line: str) -> None:
        assert self._fd is not None, "Journal.load() opens the journal"
        self._size += os.write(self._fd, line.encode())

    def _compact(self) -> None:
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(f"format\t{FORMAT_VERSION}\nnext\t{self.last_position + 1}\n")
        self._size = 0
        os.replace(temporary, self._path)
        self.close()
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


StepJournal = Journal[Step]
