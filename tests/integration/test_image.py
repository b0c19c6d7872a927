"""The container image is real: built from a Debian root filesystem (mmdebstrap) with buildah, no daemon and no
registry, and run the way the chart's Deployment runs it: its user, its arguments and environment, a read-only
root filesystem and the chart's writable mounts. Needs root (buildah's vfs storage, mount namespaces)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.image import IMAGE, Buildah, missing_tools, start_read_only
from tests.integration.test_helm import of_kind, render
from tests.monitoring import free_port
from tests.waiting import eventually

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah's vfs storage and mount namespaces need root"),
    pytest.mark.skipif(bool(missing_tools()), reason=f"not installed: {missing_tools()} (.ci/run installs them)"),
]

RUNTIME_TOKEN = "runtime-token-for-the-image-test"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Builds the base and the image once for the module; removes every container, image and layer after."""
    work = tmp_path_factory.mktemp("image")
    buildah = Buildah(work / "storage")

    async def build() -> None:
        await buildah.build_base(work)
        await buildah.build_image(IMAGE)

    asyncio.run(build())
    yield buildah
    asyncio.run(buildah.remove_all())


@contextlib.asynccontextmanager
async def running(buildah: Buildah, work: Path, **overrides: str) -> AsyncIterator[dict[str, Any]]:
    """`wa-sidecar` from the image with the chart's Deployment settings: its args, its literal env values (the
    secret ones given here), the image's user, entrypoint and PATH; listening on a free loopback port."""
    container = of_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    config = await buildah.config(IMAGE)
    environment = dict(item.split("=", 1) for item in config["Env"])
    environment.update({item["name"]: str(item["value"]) for item in container["env"] if "value" in item})
    port = free_port()
    environment.update(
        WA_SIDECAR_LISTEN=f"127.0.0.1:{port}",
        WA_SIDECAR_INSTANCE="image-test-0",
        WA_SIDECAR_API_TOKEN="api-token-for-the-image-test",
        WA_SIDECAR_RUNTIME_TOKEN=RUNTIME_TOKEN,
        **overrides,
    )
    name, rootfs = await buildah.mounted(IMAGE)
    process, state, tmp = await start_read_only(
        rootfs, work, config["User"], environment, [*config["Entrypoint"], *container["args"]]
    )
    output: list[str] = []

    async def collect() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            output.append(line.decode(errors="replace"))

    reader = asyncio.create_task(collect())
    try:
        yield {"base": f"http://127.0.0.1:{port}", "process": process, "state": state, "tmp": tmp,
               "rootfs": rootfs, "output": output, "user": config["User"], "container": container}  # fmt: skip
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        await reader
        await buildah("umount", name)
        await buildah("rm", name)


async def test_the_image_runs_as_the_charts_user_on_a_read_only_root(built: Buildah, tmp_path: Path) -> None:
    values_user = of_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]["securityContext"]
    async with running(built, tmp_path) as run:
        base = run["base"]
        assert run["user"] == f"{values_user['runAsUser']}:{values_user['runAsGroup']}", "USER is the chart's UID"
        assert run["container"]["securityContext"]["readOnlyRootFilesystem"] is True

        async def healthy() -> bool:
            if run["process"].returncode is not None:
                raise AssertionError("".join(run["output"])[-3000:])
            with contextlib.suppress(aiohttp.ClientError):
                async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as response:
                    return response.status == 200
            return False

        await eventually(healthy, deadline_seconds=60, what="/healthz answers from the image")
        status = await asyncio.to_thread(Path(f"/proc/{run['process'].pid}/status").read_text)
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {str(values_user["runAsUser"])}, "the server process runs as the chart's UID"

        async with aiohttp.ClientSession() as http:
            # Three Bad MACs close the session: the closure log goes to the state mount (the chart's emptyDir).
            event = {"type": "decrypt.error", "organizationId": 1, "organizationPhoneId": 42, "error": "Bad MAC"}
            events = [{**event, "phoneJid": "15550001111@s.whatsapp.net", "source": "message"}] * 3
            headers = {"Authorization": f"Bearer {RUNTIME_TOKEN}"}
            async with http.post(f"{base}/v1/events", json=events, headers=headers) as response:
                assert response.status == 202, await response.text()
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                families = {family.name: family for family in text_string_to_metric_families(await response.text())}
        samples = families["whatsapp_decrypt_errors"].samples
        assert any(s.labels == {"kind": "bad_mac", "organization_id": "1"} and s.value == 3 for s in samples)
        closures = run["state"] / "closures.jsonl"

        def closed() -> bool:
            lines = closures.read_text().splitlines() if closures.exists() else []
            return any(json.loads(line).get("organizationPhoneId") == 42 for line in lines)

        await eventually(closed, what="the closure logged to the state mount")
        logged = "".join(run["output"])
        assert "Traceback" not in logged and "Read-only file system" not in logged, logged[-3000:]


async def test_the_root_filesystem_is_read_only_and_the_state_mount_writable(built: Buildah, tmp_path: Path) -> None:
    """The same view as the server's, as root: the image's tree refuses a write; the state mount takes one."""
    name, rootfs = await built.mounted(IMAGE)
    try:
        process, state, _ = await start_read_only(
            rootfs, tmp_path, "0:0", {"PATH": "/usr/bin:/bin"},
            ["sh", "-c", "touch /probe-root; touch /var/lib/wa-sidecar/probe-state && echo state-ok"],
        )  # fmt: skip
        output, _ = await process.communicate()
    finally:
        await built("umount", name)
        await built("rm", name)
    text = output.decode()
    assert "Read-only file system" in text, text
    assert "state-ok" in text and (state / "probe-state").exists(), text
    assert not (rootfs / "probe-root").exists()


async def test_the_release_archive_holds_the_image_as_built(built: Buildah, tmp_path: Path) -> None:
    """build_release's export: an OCI archive (read here with tar and json, not buildah) whose manifest's config is
    the built image's: the same entrypoint, user and environment."""
    archive = tmp_path / "whatsapp-session-sidecar-test.oci.tar"
    await built.export(IMAGE, archive)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert {"oci-layout", "index.json"} <= names, sorted(names)[:10]

        def blob(digest: str) -> dict[str, Any]:
            algorithm, value = digest.split(":")
            member = tar.extractfile(f"blobs/{algorithm}/{value}")
            assert member is not None
            return dict(json.loads(member.read()))

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        (descriptor,) = index["manifests"]
        assert descriptor["annotations"]["org.opencontainers.image.ref.name"] == "whatsapp-session-sidecar:test"
        manifest = blob(descriptor["digest"])
        assert manifest["layers"] and all(f"blobs/{layer['digest'].replace(':', '/')}" in names
                                          for layer in manifest["layers"])  # fmt: skip
        archived = blob(manifest["config"]["digest"])["config"]
    built_config = await built.config(IMAGE)
    for key in ("Entrypoint", "User", "Env"):
        assert archived[key] == built_config[key], key
