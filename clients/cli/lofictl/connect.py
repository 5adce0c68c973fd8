"""Reach lofid on its socket, starting it in the background when nothing answers."""

from __future__ import annotations

import subprocess
import sys
import time

from lofictl.client import Client
from lofictl.output import CliError
from lofid import config

START_TIMEOUT_SEC = 20.0


def connect(args, settings: config.Settings) -> Client:
    """Connect to lofid, starting it in the background if nothing answers."""
    try:
        return Client(settings.socket, timeout=args.timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        if args.no_start:
            raise CliError("DAEMON_NOT_RUNNING",
                           f"no lofid answers on {settings.socket} (and --no-start was given)") from None
    start_daemon(args, settings)
    deadline = time.monotonic() + START_TIMEOUT_SEC
    while True:
        try:
            return Client(settings.socket, timeout=args.timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise CliError("DAEMON_NOT_RUNNING",
                               f"started lofid but it does not answer on {settings.socket}; "
                               f"see {settings.state_dir / 'lofid.log'}") from None
            time.sleep(0.1)


def start_daemon(args, settings: config.Settings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    log = open(settings.state_dir / "lofid.log", "ab")
    argv = [sys.executable, "-m", "lofid", "--socket", str(settings.socket)]
    if args.config:
        argv += ["--config", str(args.config)]
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    log.close()
    print(f"lofictl: started lofid on {settings.socket}", file=sys.stderr)


def cli_flags(args) -> dict:
    """The settings lofictl's own flags give (the rest come from the config file and the environment)."""
    return {"socket": args.socket, "config": args.config}
