"""The subcommands that talk to lofid: each ``cmd_*`` takes the parsed arguments and the
local settings and returns the exit status. ``config`` and ``service`` are in admin.py."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from lofictl.client import Client, Disconnected
from lofictl.connect import connect, running_status, stop, warn_if_settings_differ
from lofictl.output import (
    CANCELLED,
    DISCONNECTED,
    INVALID_PARAMS,
    TIMEOUT,
    TRACK_NOT_READY,
    Bar,
    CliError,
    emit,
    human_age,
    human_bytes,
    note,
)
from lofictl.player import StreamPlayback, find_players, play
from lofid import config, errors
from lofid.errors import LofiError

TICK_SEC = 1.0  # how often a waiting line (the model's preparation) is redrawn
PREPARING = "the {variant} model for this machine (once per variant; up to a minute for int4)"


# -- generate -------------------------------------------------------------------


def ask_consent(err: LofiError, yes: bool) -> bool:
    size = human_bytes(err.data.get("download_bytes"))
    if err.data.get("download_bytes_estimated"):
        size = f"about {size} (an estimate: the hub did not answer)"
    question = f"Download {size} of model files from {err.data.get('repo', 'gabotechs/music_gen')}? [y/N] "
    if yes:
        return True
    if not sys.stdin.isatty():
        raise CliError(err.code, f"{err.message} (run with --yes, or `lofictl models download`)")
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def utf8_prompt(prompt: str) -> str:
    """The prompt as given, or INVALID_PARAMS where the shell passed bytes that are not UTF-8."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = prompt[e.start:e.end].encode("utf-8", "surrogateescape")
        raise CliError(INVALID_PARAMS, f"the prompt is not UTF-8 text (byte 0x{raw[0]:02x} at character "
                       f"{e.start + 1}); lofid takes UTF-8 prompts") from None
    return prompt


def request_generate(c: Client, req: dict, yes: bool) -> dict:
    """``generate``, asking for consent (once) where the model must be downloaded first."""
    try:
        return c.call("generate", req)
    except LofiError as e:
        if not (e.code == errors.MODEL_NOT_FOUND and e.data.get("consent_required")):
            raise
        if not ask_consent(e, yes):
            raise CliError(CANCELLED, "no consent to download the model; nothing was generated") from None
    return c.call("generate", {**req, "allow_download": True})


def track_record(c: Client, track_id: str, cached: bool, fallback: dict) -> dict:
    """The complete track's record as ``track`` gives it, with ``cached``: the same fields
    whether it was generated now or served from the cache."""
    try:
        record = c.call("track", {"track_id": track_id})
    except LofiError:  # removed by someone else meanwhile
        record = fallback
    return {**record, "cached": cached}


def stream_playback(args) -> StreamPlayback | None:
    """With --play (and waiting): a playback from the stream, where a player reads PCM on stdin."""
    players = find_players(stream=True) if args.play and not args.no_wait else []
    return StreamPlayback(players) if players else None


def cmd_generate(args, settings) -> int:
    req = {"prompt": utf8_prompt(args.prompt), "duration_sec": args.duration, "priority": args.priority}
    if args.seed is not None:
        req["seed"] = args.seed
    playback = stream_playback(args)
    with connect(args, settings, start=True) as c:
        try:
            r = request_generate(c, {**req, "stream": True} if playback else req, args.yes)
        except LofiError as e:
            if not (playback and e.code == errors.INVALID_PARAMS and "stream" in e.message):
                raise
            playback = None  # a lofid without streaming: the file is played once complete
            r = request_generate(c, req, args.yes)
        if r["status"] == "complete":  # from the cache: no chunks come
            record = track_record(c, r["track_id"], True, r)
        elif args.no_wait:
            emit(args, r, r["track_id"])
            return 0
        else:
            try:
                record = track_record(c, r["track_id"], False, wait_for_track(c, r["track_id"], args, playback))
            except BaseException:
                if playback is not None:
                    playback.abort()
                raise
        streamed = playback is not None and playback.started  # the PCM went to the player's stdin
        wav = c.track_path(record.get("path")) if args.play and not streamed else None
    if streamed:
        try:
            playback.wait(record["path"])
        except BaseException:
            playback.abort()
            raise
    elif wav is not None:
        play(wav)
    emit(args, record, record["path"])
    return 0


class Watch:
    """A job's (or a download's) progress on stderr: download, the model's one-time
    preparation (with its elapsed time), generation."""

    def __init__(self, quiet: bool, playback: StreamPlayback | None = None) -> None:
        self.bar = Bar(quiet)
        self.preparing: tuple[str, float] | None = None  # (variant, since)
        self.playback = playback  # gets the audio_chunk notifications

    def model(self, model: dict) -> None:
        """The model's state when the wait starts (from ``status``)."""
        if model.get("state") == "preparing":
            self.preparing = (model.get("variant"), time.monotonic() - (model.get("state_sec") or 0))
            self.tick()
        elif model.get("state") in ("present", "loading"):  # the job waits for the model load
            self.bar.show("loading", 0, f"the {model.get('variant', '')} model")

    def event(self, method: str, p: dict) -> None:
        if method == "generation_progress":
            self.preparing = None
            eta = f"~{p['eta_sec']:.0f}s" if p.get("eta_sec") is not None else ""
            self.bar.show("generating", p["percent"], eta)
        elif method == "download_progress":
            self.bar.show("download", p.get("percent") or 0,
                          f"{human_bytes(p.get('bytes_done'))}/{human_bytes(p.get('bytes_total'))}")
        elif method == "model_preparing":
            self.preparing = (p.get("variant"), time.monotonic())
            self.tick()
        elif method == "audio_chunk" and self.playback is not None:
            self.playback.chunk(p)

    def tick(self) -> None:
        if self.preparing is not None:
            variant, since = self.preparing
            self.bar.say("preparing", PREPARING.format(variant=variant), f"{time.monotonic() - since:.0f} s")


def follow(c: Client, args, watch: Watch, match: Callable[[str, dict], bool],
           last: Callable[[str, dict], bool]) -> tuple[str, dict]:
    """Show the notifications ``match`` accepts until one that is ``last``; -> that one.
    --timeout bounds the wait for each; the line is redrawn every TICK_SEC meanwhile."""
    heard = time.monotonic()
    try:
        while True:
            try:
                method, p = c.notification(timeout=TICK_SEC, match=match)
            except TimeoutError:
                if args.timeout is not None and time.monotonic() - heard > args.timeout:
                    raise CliError(TIMEOUT, f"nothing from lofid for {args.timeout:g} s (--timeout); "
                                   "it keeps the job") from None
                watch.tick()
                continue
            heard = time.monotonic()
            watch.event(method, p)
            if last(method, p):
                return method, p
    finally:
        watch.bar.done()


def wait_for_track(c: Client, track_id: str, args, playback: StreamPlayback | None = None) -> dict:
    """Show the job's progress (and pass its chunks to ``playback``) until it completes
    (-> the generation_complete payload)."""
    watch = Watch(args.json, playback)
    watch.model(c.call("status").get("model") or {})

    def match(method: str, p: dict) -> bool:
        return p.get("track_id") == track_id or method.startswith("download_") or method == "model_preparing"

    try:
        method, p = follow(c, args, watch, match, lambda m, p: m in ("generation_complete", "generation_error"))
    except Disconnected:
        raise CliError(DISCONNECTED, "lofid went away during the generation") from None
    if method == "generation_error":
        raise LofiError.from_dict(p)
    return p


# -- status, stop ---------------------------------------------------------------


def cmd_status(args, settings) -> int:
    with connect(args, settings) as c:
        s = c.call("status")
    m = s["model"]
    since = f" ({m['state_sec']:.0f} s)" if m.get("state") in ("downloading", "preparing", "loading") \
        and m.get("state_sec") is not None else ""
    lines = [f"lofid {s['version']} (pid {s['pid']}, up {s['uptime_sec']:.0f}s)",
             f"model: {m.get('state')}{since} {m.get('variant')} {m.get('model_version') or ''} "
             f"device={m.get('device') or '-'} provider={m.get('provider') or '-'}",
             f"worker: pid {s['worker']['pid'] or '-'}, restarts {s['worker']['restarts']}"]
    if isinstance(s.get("settings"), dict):
        lines.append("settings: " + " ".join(f"{k}={s['settings'].get(k)}" for k in
                                             ("model_dir", "variant", "device", "threads", "top_k", "temperature",
                                              "guidance_scale")))
    if s.get("running"):
        lines.append(f"running: {s['running']['track_id']} {s['running']['percent']}%")
    lines += [f"queued {q['position']}: {q['track_id']} [{q['priority']}] {q['prompt'][:60]}" for q in s["queue"]]
    emit(args, s, "\n".join(lines))
    return 0


def cmd_stop(args, settings) -> int:
    with connect(args, settings, check_settings=False) as c:
        s = c.call("status")
        dropped = ([s["running"]["track_id"]] if s.get("running") else []) + [q["track_id"] for q in s["queue"]]
        stop(c, settings)
    text = f"stopped lofid (pid {s['pid']})"
    if dropped:
        text += f"; its unfinished jobs were dropped (ask again to generate them): {' '.join(dropped)}"
    emit(args, {"stopped": True, "pid": s["pid"], "dropped": dropped}, text)
    return 0


# -- tracks, play ---------------------------------------------------------------


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


def cmd_play(args, settings) -> int:
    with connect(args, settings, start=True) as c:
        record = c.call("track", {"track_id": args.track})
        if record.get("status") == "failed":
            err = record.get("error") or {}
            raise CliError(TRACK_NOT_READY, f"track {args.track} failed: {err.get('code')}: {err.get('message')}")
        if record.get("status") != "complete":
            raise CliError(TRACK_NOT_READY, f"track {args.track} is {record.get('status')}")
        wav = c.track_path(record.get("path"))
    play(wav)
    return 0


# -- models ---------------------------------------------------------------------


def cmd_models(args, settings) -> int:
    if args.models_cmd == "download":
        return models_download(args, settings)
    status = running_status(args, settings)
    if status is not None and isinstance(status.get("settings"), dict):
        note(f"the models as the running lofid (pid {status['pid']}) sees them")
        warn_if_settings_differ(status, settings, args)
        settings = config.from_dict(status["settings"], "the running lofid's status")
    rows = model_rows(settings, (status or {}).get("model") if status else None)
    text = "\n".join(f"{'*' if r['default'] else ' '} {r['variant']:5} "
                     f"{'present' if r['present'] else 'missing'}  {human_bytes(r['bytes']):>9}  "
                     f"{r['where'] or '(not downloaded)'}"
                     + (f"  (lofid: {r['daemon_state']})" if r.get("daemon_state") else "") for r in rows)
    emit(args, rows, text)
    return 0


def model_rows(settings: config.Settings, daemon_model: dict | None) -> list[dict]:
    """Each variant: present or missing, its size, where; ``daemon_state`` for the running
    lofid's own variant."""
    from lofid import models, variants

    rows = []
    for variant in variants.NAMES:
        loc = models.locate(variant, settings.model_dir, hash_cache_dir=settings.state_dir)
        size = sum(p.stat().st_size for f in variants.hub_files(variant)
                   if loc.root is not None and (p := loc.path(f)).exists())
        row = {"variant": variant, "present": not loc.missing, "missing": loc.missing, "bytes": size,
               "where": str(loc.root) if loc.root else None, "model_version": loc.model_version,
               "default": variant == settings.variant}
        if daemon_model is not None and variant == settings.variant:
            row["daemon_state"] = daemon_model.get("state")
        rows.append(row)
    return rows


def models_download(args, settings) -> int:
    with connect(args, settings, start=True) as c:
        c.call("download_model", {"force": args.force, **({"variant": args.variant} if args.variant else {})})
        try:
            method, p = follow(c, args, Watch(args.json),
                               lambda m, p: m.startswith("download_") or m == "model_preparing",
                               lambda m, p: m in ("download_complete", "download_error"))
        except Disconnected:
            raise CliError(DISCONNECTED, "lofid went away during the download") from None
    if method == "download_error":
        raise LofiError.from_dict(p)
    if p.get("prepare_error"):
        e = p["prepare_error"]
        note(f"downloaded, but the first load failed: {e.get('code')}: {e.get('message')}")
    emit(args, p, f"downloaded {p.get('variant')} ({p.get('model_version')})")
    return 0
