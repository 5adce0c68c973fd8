"""``lofictl service install|uninstall|status``: lofid as a per-user service.

Linux: the socket unit and the service unit in ``~/.config/systemd/user`` (socket
activation: systemd listens, and starts lofid on the first connection), then
``systemctl --user daemon-reload`` and ``enable --now lofid.socket``.
macOS: a LaunchAgent in ``~/Library/LaunchAgents``, loaded with
``launchctl bootstrap gui/UID``. Either way the units name the absolute path of this
installation's lofid (its venv, pipx or system interpreter).

The templates below are also the repository's ``systemd/`` and ``launchd/`` files
(a test keeps them identical); the lofid command (and in the plist ``@HOME@``) is
filled in at install time.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lofid import paths

SOCKET_UNIT = """\
# lofid's socket: systemd listens and starts lofid.service on the first connection.
# Installed by `lofictl service install` into ~/.config/systemd/user/.
[Unit]
Description=lofid socket (local AI music daemon)

[Socket]
ListenStream=%t/lofid/lofid.sock
SocketMode=0600
DirectoryMode=0700
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
"""

SERVICE_UNIT = """\
# lofid, started by lofid.socket. As shipped it runs the lofid on systemd's PATH;
# `lofictl service install` writes ExecStart= with the absolute path of its own lofid.
[Unit]
Description=lofid, local AI music daemon (MusicGen-small on ONNX Runtime)
Requires=lofid.socket
After=lofid.socket

[Service]
Type=notify
ExecStart=/usr/bin/env lofid
Restart=on-failure
RestartSec=2
# 2 = invalid configuration: restarting cannot help; see `journalctl --user -u lofid`
RestartPreventExitStatus=2
# lofid finishes writing the current file, stops its worker and exits
TimeoutStopSec=30

[Install]
Also=lofid.socket
"""

LABEL = "org.lofid.daemon"
UNITS = ("lofid.socket", "lofid.service")


def plist(command: list[str], home: str) -> dict:
    """The LaunchAgent: lofid in the foreground, started at login, restarted when it fails."""
    log = f"{home}/Library/Logs/lofid.log"
    return {
        "Label": LABEL,
        "ProgramArguments": command,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ProcessType": "Interactive",
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }


def lofid_command() -> list[str]:
    """This installation's lofid, as an absolute command line."""
    beside = Path(sys.executable).parent / "lofid"  # a venv's or pipx's bin/, or the system's
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    found = shutil.which("lofid")
    if found:
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "lofid"]


def _systemd_quote(arg: str) -> str:
    """One ExecStart= word: specifiers (%) and variables ($) escaped, quoted if needed."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9/._+:@=,%$-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_units(command: list[str], socket_path: Path | None = None) -> dict[str, str]:
    """The two unit files; the socket listens on ``socket_path`` when it is not the default."""
    socket_unit = SOCKET_UNIT
    if socket_path is not None:
        socket_unit = socket_unit.replace("ListenStream=%t/lofid/lofid.sock",
                                          "ListenStream=" + str(socket_path).replace("%", "%%"))
    exec_start = "ExecStart=" + " ".join(_systemd_quote(a) for a in command) + "\n"
    service = SERVICE_UNIT.replace("ExecStart=/usr/bin/env lofid\n", exec_start)
    return {"lofid.socket": socket_unit, "lofid.service": service}


def render_plist(command: list[str], home: str) -> bytes:
    return plistlib.dumps(plist(command, home))


# -- the service managers -------------------------------------------------------


class ServiceError(Exception):
    pass


@dataclass
class Manager:
    name: str  # "systemd" or "launchd"
    directory: Path
    dry_run: bool = False

    @classmethod
    def for_platform(cls, name: str | None = None, directory: str | None = None) -> Manager:
        name = name or ("launchd" if sys.platform == "darwin" else "systemd")
        if directory:
            d = Path(directory).expanduser()
        elif name == "launchd":
            d = Path.home() / "Library" / "LaunchAgents"
        else:
            config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
            d = Path(config_home) / "systemd" / "user"
        return cls(name, d.absolute())

    # files ------------------------------------------------------------------------

    def files(self, command: list[str], socket_path: Path) -> dict[Path, bytes]:
        """What install writes: path -> content."""
        if self.name == "launchd":
            return {self.directory / f"{LABEL}.plist": render_plist(command, str(Path.home()))}
        custom = None if socket_path == _systemd_default_socket() else socket_path
        return {self.directory / name: text.encode() for name, text in render_units(command, custom).items()}

    def installed(self) -> list[Path]:
        names = [f"{LABEL}.plist"] if self.name == "launchd" else list(UNITS)
        return [self.directory / n for n in names if (self.directory / n).exists()]

    # commands -----------------------------------------------------------------------

    def run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        exe = shutil.which(argv[0])
        if exe is None:
            raise ServiceError(f"{argv[0]} not found on PATH; the files are in {self.directory}")
        r = subprocess.run([exe, *argv[1:]], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise ServiceError(f"`{' '.join(argv)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
        return r

    def _gui(self) -> str:
        return f"gui/{os.getuid()}"

    def activate(self, plist_path: Path | None = None) -> list[list[str]]:
        if self.name == "launchd":
            self.run(["launchctl", "bootout", f"{self._gui()}/{LABEL}"], check=False)  # an older copy
            cmds = [["launchctl", "bootstrap", self._gui(), str(plist_path)]]
        else:
            cmds = [["systemctl", "--user", "daemon-reload"],
                    ["systemctl", "--user", "enable", "--now", "lofid.socket"]]
        for argv in cmds:
            self.run(argv)
        return cmds

    def deactivate(self) -> None:
        if self.name == "launchd":
            self.run(["launchctl", "bootout", f"{self._gui()}/{LABEL}"], check=False)
        else:
            self.run(["systemctl", "--user", "disable", "--now", *UNITS], check=False)

    def state(self) -> dict:
        """What the manager says about lofid (None where the tool is missing)."""
        try:
            if self.name == "launchd":
                r = self.run(["launchctl", "print", f"{self._gui()}/{LABEL}"], check=False)
                return {"loaded": r.returncode == 0}
            enabled = self.run(["systemctl", "--user", "is-enabled", "lofid.socket"], check=False).stdout.strip()
            active = self.run(["systemctl", "--user", "is-active", *UNITS], check=False).stdout.split()
            return {"enabled": enabled or None, "socket": active[0] if active else None,
                    "service": active[1] if len(active) > 1 else None}
        except ServiceError:
            return {}


def _systemd_default_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "lofid" / "lofid.sock" if runtime else paths.default_socket()
