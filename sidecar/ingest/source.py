"""Lines of a log: a file (optionally followed like `tail -F`, across rotation and truncation) or stdin."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, cast

CHUNK_BYTES = 1 << 20
FOLLOW_POLL_SECONDS = 0.25


def _split(carry: bytes, chunk: bytes) -> tuple[str, bytes]:
    """The whole lines of carry+chunk as text, and the unfinished rest (a writer may be mid-line)."""
    data = carry + chunk
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", "replace"), data[end:]


async def stdin_lines() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    stream = cast(io.BufferedReader, sys.stdin.buffer)  # read1: whatever a pipe holds, without waiting for more
    carry = b""
    while chunk := await loop.run_in_executor(None, stream.read1, CHUNK_BYTES):
        lines, carry = _split(carry, chunk)
        if lines:
            yield lines
    if carry:
        yield carry.decode("utf-8", "replace")


async def file_lines(path: Path, follow: bool, from_end: bool = False) -> AsyncIterator[str]:
    """Chunks of whole lines. Following, it notices rotation (the path now names another file: the old one is read
    to its end first) and truncation (copytruncate: read again from the start), and waits while nothing is new."""
    handle: BinaryIO = path.open("rb")
    if from_end:
        handle.seek(0, os.SEEK_END)
    carry = b""
    try:
        while True:
            chunk = handle.read(CHUNK_BYTES)
            if chunk:
                lines, carry = _split(carry, chunk)
                if lines:
                    yield lines
                continue
            if not follow:
                break
            try:
                current = os.stat(path)
            except FileNotFoundError:
                await asyncio.sleep(FOLLOW_POLL_SECONDS)  # rotated away, the new file not created yet
                continue
            mine = os.fstat(handle.fileno())
            if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                handle.close()
                handle, carry = path.open("rb"), b""
            elif current.st_size < handle.tell():
                handle.seek(0)
                carry = b""
            else:
                await asyncio.sleep(FOLLOW_POLL_SECONDS)
        if carry:
            yield carry.decode("utf-8", "replace")
    finally:
        handle.close()
