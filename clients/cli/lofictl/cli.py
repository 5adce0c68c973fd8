"""``lofictl``: generate music, watch progress, list and play tracks, manage models,
the configuration and the service."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lofictl import service
from lofictl.client import Client, Disconnected, UntrustedDaemon
from lofid import config, errors, paths
from lofid.errors import LofiError

PLAYERS = (  # name, options; "--" ends the options of those that take it, before the file
    ("pw-play", ["--"]),
    ("paplay", ["--"]),
    ("aplay", ["-q", "--"]),
    ("afplay", []),
    ("ffplay", ["-nodisp", "-autoexit", "-loglevel", "quiet", "--"]),
    ("mpv", ["--no-video", "--really-quiet", "--"]),
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
    log = paths.open_private_log(paths.private_dir(settings.state_dir) / "lofid.log")  # it holds prompts
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
        self.last_label, self.last_decile = None, -1

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
        elif (label, int(percent // 10)) != (self.last_label, self.last_decile):
            self.last_label, self.last_decile = label, int(percent // 10)
            print(f"{label} {percent:.0f}% {extra}".rstrip(), file=sys.stderr)

    def done(self) -> None:
        if not self.quiet and self.tty and self.last_text:
            sys.stderr.write("\n")
        self.last_text, self.last_label, self.last_decile = None, None, -1


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
                play(c.track_path(r["path"]))
            emit(args, r, r.get("path") or r["track_id"])
            return 0
        bar = Bar(args.json)
        model = c.call("status").get("model") or {}
        if model.get("state") in ("present", "loading"):   # the job waits for the model load
            bar.show("loading", 0, f"the {model.get('variant', '')} model (the first load of "
                     "a variant rewrites it: seconds, ~20 s for int4)")

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
        wav = c.track_path(p["path"]) if args.play else None
    if wav is not None:
        play(wav)
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
    if args.tracks_cmd == "rm":
        return tracks_rm(args, settings)
    if args.tracks_cmd == "prune":
        return tracks_prune(args, settings)
    with connect(args, settings) as c:
        tracks = c.call("tracks", {"limit": args.limit} if args.limit else None)
    now = time.time()
    lines = []
    for t in tracks:
        size = t.get("size_bytes")
        if size is None:
            size = os.path.getsize(t["path"]) if os.path.exists(t["path"]) else 0
        age = now - t.get("created_at", now)
        lines.append(f"{t['track_id']}  {t['duration_sec']:5.1f}s  {human_bytes(size):>9}  "
                     f"{human_age(age):>9}  {t['prompt'][:50]}")
    if lines:
        total = sum(t.get("size_bytes") or 0 for t in tracks)
        cap = f" of {settings.cache_max_mb} MB (cache_max_mb)" if settings.cache_max_mb else ""
        lines.append(f"{len(tracks)} track{'s' if len(tracks) != 1 else ''}, {human_bytes(total)}{cap}")
    emit(args, tracks, "\n".join(lines) if lines else "no tracks yet")
    return 0


def human_age(sec: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if sec >= size:
            return f"{sec / size:.0f} {unit} ago"
    return f"{max(0, sec):.0f} s ago"


def tracks_rm(args, settings) -> int:
    results, failed = [], 0
    with connect(args, settings) as c:
        for tid in args.track_ids:
            try:
                r = c.call("track_delete", {"track_id": tid})
            except LofiError as e:
                print(f"lofictl: {e.code}: {e.message}", file=sys.stderr)
                failed += 1
                continue
            results.append(r)
    emit(args, results, "\n".join(f"removed {r['track_id']} ({human_bytes(r['bytes_freed'])})" for r in results))
    return 1 if failed else 0


def tracks_prune(args, settings) -> int:
    req = {"all": True} if args.all else ({"max_mb": args.max_mb} if args.max_mb is not None else {})
    with connect(args, settings) as c:
        r = c.call("cache_prune", req)
    n = len(r["removed"])
    emit(args, r, f"removed {n} track{'s' if n != 1 else ''} ({human_bytes(r['bytes_freed'])}); "
         f"{r['tracks_left']} left ({human_bytes(r['bytes_left'])})")
    return 0


# -- config ---------------------------------------------------------------------


def cmd_config(args, settings) -> int:
    settings, sources = config.load_with_sources(cli_flags(args))
    values = settings.to_dict()
    where = paths_of(settings)
    if args.json:
        emit(args, {"settings": values, "sources": sources, "paths": where}, "")
        return 0
    width = max(map(len, values))
    lines = ["# effective settings: defaults < config file < environment (LOFID_*) < flags"]
    for key, value in values.items():
        shown = "unset" if value is None else json.dumps(value) if isinstance(value, str) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        lines.append(f"{key:<{width}}  {shown:<44}  # {sources[key]}")
    lines.append("")
    lines.append("# paths")
    pwidth = max(map(len, where))
    lines += [f"{name:<{pwidth}}  {path}" for name, path in where.items()]
    emit(args, None, "\n".join(lines))
    return 0


def paths_of(settings: config.Settings) -> dict[str, str]:
    """Every place lofid reads or writes, with a word on whether it exists."""

    def state(p: Path, what: str = "") -> str:
        return f"{p}{'' if p.exists() else ' (does not exist yet)'}{what}"

    try:
        from huggingface_hub import constants as hf

        hf_cache = Path(hf.HF_HUB_CACHE)
    except ImportError:
        hf_cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or
                        Path.home() / ".cache" / "huggingface") / "hub")
    cache = settings.cache_dir
    usage = ""
    if cache.is_dir():
        from lofid.broker.tracks import TrackCache

        entries = TrackCache(cache).entries()
        usage = f" ({len(entries)} tracks, {human_bytes(sum(e.size for e in entries))})"
    manager = service.Manager.for_platform()
    units = manager.installed()
    return {
        "socket": state(settings.socket),
        "lock": str(settings.socket.with_name(settings.socket.name + ".lock")),
        "config file": state(settings.config),
        "track cache": state(cache, usage),
        "state": state(settings.state_dir),
        "models": str(settings.model_dir) if settings.model_dir else f"Hugging Face cache: {state(hf_cache)}",
        "daemon log": f"{settings.state_dir / 'lofid.log'} (started by lofictl); "
                      + ("~/Library/Logs/lofid.log (launchd)" if manager.name == "launchd"
                         else "journalctl --user -u lofid (systemd)"),
        "service": ", ".join(map(str, units)) if units else f"not installed ({manager.directory})",
    }


# -- service --------------------------------------------------------------------


def cmd_service(args, settings) -> int:
    manager = service.Manager.for_platform(args.manager, args.dir)
    try:
        if args.service_cmd == "install":
            return service_install(args, settings, manager)
        if args.service_cmd == "uninstall":
            return service_uninstall(args, manager)
        return service_status(args, settings, manager)
    except service.ServiceError as e:
        raise CliError("SERVICE_FAILED", str(e)) from None


def service_install(args, settings, manager: service.Manager) -> int:
    command = service.lofid_command()
    files = manager.files(command, settings.socket)
    manager.directory.mkdir(parents=True, exist_ok=True)
    if manager.name == "launchd":
        (Path.home() / "Library" / "Logs").mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
        print(f"wrote {path}", file=sys.stderr)
    stray = sorted(k for k in os.environ if k.startswith("LOFID_"))
    if stray:
        print(f"lofictl: note: the service does not see this shell's {', '.join(stray)}; "
              f"put settings in {settings.config}", file=sys.stderr)
    ran = []
    if not args.no_enable:
        stop_unmanaged_daemon(settings)
        ran = manager.activate(next(iter(files)))
        for argv in ran:
            print(f"ran: {' '.join(argv)}", file=sys.stderr)
    emit(args, {"manager": manager.name, "files": [str(p) for p in files], "command": command,
                "ran": ran}, f"lofid is installed as a {manager.name} service: {' '.join(command)}")
    return 0


def stop_unmanaged_daemon(settings) -> None:
    """A lofid started by lofictl would keep its lock while the service takes its socket path."""
    try:
        with Client(settings.socket, timeout=5) as c:
            status = c.call("status")
            pid = status["pid"]
            if status.get("running") or status.get("queue"):
                print(f"lofictl: note: lofid (pid {pid}) is busy; it keeps running until you stop it "
                      "(`lofictl` can then reach the service)", file=sys.stderr)
                return
            c.call("shutdown")
    except (OSError, TimeoutError, LofiError, Disconnected):
        return
    print(f"lofictl: stopped the running lofid (pid {pid}) so that the service can take over", file=sys.stderr)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.1)


def service_uninstall(args, manager: service.Manager) -> int:
    installed = manager.installed()
    if installed:
        manager.deactivate()
    for path in installed:
        path.unlink(missing_ok=True)
        print(f"removed {path}", file=sys.stderr)
    if installed and manager.name == "systemd":
        manager.run(["systemctl", "--user", "daemon-reload"], check=False)
    emit(args, {"manager": manager.name, "removed": [str(p) for p in installed]},
         "lofid service removed" if installed else f"no lofid service was installed in {manager.directory}")
    return 0


def service_status(args, settings, manager: service.Manager) -> int:
    installed = manager.installed()
    expected = manager.files(service.lofid_command(), settings.socket)
    stale = [str(p) for p in installed if p in expected and p.read_bytes() != expected[p]]
    state = manager.state() if installed else {}
    result = {"manager": manager.name, "installed": [str(p) for p in installed], "stale": stale, **state}
    lines = [f"{manager.name}: " + (", ".join(map(str, installed)) if installed
                                    else f"not installed (`lofictl service install` writes {manager.directory})")]
    lines += [f"{p}: differs from what this installation would write; run `lofictl service install`" for p in stale]
    lines += [f"{k}: {v}" for k, v in state.items()]
    emit(args, result, "\n".join(lines))
    active = state.get("loaded") or state.get("socket") == "active"
    return 0 if installed and active else 3


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
        wav = c.track_path(record.get("path"))
    play(wav)
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
    t = sub.add_parser("tracks", help="list generated tracks, newest first (or remove them)")
    t.add_argument("--limit", type=int)
    tsub = t.add_subparsers(dest="tracks_cmd", metavar="ACTION")
    trm = tsub.add_parser("rm", help="remove tracks from the cache")
    trm.add_argument("track_ids", nargs="+", metavar="TRACK_ID")
    tpr = tsub.add_parser("prune", help="remove least recently used tracks down to cache_max_mb")
    how = tpr.add_mutually_exclusive_group()
    how.add_argument("--all", action="store_true", help="remove every complete track")
    how.add_argument("--max-mb", type=int, help="prune down to this many MB instead of cache_max_mb")
    t.set_defaults(func=cmd_tracks)
    pl = sub.add_parser("play", help="play a track with a system player")
    pl.add_argument("track", help="track id")
    pl.set_defaults(func=cmd_play)

    m = sub.add_parser("models", help="list or download model files")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    msub.add_parser("list", help="variants, present or missing, sizes, where")
    md = msub.add_parser("download", help="download a variant (gives consent)")
    md.add_argument("--variant", choices=config.VARIANTS)
    md.add_argument("--force", action="store_true", help="download again even if present (repairs corrupt files)")
    m.set_defaults(func=cmd_models)

    sub.add_parser("config", help="the effective settings, where each comes from, and every path") \
        .set_defaults(func=cmd_config)
    sv = sub.add_parser("service", help="install lofid as a user service (systemd or launchd)")
    sv.add_argument("service_cmd", choices=("install", "uninstall", "status"), metavar="install|uninstall|status")
    sv.add_argument("--manager", choices=("systemd", "launchd"), help="default: launchd on macOS, else systemd")
    sv.add_argument("--dir", help="where the units or the plist go (default: ~/.config/systemd/user or "
                    "~/Library/LaunchAgents)")
    sv.add_argument("--no-enable", action="store_true", help="install: only write the files")
    sv.set_defaults(func=cmd_service)

    sub.add_parser("daemon", help="run lofid in the foreground (same as `lofid`; its flags follow)")
    return p


def cli_flags(args) -> dict:
    return {"socket": args.socket, "config": args.config}


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
        print(f"lofictl: INVALID_CONFIG: {e}", file=sys.stderr)
    except LofiError as e:
        print(f"lofictl: {e.code}: {e.message}", file=sys.stderr)
    except CliError as e:
        print(f"lofictl: {e.code}: {e.message}", file=sys.stderr)
    except UntrustedDaemon as e:
        print(f"lofictl: UNTRUSTED_DAEMON: {e}", file=sys.stderr)
    except (TimeoutError, Disconnected) as e:
        print(f"lofictl: DAEMON_UNAVAILABLE: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("lofictl: interrupted (the daemon keeps the job)", file=sys.stderr)
        return 130
    return 1
