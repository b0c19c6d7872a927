"""Keys in a folder per phone, as Baileys' `useMultiFileAuthState` writes them: `creds.json` and one
`${type}-${id}.json` per key, with `/` written `__` and `:` written `-` in the file name.

`file:///DIR/{organizationPhoneId}`: the placeholders are in the path; everything is deleted inside the fixed
part of the path (the folder before the first placeholder), never outside it. The file system work runs in a
thread, off the event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from sidecar.keystores.template import KeyTemplate
from sidecar.ports import KeysRemoved, KeyStoreFailed, StoreUnavailable
from sidecar.rules.records import PhoneRef

SUFFIX = ".json"
CREDS = "creds"


def file_stem(key: str) -> str:
    """The file name (without .json) useMultiFileAuthState gives a key (its fixFileName)."""
    return key.replace("/", "__").replace(":", "-")


class FolderKeyStore:
    def __init__(self, template: KeyTemplate, description: str) -> None:
        self._template = template
        self.root = Path(template.fixed_folder())
        self.description = description

    def name_of(self, phone: PhoneRef) -> str:
        return str(self.folder(phone))

    async def ping(self) -> None:
        if not await asyncio.to_thread(self.root.is_dir):
            raise StoreUnavailable(f"the folder {self.root} does not exist (or is not a folder)")

    def folder(self, phone: PhoneRef) -> Path:
        """The phone's folder; never outside the root (ids are integers and a number is digits, but a path is
        checked all the same, after resolving links)."""
        path = Path(os.path.normpath(self._template.render(phone)))
        root = os.path.realpath(self.root)
        if os.path.commonpath([root, os.path.realpath(path)]) != root or path == Path(root):
            raise KeyStoreFailed(f"the folder of organizationPhoneId {phone.organization_phone_id} leaves {root}")
        return path

    async def delete(self, phone: PhoneRef, prefixes: Sequence[str] | None, only_count: bool = False) -> KeysRemoved:
        folder = self.folder(phone)
        return await asyncio.to_thread(self._delete, folder, prefixes, only_count)

    @staticmethod
    def _delete(folder: Path, prefixes: Sequence[str] | None, only_count: bool) -> KeysRemoved:
        stems = tuple(file_stem(prefix) for prefix in prefixes) if prefixes is not None else None
        deleted = 0
        failures: list[str] = []
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return KeysRemoved(0)
        except OSError as error:
            raise KeyStoreFailed(f"cannot list {folder}: {error.strerror or error}") from error
        for entry in entries:
            if not entry.name.endswith(SUFFIX) or not entry.is_file(follow_symlinks=False):
                continue
            stem = entry.name[: -len(SUFFIX)]
            if stems is not None and not stem.startswith(stems):
                continue
            if only_count:
                deleted += 1
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue  # gone meanwhile (the runtime deleted it): not ours to count
            except OSError as error:
                failures.append(f"{entry.name}: {error.strerror or error}")
                continue
            deleted += 1
        return KeysRemoved(deleted, tuple(failures))

    async def close(self) -> None:
        return None
