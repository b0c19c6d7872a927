"""RSS per tracked idle session: the sidecar (its own process, embedded store) tracks N sessions that opened and
then stay quiet; printed: RSS before and after, and the cost per session.

    python -m bench.memory [--sizes 10000,100000]

Each size runs in a fresh sidecar. The sessions are opened over one runtime connection in frames of 1,000
events; the last session's stats answering means every frame before it was applied (frames are applied in
order). A measurement, not a test (goal: <= 2 KiB per session).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json

import aiohttp
from websockets.asyncio.client import connect

from bench.common import rss_mb, sidecar_process


def open_event(phone: int) -> dict[str, object]:
    return {"type": "connection.update", "organizationId": 1 + phone % 50, "organizationPhoneId": phone,
            "phoneJid": f"7900{phone:07d}@s.whatsapp.net", "connection": "open"}  # fmt: skip


async def measure(sessions: int) -> tuple[float, float]:
    async with sidecar_process(None) as sidecar, aiohttp.ClientSession(sidecar.base) as http:
        await asyncio.sleep(1)  # let start-up allocations settle before the baseline
        before = rss_mb(sidecar.pid)
        async with connect(sidecar.ws_url, max_size=None) as ws:
            for start in range(1, sessions + 1, 1000):
                await ws.send(json.dumps([open_event(n) for n in range(start, min(start + 1000, sessions + 1))]))
            while True:
                async with http.get(f"/v1/sessions/{sessions}/stats") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
            after = rss_mb(sidecar.pid)
    return before, after


async def run(sizes: list[int]) -> None:
    print("memory: RSS of the sidecar process tracking N idle sessions (embedded store)")
    for size in sizes:
        gc.collect()
        before, after = await measure(size)
        per_session = (after - before) * 1024 * 1024 / size
        print(f"  {size:>7,} sessions: RSS {before:.1f} -> {after:.1f} MB, {per_session:,.0f} bytes per session "
              f"(goal <= 2,048)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    asyncio.run(run([int(size) for size in args.sizes.split(",")]))


if __name__ == "__main__":
    main()
