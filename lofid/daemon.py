"""``lofid``: the daemon's command line. Runs in the foreground, logs to stderr."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import lofid
from lofid import config, paths
from lofid.broker.broker import Broker
from lofid.broker.server import Server

log = logging.getLogger("lofid")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofid",
        description="The lofid daemon: generates music with MusicGen-small for clients on a Unix socket. "
        "Runs in the foreground and logs to stderr.",
    )
    parser.add_argument("--version", action="version", version=f"lofid {lofid.__version__}")
    config.add_arguments(parser)
    return parser


async def serve(settings: config.Settings) -> int:
    loop = asyncio.get_running_loop()
    broker = Broker(settings)
    server = Server(broker, settings.socket, settings.max_frame_bytes, settings.frame_timeout_sec)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, broker)
    await broker.start()
    await server.start()
    log.info("lofid %s listening on %s (pid %d)", lofid.__version__, settings.socket, os.getpid())
    await broker.stopping.wait()
    log.info("shutting down")
    await server.close()
    await broker.stop()
    log.info("bye")
    return 0


def _on_signal(sig: int, broker: Broker) -> None:
    log.info("received %s", signal.Signals(sig).name)
    broker.stopping.set()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = config.load(config.flags_from(args))
    except config.ConfigError as e:
        print(f"lofid: invalid configuration: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="lofid[%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        paths.private_dir(settings.socket.parent)
        lock_fd = paths.acquire_lock(settings.socket)
    except paths.LockHeld as e:
        print(f"lofid: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"lofid: cannot prepare {settings.socket.parent}: {e}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(serve(settings))
    finally:
        os.close(lock_fd)
