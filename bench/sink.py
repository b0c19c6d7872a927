"""The ceiling of this stack: a bare aiohttp WebSocket endpoint that parses each frame as JSON and counts events.

python -m bench.sink --port 9999      # GET /count answers the number of events received
"""

from __future__ import annotations

import argparse
import json

from aiohttp import WSMsgType, web

COUNT = web.AppKey("count", list)


async def runtime(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024)
    await ws.prepare(request)
    count = request.app[COUNT]
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            payload = json.loads(message.data)
            count[0] += len(payload) if isinstance(payload, list) else 1
    return ws


async def counted(request: web.Request) -> web.Response:
    return web.json_response({"events": request.app[COUNT][0]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app[COUNT] = [0]
    app.router.add_get("/v1/runtime", runtime)
    app.router.add_get("/count", counted)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
