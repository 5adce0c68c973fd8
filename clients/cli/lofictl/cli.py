"""``lofictl``: generate music, watch progress, list and play tracks, manage models,
the configuration and the service. This module holds the parser and ``main``; the
commands are in ``commands.py``."""

from __future__ import annotations

import argparse
import sys

from lofictl import commands
from lofictl.client import Disconnected
from lofictl.connect import cli_flags
from lofictl.output import CliError, print_error
from lofid import config
from lofid.errors import LofiError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lofictl", description="Generate music with the local lofid daemon.")
    p.add_argument("--socket", help="lofid socket (env LOFID_SOCKET)")
    p.add_argument("--config", help="config file (env LOFID_CONFIG)")
    p.add_argument("--no-start", action="store_true", help="do not start lofid when it is not running")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the daemon (default: forever)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate a track and print its WAV path")
    g.add_argument("prompt")
    g.add_argument("--duration", type=float, default=30.0, help="seconds of audio, 5-120 (default 30)")
    g.add_argument("--seed", type=int, help="seed for reproducible output (default: random)")
    g.add_argument("--priority", choices=("normal", "high"), default="normal")
    g.add_argument("--no-wait", action="store_true", help="print the track id at once and return")
    g.add_argument("--yes", "-y", action="store_true", help="consent to downloading the model if needed")
    g.add_argument("--play", action="store_true", help="play the track when it is ready")
    g.set_defaults(func=commands.cmd_generate)

    sub.add_parser("status", help="daemon, model, worker and queue").set_defaults(func=commands.cmd_status)
    t = sub.add_parser("tracks", help="list generated tracks, newest first (or remove them)")
    t.add_argument("--limit", type=int)
    tsub = t.add_subparsers(dest="tracks_cmd", metavar="ACTION")
    trm = tsub.add_parser("rm", help="remove tracks from the cache")
    trm.add_argument("track_ids", nargs="+", metavar="TRACK_ID")
    tpr = tsub.add_parser("prune", help="remove least recently used tracks down to cache_max_mb")
    how = tpr.add_mutually_exclusive_group()
    how.add_argument("--all", action="store_true", help="remove every complete track")
    how.add_argument("--max-mb", type=int, help="prune down to this many MB instead of cache_max_mb")
    t.set_defaults(func=commands.cmd_tracks)
    pl = sub.add_parser("play", help="play a track with a system player")
    pl.add_argument("track", help="track id")
    pl.set_defaults(func=commands.cmd_play)

    m = sub.add_parser("models", help="list or download model files")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    msub.add_parser("list", help="variants, present or missing, sizes, where")
    md = msub.add_parser("download", help="download a variant (gives consent)")
    md.add_argument("--variant", choices=config.VARIANTS)
    md.add_argument("--force", action="store_true", help="download again even if present (repairs corrupt files)")
    m.set_defaults(func=commands.cmd_models)

    sub.add_parser("config", help="the effective settings, where each comes from, and every path") \
        .set_defaults(func=commands.cmd_config)
    sv = sub.add_parser("service", help="install lofid as a user service (systemd or launchd)")
    sv.add_argument("service_cmd", choices=("install", "uninstall", "status"), metavar="install|uninstall|status")
    sv.add_argument("--manager", choices=("systemd", "launchd"), help="default: launchd on macOS, else systemd")
    sv.add_argument("--dir", help="where the units or the plist go (default: ~/.config/systemd/user or "
                    "~/Library/LaunchAgents)")
    sv.add_argument("--no-enable", action="store_true", help="install: only write the files")
    sv.set_defaults(func=commands.cmd_service)

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
        print_error("INVALID_CONFIG", str(e))
    except (LofiError, CliError) as e:
        print_error(e.code, e.message)
    except (TimeoutError, Disconnected) as e:
        print_error("DAEMON_UNAVAILABLE", str(e))
    except KeyboardInterrupt:
        print("lofictl: interrupted (the daemon keeps the job)", file=sys.stderr)
        return 130
    return 1
