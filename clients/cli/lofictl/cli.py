"""``lofictl``: generate music, watch progress, list and play tracks, manage models."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lofid import config, errors
from lofid.errors import LofiError
from lofictl.client import Client, Disconnected

PLAYERS = (
    ("pw-play", []),
    ("paplay", []),
    ("aplay", ["-q"]),
    ("afplay", []),
    ("ffplay", ["-nodisp", "-autoexit", "-loglevel", "quiet"]),
    ("mpv", ["--no-video", "--really-quiet"]),
)
START_TIMEOUT_SEC = 20.0


class CliError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# -- connecting -----------------------------------------------------------------


def connect(args, settings: config.Settings) -> Client:
    """Connect to lofid, starting it in the background if nothing answers."""
    try:
        return Client(settings.socket, timeout=args.timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        if args.no_start:
            raise CliError("DAEMON_NOT_RUNNING", f"no lofid answers on {settings.socket} (and --no-start was given)")
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


# -- output ---------------------------------------------------------------------


class Bar:
    """One progress line on stderr, redrawn in place on a terminal, else a line per 10 %."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last_text = None
        self.last_decile = -1

    def show(self, label: str, percent: float, extra: str = "") -> None:
        if self.quiet:
            return
        percent = max(0.0, min(100.0, percent))
        if self.tty:
            filled = int(percent / 100 * 30)
            text = f"\r{label:<10} [{'#' * filled}{'.' * (30 - filled)}] {percent:3.0f}% {extra}"
            if text != self.last_text:
                sys.stderr.write(text.ljust(78))
                sys.stderr.flush()
                self.last_text = text
        elif int(percent // 10) != self.last_decile:
            self.last_decile = int(percent // 10)
            print(f"{label} {percent:.0f}% {extra}".rstrip(), file=sys.stderr)

    def done(self) -> None:
        if not self.quiet and self.tty and self.last_text:
            sys.stderr.write("\n")
        self.last_text, self.last_decile = None, -1


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


def emit(args, value, text: str) -> None:
    print(json.dumps(value, ensure_ascii=False) if args.json else text)


# -- commands -------------------------------------------------------------------


def ask_consent(err: LofiError, yes: bool) -> bool:
    size = human_bytes(err.data.get("download_bytes"))
    question = f"Download {size} of model files from {err.data.get('repo', 'gabotechs/music_gen')}? [y/N] "
    if yes:
        return True
    if not sys.stdin.isatty():
        raise CliError(err.code, f"{err.message} (run with --yes, or `lofictl models download`)")
    return input(question).strip().lower() in ("y", "yes")


def cmd_generate(args, settings) -> int:
    req = {"prompt": args.prompt, "duration_sec": args.duration, "priority": args.priority}
    if args.seed is not None:
        req["seed"] = args.seed
    with connect(args, settings) as c:
        try:
            r = c.call("generate", req)
        except LofiError as e:
            if not (e.code == errors.MODEL_NOT_FOUND and e.data.get("consent_required")):
                raise
            if not ask_consent(e, args.yes):
                raise CliError(e.code, "no consent to download the model; nothing was generated") from None
            r = c.call("generate", {**req, "allow_download": True})
        if args.no_wait or r["status"] == "complete":
            if r["status"] == "complete" and args.play:
                play(Path(r["path"]))
            emit(args, r, r.get("path") or r["track_id"])
            return 0
        bar = Bar(args.json)

        def on_event(method: str, p: dict) -> None:
            if method == "generation_progress":
                eta = f"~{p['eta_sec']:.0f}s" if p.get("eta_sec") is not None else ""
                bar.show("generating", p["percent"], eta)
            elif method == "download_progress":
                bar.show("download", p.get("percent") or 0,
                         f"{human_bytes(p.get('bytes_done'))}/{human_bytes(p.get('bytes_total'))}")

        def watch(method: str, p: dict) -> bool:
            return p.get("track_id") == r["track_id"] or method.startswith("download_")

        try:
            while True:
                method, p = c.notification(timeout=None if args.timeout is None else args.timeout, match=watch)
                on_event(method, p)
                if method == "generation_complete":
                    break
                if method == "generation_error":
                    raise LofiError.from_dict(p)
        except Disconnected:
            raise CliError(errors.MODEL_INFERENCE_FAILED, "the daemon went away during the generation") from None
        finally:
            bar.done()
    if args.play:
        play(Path(p["path"]))
    emit(args, p, p["path"])
    return 0


def cmd_status(args, settings) -> int:
    with connect(args, settings) as c:
        s = c.call("status")
    m = s["model"]
    lines = [f"lofid {s['version']} (pid {s['pid']}, up {s['uptime_sec']:.0f}s)",
             f"model: {m.get('state')} {m.get('variant')} {m.get('model_version') or ''} "
             f"device={m.get('device') or '-'} provider={m.get('provider') or '-'}",
             f"worker: pid {s['worker']['pid'] or '-'}, restarts {s['worker']['restarts']}"]
    if s.get("running"):
        lines.append(f"running: {s['running']['track_id']} {s['running']['percent']}%")
    lines += [f"queued {q['position']}: {q['track_id']} [{q['priority']}] {q['prompt'][:60]}" for q in s["queue"]]
    emit(args, s, "\n".join(lines))
    return 0


def cmd_tracks(args, settings) -> int:
    with connect(args, settings) as c:
        tracks = c.call("tracks", {"limit": args.limit} if args.limit else None)
    now = time.time()
    lines = []
    for t in tracks:
        size = os.path.getsize(t["path"]) if os.path.exists(t["path"]) else 0
        age = now - t.get("created_at", now)
        lines.append(f"{t['track_id']}  {t['duration_sec']:5.1f}s  {human_bytes(size):>9}  "
                     f"{age / 3600:6.1f}h ago  {t['prompt'][:50]}")
    emit(args, tracks, "\n".join(lines) if lines else "no tracks yet")
    return 0


def find_player() -> list[str] | None:
    for name, extra in PLAYERS:
        exe = shutil.which(name)
        if exe:
            return [exe, *extra]
    return None


def play(path: Path) -> None:
    player = find_player()
    if player is None:
        raise CliError("NO_PLAYER", f"no audio player found (tried {', '.join(n for n, _ in PLAYERS)}); "
                       f"the track is {path}")
    subprocess.run([*player, str(path)], check=False)  # an argument list: never a shell


def cmd_play(args, settings) -> int:
    with connect(args, settings) as c:
        record = c.call("track", {"track_id": args.track})
    if record.get("status") != "complete":
        raise CliError("TRACK_NOT_READY", f"track {args.track} is {record.get('status')}")
    play(Path(record["path"]))
    return 0


def cmd_models(args, settings) -> int:
    from lofid.worker import assets

    if args.models_cmd == "list":
        rows = []
        for variant in assets.VARIANTS:
            loc = assets.locate(variant, settings.model_dir, hash_cache_dir=settings.state_dir)
            size = sum(p.stat().st_size for f in assets.variant_files(variant)
                       if loc.root is not None and (p := loc.path(f)).exists())
            rows.append({"variant": variant, "present": not loc.missing, "missing": loc.missing,
                         "bytes": size, "where": str(loc.root) if loc.root else None,
                         "model_version": loc.model_version, "default": variant == settings.variant})
        text = "\n".join(f"{'*' if r['default'] else ' '} {r['variant']:5} "
                         f"{'present' if r['present'] else 'missing'}  {human_bytes(r['bytes']):>9}  "
                         f"{r['where'] or '(not downloaded)'}" for r in rows)
        emit(args, rows, text)
        return 0
    with connect(args, settings) as c:
        c.call("download_model", {"variant": args.variant or settings.variant, "force": args.force})
        bar = Bar(args.json)
        try:
            while True:
                method, p = c.notification(timeout=None, match=lambda m, p: m.startswith("download_"))
                if method == "download_progress":
                    bar.show("download", p.get("percent") or 0,
                             f"{human_bytes(p.get('bytes_done'))}/{human_bytes(p.get('bytes_total'))}")
                elif method == "download_error":
                    raise LofiError.from_dict(p)
                else:
                    break
        finally:
            bar.done()
    emit(args, p, f"downloaded {p.get('variant')} ({p.get('model_version')})")
    return 0


# -- parser ---------------------------------------------------------------------


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
    g.set_defaults(func=cmd_generate)

    sub.add_parser("status", help="daemon, model, worker and queue").set_defaults(func=cmd_status)
    t = sub.add_parser("tracks", help="list generated tracks, newest first")
    t.add_argument("--limit", type=int)
    t.set_defaults(func=cmd_tracks)
    pl = sub.add_parser("play", help="play a track with a system player")
    pl.add_argument("track", help="track id")
    pl.set_defaults(func=cmd_play)

    m = sub.add_parser("models", help="list or download model files")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    msub.add_parser("list", help="variants, present or missing, sizes, where")
    md = msub.add_parser("download", help="download a variant (gives consent)")
    md.add_argument("--variant", choices=("fp32", "fp16", "int8"))
    md.add_argument("--force", action="store_true", help="download again even if present (repairs corrupt files)")
    m.set_defaults(func=cmd_models)

    sub.add_parser("daemon", help="run lofid in the foreground (same as `lofid`; its flags follow)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["daemon"]:  # everything after it belongs to lofid, --help and --version included
        from lofid.daemon import main as lofid_main

        return lofid_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        flags = {"socket": args.socket, "config": args.config}
        settings = config.load(flags)
        return args.func(args, settings)
    except config.ConfigError as e:
        print(f"lofictl: INVALID_CONFIG: {e}", file=sys.stderr)
    except LofiError as e:
        print(f"lofictl: {e.code}: {e.message}", file=sys.stderr)
    except CliError as e:
        print(f"lofictl: {e.code}: {e.message}", file=sys.stderr)
    except (TimeoutError, Disconnected) as e:
        print(f"lofictl: DAEMON_UNAVAILABLE: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("lofictl: interrupted (the daemon keeps the job)", file=sys.stderr)
        return 130
    return 1
