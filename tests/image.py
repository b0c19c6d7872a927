"""The container image, built and run without a daemon or a registry: built by build_release.py's code (Debian's
mmdebstrap makes a bookworm root filesystem, buildah with vfs storage and chroot isolation, as root, imports it
as the base and builds the Dockerfile on it), and the result runs in a private mount namespace with its root
filesystem read-only and only the chart's mounts writable, as the Deployment runs it."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from build_release import BASE, Buildah

IMAGE = "localhost/whatsapp-session-sidecar:test"
__all__ = ["BASE", "IMAGE", "Buildah", "missing_tools", "start_read_only"]

# In a private mount namespace: the image's root bound read-only, the chart's writable mounts bound over it,
# then the entrypoint as the image's user with exactly the given environment.
RUN_READ_ONLY = r"""
set -e
rootfs="$1"; view="$2"; state="$3"; tmp="$4"; user="$5"; shift 5
mount --bind "$rootfs" "$view"
mount -o remount,bind,ro "$view"
mount --bind "$state" "$view/var/lib/wa-sidecar"
mount --bind "$tmp" "$view/tmp"
mount --rbind /dev "$view/dev"
mount -t proc proc "$view/proc"
exec chroot --userspec="$user" "$view" /usr/bin/env -i "$@"
"""


def missing_tools() -> list[str]:
    return [tool for tool in ("mmdebstrap", "buildah", "unshare", "chroot") if shutil.which(tool) is None]


async def start_read_only(
    rootfs: Path, work: Path, user: str, environment: dict[str, str], argv: list[str], *, as_user: str | None = None
) -> tuple[asyncio.subprocess.Process, Path, Path]:
    """The image's root read-only with fresh state and tmp mounts (owned by the image's user)."""
    view, state, tmp = work / "view", work / "state", work / "tmp"
    for directory in (view, state, tmp):
        directory.mkdir(parents=True, exist_ok=True)
    uid, gid = (int(part) for part in user.split(":"))
    for directory in (state, tmp):
        os.chown(directory, uid, gid)
    environ = [f"{key}={value}" for key, value in environment.items()]
    process = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", RUN_READ_ONLY, "run-read-only",
        str(rootfs), str(view), str(state), str(tmp), as_user or user, *environ, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return process, state, tmp
