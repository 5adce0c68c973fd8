"""``lofictl``: generate music, watch progress, list and play tracks, manage models,
the configuration and the service. This module holds the parser and ``main``; the
commands are in ``commands.py`` and ``admin.py``."""

from __future__ import annotations

import argparse
import math
import os
import sys

from lofictl import admin, commands
from lofictl.client import Disconnected, UntrustedDaemon
from lofictl.connect import cli_flags
from lofictl.output import (
    BAD_FRAME,
    DISCONNECTED,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_PARAMS,
    TIMEOUT,
    UNTRUSTED_DAEMON,
    CliError,
    print_error,
)
from lofid import config, rpc
from lofid.broker.params import SEED_MAX
from lofid.errors import LofiError

DESCRIPTION = "Generate music with the local lofid daemon."
EPILOG = """\
The first `generate`, `play` or `models download` starts lofid in the background; it
keeps running, with the settings it started with, until `lofictl stop` (its log:
<state_dir>/lofid.log; `lofictl config` shows where). Only those three commands start it.
Global flags (--json, --socket, --timeout, --no-start, --config) go before or after the
command. Errors print `lofictl: CODE: message` on stderr and exit non-zero."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in lofictl's form: ``lofictl: INVALID_PARAMS: message``."""

    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        print_error(INVALID_PARAMS, f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed must be an integer 0..{SEED_MAX}, not {text!r}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def global_flags(top: bool) -> argparse.ArgumentParser:
    """The flags every command takes, before or after its name. Below the top level they
    default to "not given", so that a flag given before the command stays set."""
    p = argparse.ArgumentParser(add_help=False)
    given = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--socket", help="lofid socket (env LOFID_SOCKET)", **given)
    p.add_argument("--config", help="config file (env LOFID_CONFIG)", **given)
    p.add_argument("--no-start", action="store_true", help="never start lofid (generate, play and "
                   "models download start it when nothing answers)", **given)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON", **given)
    p.add_argument("--timeout", type=seconds, help="seconds to wait for the daemon (default: forever)", **given)
    return p


def build_parser() -> argparse.ArgumentParser:
    common = global_flags(top=False)
    p = Parser(prog="lofictl", description=DESCRIPTION, epilog=EPILOG, parents=[global_flags(top=True)],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, func, help: str, parent=sub) -> argparse.ArgumentParser:
        c = parent.add_parser(name, help=help, description=help, parents=[common])
        c.set_defaults(func=func)
        return c

    g = command("generate", commands.cmd_generate, "generate a track and print its WAV path (starts lofid)")
    g.add_argument("prompt")
    g.add_argument("--duration", type=float, default=30.0, help="seconds of audio, 5-120 (default 30)")
    g.add_argument("--seed", type=seed, help="seed for reproducible output, 0..2^32-1 (default: random)")
    g.add_argument("--priority", choices=("normal", "high"), default="normal")
    g.add_argument("--no-wait", action="store_true", help="print the track id at once and return")
    g.add_argument("--yes", "-y", action="store_true", help="consent to downloading the model if needed")
    g.add_argument("--play", action="store_true", help="play the track when it is ready")

    command("status", commands.cmd_status, "daemon, model, settings, worker and queue (never starts lofid)")
    command("stop", commands.cmd_stop, "stop the running lofid (unfinished jobs are dropped)")
    t = command("tracks", commands.cmd_tracks, "list generated tracks, newest first (or remove them)")
    t.add_argument("--limit", type=int)
    tsub = t.add_subparsers(dest="tracks_cmd", metavar="ACTION", parser_class=Parser)
    trm = command("rm", commands.cmd_tracks, "remove tracks from the cache", tsub)
    trm.add_argument("track_ids", nargs="+", metavar="TRACK_ID")
    tpr = command("prune", commands.cmd_tracks, "remove least recently used tracks down to cache_max_mb", tsub)
    how = tpr.add_mutually_exclusive_group()
    how.add_argument("--all", action="store_true", help="remove every complete track")
    how.add_argument("--max-mb", type=int, help="prune down to this many MB instead of cache_max_mb")
    command("play", commands.cmd_play, "play a track with a system player (starts lofid)").add_argument(
        "track", help="track id")

    m = command("models", commands.cmd_models, "list or download model files")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="ACTION", parser_class=Parser)
    command("list", commands.cmd_models, "variants, present or missing, sizes, where (as the running lofid "
            "sees them)", msub)
    md = command("download", commands.cmd_models, "download a variant and prepare it (gives consent; "
                 "starts lofid)", msub)
    md.add_argument("--variant", choices=config.VARIANTS, help="default: the daemon's variant")
    md.add_argument("--force", action="store_true", help="download again even if present (repairs corrupt files)")

    command("config", admin.cmd_config, "the running lofid's settings (else this shell's), where each comes "
            "from, and every path")
    sv = command("service", admin.cmd_service, "install lofid as a user service (systemd or launchd)")
    sv.add_argument("service_cmd", choices=("install", "uninstall", "status"), metavar="install|uninstall|status")
    sv.add_argument("--manager", choices=("systemd", "launchd"), help="default: launchd on macOS, else systemd")
    sv.add_argument("--dir", help="where the units or the plist go (default: ~/.config/systemd/user or "
                    "~/Library/LaunchAgents)")
    sv.add_argument("--no-enable", action="store_true", help="install: only write the files")

    sub.add_parser("daemon", help="run lofid in the foreground (same as `lofid`; its flags follow)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["daemon"]:  # everything after it belongs to lofid, --help and --version included
        from lofid.daemon import main as lofid_main

        return lofid_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = config.load(cli_flags(args))
        return args.func(args, settings)
    except config.ConfigError as e:
        print_error(INVALID_CONFIG, str(e))
    except (LofiError, CliError) as e:
        print_error(e.code, e.message)
    except TimeoutError:
        print_error(TIMEOUT, f"lofid did not answer within {args.timeout or 0:g} s (--timeout)")
    except UntrustedDaemon as e:
        print_error(UNTRUSTED_DAEMON, str(e))
    except Disconnected:
        print_error(DISCONNECTED, "lofid closed the connection before answering")
    except (rpc.FrameError, rpc.MessageError) as e:
        print_error(BAD_FRAME, f"what answered on the socket does not speak lofid's protocol: {e}")
    except KeyboardInterrupt:
        print("lofictl: interrupted (the daemon keeps the job)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`lofictl tracks | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as e:  # a bug: one line, no traceback
        print_error(INTERNAL, f"{type(e).__name__}: {e} (a bug in lofictl; please report it)")
    return 1
