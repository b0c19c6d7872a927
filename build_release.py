"""What a user pushes to their own registry: the container image as an OCI archive and the Helm chart as a package.

    python -m build_release [--out dist] [--no-image]

The image: Debian's mmdebstrap makes a bookworm root filesystem, buildah (vfs storage, chroot isolation: no
daemon, no registry) imports it as the base and builds the Dockerfile on it, then writes it as an OCI archive,
`dist/whatsapp-session-sidecar-<version>.oci.tar` (push it with `skopeo copy oci-archive:FILE
docker://REGISTRY/whatsapp-session-sidecar:<version>`, or `podman load -i FILE`). Needs root, like buildah's vfs
storage. The chart: linted strictly, then packaged by the Helm SDK (`helm package`) into
`dist/whatsapp-session-sidecar-<version>.tgz` (`helm push FILE oci://REGISTRY/charts`).
tests/image.py builds the image the tests run with the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
CHART = ROOT / "helm" / "whatsapp-session-sidecar"
NAME = "whatsapp-session-sidecar"
BASE = "localhost/wa-sidecar-base:bookworm"
MIRROR = "http://deb.debian.org/debian"
# What the base needs: Python with venv for the build stage, passwd for the final stage's user.
BASE_PACKAGES = "python3,python3-venv,passwd"
TRIM = [f"--dpkgopt=path-exclude=/usr/share/{part}/*" for part in ("doc", "man", "locale", "info")]
# Build-time only: the host's CA bundle, for pip behind a TLS-intercepting proxy (not kept in the image).
HOST_CERTS = Path("/etc/ssl/certs")


class BuildFailed(Exception):
    pass


async def run(*argv: str, deadline: float = 600) -> str:
    """A tool's combined output; BuildFailed (with its tail) when it fails or overruns."""
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env={**os.environ, "BUILDAH_ISOLATION": "chroot"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), deadline)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise BuildFailed(f"{argv[0]} {' '.join(argv[1:3])} ran over {deadline:.0f} s") from None
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise BuildFailed(f"{' '.join(argv[:3])} exited {process.returncode}:\n{text[-4000:]}")
    return text


@dataclass
class Buildah:
    """buildah with its own storage (vfs) under `storage`: nothing touches the host's images."""

    storage: Path

    def argv(self, *args: str) -> list[str]:
        return [
            "buildah", "--storage-driver", "vfs",
            "--root", str(self.storage / "root"), "--runroot", str(self.storage / "run"), *args,
        ]  # fmt: skip

    async def __call__(self, *args: str, deadline: float = 600) -> str:
        return await run(*self.argv(*args), deadline=deadline)

    async def build_base(self, work: Path) -> None:
        tarball = work / "rootfs.tar"
        await run("mmdebstrap", "--variant=essential", f"--include={BASE_PACKAGES}", *TRIM, "bookworm",
                  str(tarball), MIRROR)  # fmt: skip
        container = (await self("from", "scratch")).strip().splitlines()[-1]
        await self("add", container, str(tarball), "/")
        await self("commit", "--quiet", container, BASE)
        await self("rm", container)
        tarball.unlink()

    async def build_image(self, tag: str) -> None:
        await self(
            "build", "--isolation", "chroot", "--pull=never", "--volume", f"{HOST_CERTS}:{HOST_CERTS}:ro",
            "--build-arg", f"PYTHON_IMAGE={BASE}", "--tag", tag, ".",
        )  # fmt: skip

    async def export(self, image: str, archive: Path) -> None:
        """The image as an OCI archive, named inside as NAME:<its tag>."""
        await self("push", "--quiet", image, f"oci-archive:{archive}:{NAME}:{image.rsplit(':', 1)[-1]}")

    async def config(self, image: str) -> dict[str, Any]:
        inspected = json.loads(await self("inspect", "--type", "image", image))
        return dict(inspected["OCIv1"]["config"])

    async def mounted(self, image: str) -> tuple[str, Path]:
        """A working container of the image and where its root filesystem is mounted."""
        container = (await self("from", "--pull-never", image)).strip().splitlines()[-1]
        return container, Path((await self("mount", container)).strip().splitlines()[-1])

    async def remove_all(self) -> None:
        for args in (("rm", "--all"), ("rmi", "--all", "--force")):
            with contextlib.suppress(BuildFailed):  # best effort: the storage goes with its temporary parent
                await self(*args, deadline=120)


def chart_version() -> tuple[str, str]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return str(chart["version"]), str(chart["appVersion"])


def package_chart(out: Path) -> Path:
    """Lints the chart strictly (the SDK's lint), then packages it; returns the .tgz."""
    import helm_python as helm  # a dev dependency: only this command needs it

    report = helm.lint(str(CHART), {}, strict=True)
    problems = list(report["errors"]) + [m for m in report["messages"] if m["severity"] >= 2]
    if problems:
        raise BuildFailed(f"helm lint --strict: {problems}")
    return Path(helm.package(str(CHART), destination=str(out)))


async def build_image_archive(out: Path, work: Path) -> Path:
    version = chart_version()[1]
    image = f"localhost/{NAME}:{version}"
    buildah = Buildah(work / "storage")
    try:
        await buildah.build_base(work)
        await buildah.build_image(image)
        archive = out / f"{NAME}-{version}.oci.tar"
        archive.unlink(missing_ok=True)
        await buildah.export(image, archive)
        return archive
    finally:
        await buildah.remove_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the artifacts go (dist/)")
    parser.add_argument("--no-image", action="store_true", help="package the chart only (no root, no buildah)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    built: list[Path] = []
    try:
        built.append(package_chart(args.out))
        if not args.no_image:
            missing = [tool for tool in ("mmdebstrap", "buildah") if shutil.which(tool) is None]
            if missing:
                print(f"build_release: the image needs {' and '.join(missing)} (apt install {' '.join(missing)}), "
                      "or pass --no-image", file=sys.stderr)  # fmt: skip
                return 2
            with tempfile.TemporaryDirectory(prefix="wa-release-") as work:
                built.append(asyncio.run(build_image_archive(args.out, Path(work))))
    except BuildFailed as error:
        print(f"build_release: {error}", file=sys.stderr)
        return 1
    for path in built:
        size = path.stat().st_size
        print(f"{path}  {size / 1e6:.1f} MB" if size >= 1e6 else f"{path}  {size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
