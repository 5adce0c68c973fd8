"""``lofid``: the daemon's command line. Runs in the foreground, logs to stderr.

Under systemd it takes the listening socket systemd passes (socket activation) and
reports READY=1, STATUS= and STOPPING=1 over NOTIFY_SOCKET; elsewhere it binds the
socket path itself. Either way one lofid per socket path: a lock file next to the
socket, held while the daemon runs, turns a second one away.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import lofid
from lofid import config, dependencies, paths
from lofid.broker import systemd
from lofid.broker.broker import Broker
from lofid.broker.server import Server
from lofid.logs import setup_logging

log = logging.getLogger("lofid")

EXIT_CONFIG = 2  # invalid configuration: restarting will not help (RestartPreventExitStatus=2)
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofid",
        formatter_class=argparse.RawDescriptionHelpFormatter,   # the commands below stay whole
        description="The lofid daemon: generates music with MusicGen-small for clients on a Unix\n"
        "socket. Runs in the foreground and logs to stderr, one line per event.",
        epilog="On an NVIDIA GPU lofid needs the CUDA build of onnxruntime in place of the CPU\n"
        f"one that `pip install lofid` brings:\n  {dependencies.GPU_FIX}",
    )
    parser.add_argument("--version", action="version", version=f"lofid {lofid.__version__}")
    config.add_arguments(parser)
    return parser


def inherited_socket() -> socket.socket | None:
    """The listening socket passed by systemd, or None; raises if it is not a Unix stream socket."""
    socks = systemd.listen_fds()
    if not socks:
        return None
    for extra in socks[1:]:
        log.warning("ignoring extra inherited socket fd %d", extra.fileno())
        extra.close()
    sock = socks[0]
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise OSError(f"the socket passed by systemd (fd {sock.fileno()}) is not a Unix stream socket")
    return sock


def socket_path_of(sock: socket.socket, configured: Path) -> Path:
    """The path the inherited socket listens on (its lock goes next to it)."""
    name = sock.getsockname()
    if isinstance(name, str) and name and not name.startswith("\0"):
        path = Path(name)
        if path != configured:
            log.warning("systemd passed the socket %s; the configured socket %s is not used", path, configured)
        return path
    return configured  # abstract or unnamed: lock the configured path instead


async def serve(settings: config.Settings, sock: socket.socket | None = None, socket_path: Path | None = None,
                sources: dict[str, str] | None = None) -> int:
    loop = asyncio.get_running_loop()
    broker = Broker(settings, sources)
    server = Server(broker, socket_path or settings.socket, settings.max_frame_bytes, settings.frame_timeout_sec,
                    settings.idle_close_sec)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, broker)
    await broker.start()
    await server.start(sock)
    how = "the socket passed by systemd" if sock is not None else "its own socket"
    log.info("lofid %s listening on %s, %s (pid %d)", lofid.__version__, server.socket_path, how, os.getpid())
    if conflict := dependencies.onnxruntime_conflict():
        log.warning("%s", conflict)
    systemd.notify("READY=1")
    await broker.stopping.wait()
    log.info("shutting down")
    systemd.notify("STOPPING=1\nSTATUS=shutting down")
    server.stop_listening()
    await broker.stop()  # tells the clients of unfinished jobs, then stops the worker
    await server.close()
    log.info("bye")
    return 0


def _on_signal(sig: int, broker: Broker) -> None:
    log.info("received %s", signal.Signals(sig).name)
    broker.stopping.set()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, sources = config.load_with_sources(config.flags_from(args))
    except config.ConfigError as e:
        print(f"lofid: invalid configuration: {e}", file=sys.stderr)
        return EXIT_CONFIG
    os.umask(0o077)  # what lofid writes (tracks, prompts, caches, model files) is the user's alone
    setup_logging(settings.log_level)
    try:
        sock = inherited_socket()
    except OSError as e:
        log.error("%s", e)
        return EXIT_FAILURE
    try:
        if sock is None:
            socket_path = settings.socket
            paths.socket_dir(socket_path.parent)
        else:  # systemd made the directory and the socket; they are not ours to change
            socket_path = socket_path_of(sock, settings.socket)
        lock_fd = paths.acquire_lock(socket_path)
    except paths.LockHeld as e:
        log.error("%s", e)
        return EXIT_FAILURE
    except OSError as e:
        log.error("cannot prepare %s: %s", settings.socket.parent, e)
        return EXIT_FAILURE
    try:
        return asyncio.run(serve(settings, sock, socket_path, sources))
    finally:
        os.close(lock_fd)
