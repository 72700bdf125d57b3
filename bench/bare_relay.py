"""The Python floor: an aiohttp pass-through relay with no instrumentation at all (uvloop).

    python bench/bare_relay.py --upstream http://127.0.0.1:8080 --port 8001
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
       "upgrade", "host", "content-length"}


def make_app(upstream: str) -> web.Application:
    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with request.app["session"].request(
                request.method, upstream + request.path_qs, headers=headers,
                data=await request.read()) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            resp.headers.extend((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=1024**3)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    a = p.parse_args()
    web.run_app(make_app(a.upstream.rstrip("/")), host=a.host, port=a.port, access_log=None,
                print=None, loop=uvloop.new_event_loop())
