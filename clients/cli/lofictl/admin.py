"""``lofictl config`` and ``lofictl service``: how lofid is set up on this machine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lofictl import service
from lofictl.client import Disconnected
from lofictl.connect import cli_flags, running, running_status, stop, warn_if_settings_differ
from lofictl.output import SERVICE_FAILED, CliError, emit, human_bytes, note
from lofid import config, dependencies
from lofid.errors import LofiError


def cmd_config(args, settings) -> int:
    """The running lofid's settings when one answers (it keeps those it started with), else
    the ones a lofid started from this shell would have; where each comes from; every path."""
    status = running_status(args, settings)
    if status is not None and isinstance(status.get("settings"), dict):
        warn_if_settings_differ(status, settings, args)
        shown_settings = config.from_dict(status["settings"], "the running lofid's status")
        sources = status.get("settings_sources") or {}
        daemon = {"pid": status["pid"], "socket": str(settings.socket)}
        title = f"# the running lofid's settings (pid {status['pid']}, {settings.socket})"
    else:
        shown_settings, sources = config.load_with_sources(cli_flags(args))
        daemon = None
        title = (f"# no lofid answers on {settings.socket}: the settings of one started now"
                 if status is None else "# the running lofid does not report its settings: this shell's")
    values = shown_settings.to_dict()
    where = paths_of(shown_settings)
    warnings = [w for w in (dependencies.onnxruntime_conflict(),) if w]
    if args.json:
        emit(args, {"settings": values, "sources": sources, "paths": where, "daemon": daemon,
                    "warnings": warnings}, "")
        return 0
    width = max(map(len, values))
    lines = [title, "# defaults < config file < environment (LOFID_*) < flags"]
    for key, value in values.items():
        text = "unset" if value is None else json.dumps(value) if isinstance(value, str) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        lines.append(f"{key:<{width}}  {text:<44}  # {sources.get(key, '?')}")
    lines.append("")
    lines.append("# paths")
    pwidth = max(map(len, where))
    lines += [f"{name:<{pwidth}}  {path}" for name, path in where.items()]
    if warnings:
        lines += ["", "# warnings (this Python's packages)", *warnings]
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
        raise CliError(SERVICE_FAILED, str(e)) from None


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
        stop_unmanaged_daemon(args, settings)
        ran = manager.activate(next(iter(files)))
        for argv in ran:
            print(f"ran: {' '.join(argv)}", file=sys.stderr)
    emit(args, {"manager": manager.name, "files": [str(p) for p in files], "command": command,
                "ran": ran}, f"lofid is installed as a {manager.name} service: {' '.join(command)}")
    return 0


def stop_unmanaged_daemon(args, settings) -> None:
    """A lofid started by lofictl would keep its lock while the service takes its socket path."""
    try:
        client = running(args, settings)
        if client is None:
            return
        with client:
            status = client.call("status")
            if status.get("running") or status.get("queue"):
                note(f"note: lofid (pid {status['pid']}) is busy; it keeps running until you stop it "
                     "(`lofictl stop`; `lofictl` can then reach the service)")
                return
            stop(client, settings)
    except (CliError, OSError, TimeoutError, LofiError, Disconnected):
        return
    note(f"stopped the running lofid (pid {status['pid']}) so that the service can take over")


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
