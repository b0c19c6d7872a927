"""The container image, built and run without a daemon or a registry: Debian's mmdebstrap makes a bookworm root
filesystem, buildah (vfs storage, chroot isolation, as root) imports it as the base and builds the Dockerfile on
it, and the result runs in a private mount namespace with its root filesystem read-only and only the chart's
mounts writable, as the Deployment runs it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.monitoring import run_tool

ROOT = Path(__file__).parent.parent
BASE = "localhost/wa-sidecar-base:bookworm"
IMAGE = "localhost/whatsapp-session-sidecar:test"
MIRROR = "http://deb.debian.org/debian"
# What the base needs: Python with venv for the build stage, passwd for the final stage's user.
BASE_PACKAGES = "python3,python3-venv,passwd"
TRIM = [f"--dpkgopt=path-exclude=/usr/share/{part}/*" for part in ("doc", "man", "locale", "info")]
# Build-time only: the host's CA bundle, for pip behind a TLS-intercepting proxy (not kept in the image).
HOST_CERTS = Path("/etc/ssl/certs")

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


@dataclass
class Buildah:
    storage: Path

    def argv(self, *args: str) -> list[str]:
        return [
            "buildah", "--storage-driver", "vfs",
            "--root", str(self.storage / "root"), "--runroot", str(self.storage / "run"), *args,
        ]  # fmt: skip

    async def __call__(self, *args: str, deadline: float = 600) -> str:
        code, output = await run_tool(*self.argv(*args), cwd=ROOT, env=_env(), deadline=deadline)
        if code != 0:
            raise AssertionError(f"buildah {' '.join(args)} exited {code}:\n{output[-4000:]}")
        return output

    async def build_base(self, work: Path) -> None:
        tarball = work / "rootfs.tar"
        code, output = await run_tool(
            "mmdebstrap", "--variant=essential", f"--include={BASE_PACKAGES}", *TRIM, "bookworm", str(tarball), MIRROR,
            env=_env(), deadline=600,
        )  # fmt: skip
        if code != 0:
            raise AssertionError(f"mmdebstrap exited {code}:\n{output[-4000:]}")
        container = (await self("from", "scratch")).strip().splitlines()[-1]
        await self("add", container, str(tarball), "/")
        await self("commit", "--quiet", container, BASE)
        await self("rm", container)
        tarball.unlink()

    async def build_image(self) -> None:
        await self(
            "build", "--isolation", "chroot", "--pull=never", "--volume", f"{HOST_CERTS}:{HOST_CERTS}:ro",
            "--build-arg", f"PYTHON_IMAGE={BASE}", "--tag", IMAGE, ".",
        )  # fmt: skip

    async def config(self, image: str) -> dict[str, Any]:
        inspected = json.loads(await self("inspect", "--type", "image", image))
        return dict(inspected["OCIv1"]["config"])

    async def size(self, image: str) -> str:
        return str(json.loads(await self("images", "--json", image))[0]["size"])

    async def mounted(self, image: str) -> tuple[str, Path]:
        container = (await self("from", "--pull-never", image)).strip().splitlines()[-1]
        return container, Path((await self("mount", container)).strip().splitlines()[-1])

    async def remove_all(self) -> None:
        await run_tool(*self.argv("rm", "--all"), env=_env(), deadline=120)
        await run_tool(*self.argv("rmi", "--all", "--force"), env=_env(), deadline=120)


def _env() -> dict[str, str]:
    return {**os.environ, "BUILDAH_ISOLATION": "chroot"}


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
