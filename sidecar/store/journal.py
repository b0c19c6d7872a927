"""A local journal of database steps not yet applied (and, in fleet mode, of events not yet decided), so a
restart during a PostgreSQL outage loses none.

The file holds lines `<position>\\t<step json>` as steps are accepted, `applied\\t<position>` as they are
applied, and is rewritten to a single `next\\t<position>` line whenever nothing is pending. Lines reach the
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
        self.last_position = 0

    def load(self) -> list[tuple[int, T]]:
        """The entries accepted and not yet applied, in order."""
        pending: dict[int, T] = {}
        applied = 0
        if self._path.exists():
            for line in self._path.read_text().splitlines():
                tag, sep, payload = line.partition("\t")
                if not sep:
                    continue  # a line torn by a crash mid-write
                try:
                    if tag == "next":
                        self.last_position = max(self.last_position, int(payload) - 1)
                    elif tag == "applied":
                        applied = max(applied, int(payload))
                    else:
                        position = int(tag)
                        pending[position] = self._decode(payload)
                        self.last_position = max(self.last_position, position)
                except ValueError:
                    continue
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return [(position, step) for position, step in sorted(pending.items()) if position > applied]

    def append(self, entry: T) -> int:
        self.last_position += 1
        self._write(f"{self.last_position}\t{self._encode(entry)}\n")
        return self.last_position

    def mark_applied(self, position: int, nothing_pending: bool) -> None:
        if nothing_pending:
            self._compact()
        else:
            self._write(f"applied\t{position}\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, line: str) -> None:
        assert self._fd is not None, "Journal.load() opens the journal"
        os.write(self._fd, line.encode())

    def _compact(self) -> None:
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(f"next\t{self.last_position + 1}\n")
        os.replace(temporary, self._path)
        self.close()
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


StepJournal = Journal[Step]
