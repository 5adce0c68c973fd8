"""Reach lofid on its socket: connect, start it in the background where the command may
(``generate``, ``play``, ``models download``), stop it, and say so when the running
daemon's settings are not this shell's (it keeps those it started with)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lofictl.client import Client, Disconnected
from lofictl.output import NOT_RUNNING, START_FAILED, TIMEOUT, CliError, note
from lofid import config, paths

START_TIMEOUT_SEC = 20.0
STOP_TIMEOUT_SEC = 30.0
# The settings that change what a daemon does for a client: compared with the running one's.
COMPARED = ("model_dir", "variant", "device", "threads", "cache_dir", "top_k", "temperature", "guidance_scale")


def cli_flags(args) -> dict:
    """The settings lofictl's own flags give (the rest come from the config file and the environment)."""
    return {"socket": args.socket, "config": args.config}


def running(args, settings: config.Settings) -> Client | None:
    """A connection to the running lofid, or None where nothing answers (never starts one)."""
    try:
        return Client(settings.socket, timeout=args.timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError as e:
        raise CliError(NOT_RUNNING, f"cannot connect to {settings.socket}: {e.strerror or e}") from None


def running_status(args, settings: config.Settings) -> dict | None:
    """The running lofid's status, or None where nothing answers (never starts one)."""
    client = running(args, settings)
    if client is None:
        return None
    with client:
        return client.call("status")


def connect(args, settings: config.Settings, *, start: bool = False, check_settings: bool = True) -> Client:
    """Connect to lofid; with ``start`` (and without --no-start) start it in the background
    when nothing answers, else fail with NOT_RUNNING."""
    client = running(args, settings)
    if client is not None:
        if check_settings:
            warn_if_settings_differ(client.call("status"), settings, args)
        return client
    if not start or args.no_start:
        why = " (and --no-start was given)" if start else \
            "; `lofictl generate` starts one, or run `lofictl daemon`"
        raise CliError(NOT_RUNNING, f"no lofid answers on {settings.socket}{why}")
    start_daemon(args, settings)
    deadline = time.monotonic() + START_TIMEOUT_SEC
    while (client := running(args, settings)) is None:
        if time.monotonic() > deadline:
            raise CliError(START_FAILED, f"started lofid but it does not answer on {settings.socket}; "
                           f"see {settings.state_dir / 'lofid.log'}")
        time.sleep(0.1)
    return client


def start_daemon(args, settings: config.Settings) -> None:
    argv = [sys.executable, "-m", "lofid", "--socket", str(settings.socket)]
    if args.config:
        argv += ["--config", str(args.config)]
    try:
        with paths.open_private_log(paths.private_dir(settings.state_dir) / "lofid.log") as log:  # it holds prompts
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                             close_fds=True)
    except OSError as e:
        raise CliError(START_FAILED, f"cannot start lofid: {e}") from None
    note(f"started lofid on {settings.socket} (it keeps running: `lofictl stop` stops it)")


def settings_differences(status: dict, settings: config.Settings, args) -> list[str]:
    """The COMPARED settings whose values differ between this shell and the running lofid,
    each with where both values come from; empty where the daemon does not report them."""
    theirs = status.get("settings")
    if not isinstance(theirs, dict):
        return []
    mine = settings.to_dict()
    keys = [k for k in COMPARED if k in theirs and theirs[k] != mine[k]]
    if not keys:
        return []
    my_sources = config.load_with_sources(cli_flags(args))[1]
    their_sources = status.get("settings_sources") or {}
    return [f"{k} is {shown(mine[k])} here ({my_sources[k]}), {shown(theirs[k])} in lofid "
            f"({their_sources.get(k, 'source unknown')})" for k in keys]


def shown(value) -> str:
    return "unset" if value is None else json.dumps(value) if isinstance(value, str) else str(value)


def warn_if_settings_differ(status: dict, settings: config.Settings, args) -> None:
    differences = settings_differences(status, settings, args)
    if differences:
        note(f"note: the running lofid (pid {status.get('pid')}) has other settings than this shell: "
             f"{'; '.join(differences)}. It keeps its own until it stops: run `lofictl stop`, "
             "and the next command starts one with this shell's settings")


def stop(client: Client, settings: config.Settings) -> None:
    """Ask the daemon to shut down; return once it has closed the connection and released
    its lock (so the next command can start a new one at once)."""
    client.call("shutdown")
    deadline = time.monotonic() + STOP_TIMEOUT_SEC
    try:
        while True:  # notifications may still come (the shutdown fails unfinished jobs) until it closes
            client.notification(timeout=max(0.01, deadline - time.monotonic()))
    except Disconnected:
        pass
    except TimeoutError:
        raise CliError(TIMEOUT, f"lofid did not stop within {STOP_TIMEOUT_SEC:g} s") from None
    lock = Path(f"{settings.socket}.lock")
    while time.monotonic() < deadline and lock_held(lock):
        time.sleep(0.05)


def lock_held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
