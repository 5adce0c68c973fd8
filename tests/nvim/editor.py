"""A headless Neovim with the plugin loaded, driven over its own msgpack-rpc socket.

Neovim runs with ``--listen <socket>`` and the plugin on its runtimepath; the test
drives it with ``nvim_exec_lua`` / ``nvim_command`` / ``nvim_eval`` (the same
msgpack-rpc dialect as lofid's, so ``lofictl.client.Client`` speaks it).
tests/nvim/harness.lua (loaded unless ``harness=False``) records ``vim.notify``
messages and answers ``vim.ui.select`` / ``vim.ui.input`` from queues the test fills.
Without it the editor keeps Neovim's own ``vim.notify`` and ``vim.ui``, and a test can
attach a UI (``attach``) and read the screen as a user sees it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from lofictl.client import Client, Disconnected

from lofid import rpc

ROOT = Path(__file__).resolve().parent.parent.parent
NVIM = os.environ.get("LOFI_TEST_NVIM") or shutil.which("nvim")  # LOFI_TEST_NVIM: another Neovim to test
PLUGIN = ROOT / "clients" / "nvim"
HARNESS = ROOT / "tests" / "nvim" / "harness.lua"
LAST_TRACK = "local t = require('lofi').state.last_track; return t and {track_id = t.track_id, path = t.path}"
needs_nvim = pytest.mark.skipif(NVIM is None, reason="nvim is not installed")


class Screen:
    """The grid of an attached UI (ext_linegrid), kept up to date from redraw events, and
    every screen the editor showed (at each flush), so that a message shown briefly is
    seen too."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.shown: list[list[str]] = []
        self.read = 0  # screens in `shown` that a wait went past

    def apply(self, batches: list) -> None:
        for batch in batches:
            handler = getattr(self, "_" + str(batch[0]), None)
            if handler is not None:
                for args in batch[1:]:
                    handler(*args)

    def _grid_resize(self, grid, width, height) -> None:
        self.rows = [[" "] * width for _ in range(height)]

    def _grid_clear(self, grid) -> None:
        self.rows = [[" "] * len(row) for row in self.rows]

    def _grid_line(self, grid, row, col, cells, *rest) -> None:
        line = self.rows[row]
        for cell in cells:
            text, repeat = cell[0], cell[2] if len(cell) > 2 else 1
            for _ in range(repeat):
                if col < len(line):
                    line[col] = text
                col += 1

    def _grid_scroll(self, grid, top, bot, left, right, rows, cols) -> None:
        old = [row[:] for row in self.rows]
        for r in range(top, bot):
            src = r + rows
            if top <= src < bot:
                self.rows[r][left:right] = old[src][left:right]

    def _flush(self) -> None:
        self.shown.append(self.lines())

    def lines(self) -> list[str]:
        return ["".join(row).rstrip() for row in self.rows]

    def text(self) -> str:
        return "\n".join(self.lines())


class Nvim(Client):
    """A msgpack-rpc client for Neovim's --listen socket."""

    screen: Screen | None = None

    def _read(self, timeout: float) -> None:
        self.sock.settimeout(None if timeout == float("inf") else max(0.001, timeout))
        data = self.sock.recv(65536)
        if not data:
            raise Disconnected("nvim closed the connection")
        for value in self.decoder.feed(data):
            msg = rpc.parse(value)
            if isinstance(msg, rpc.Response):
                self._responses[msg.msgid] = msg
            elif isinstance(msg, rpc.Notification) and msg.method == "redraw" and self.screen is not None:
                self.screen.apply(msg.params)
            elif isinstance(msg, rpc.Notification):
                self.notifications.append((msg.method, msg.params[0] if msg.params else {}))

    def request(self, method: str, *params, timeout: float | None = None):
        msgid = next(self._ids)
        self.sock.sendall(rpc.request(msgid, method, list(params)))
        return self.response(msgid, timeout)

    def lua(self, code: str, *args, timeout: float | None = None):
        return self.request("nvim_exec_lua", code, list(args), timeout=timeout)

    def cmd(self, command: str) -> None:
        self.request("nvim_command", command)

    def wait(self, code: str, *args, timeout: float = 20.0, interval: float = 0.05):
        """Evaluate Lua until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.lua(code, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {code}\nmessages: {self.texts()}")
            time.sleep(interval)

    def texts(self, pattern: str | None = None) -> list[str]:
        return self.lua("return _G.lofi_test and _G.lofi_test.texts(...) or {}", pattern) or []

    def answer(self, kind: str, *answers) -> None:
        self.lua("vim.list_extend(_G.lofi_test.answers[...], {select(2, ...)})", kind, *answers)

    def asked(self) -> list[dict]:
        return self.lua("return _G.lofi_test.asked")

    def last_track(self):
        return self.lua(LAST_TRACK)

    def statusline(self) -> str:
        return self.lua("return require('lofi').statusline()")

    # -- an attached UI -------------------------------------------------------------------

    def attach(self, width: int = 80, height: int = 24) -> Screen:
        self.screen = Screen()
        self.request("nvim_ui_attach", width, height, {"ext_linegrid": True, "rgb": True})
        return self.screen

    def pump(self, seconds: float) -> None:
        """Take in what the editor sends (screen updates) for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._read(left)
            except TimeoutError:
                return

    def wait_screen(self, text: str, timeout: float = 20.0) -> list[str]:
        """Read screen updates until a screen shows ``text`` (one after those an earlier
        wait returned); return that screen's lines."""
        deadline = time.monotonic() + timeout
        screen = self.screen
        while True:
            for i in range(screen.read, len(screen.shown)):
                if text in "\n".join(screen.shown[i]):
                    screen.read = i + 1
                    return screen.shown[i]
            screen.read = len(screen.shown)
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never showed; the screen:\n{screen.text()}")
            self.pump(0.05)

    def is_blocked(self) -> bool:
        """Whether the editor waits for a key (a "Press ENTER" prompt, a question), the
        state in which it answers no rpc request and runs no timer."""
        return self.request("nvim_get_mode", timeout=2)["blocking"]

    def answers_quickly(self) -> bool:
        """nvim_eval answers within 2 s (it never does while a prompt waits for a key)."""
        try:
            return self.request("nvim_eval", "1+1", timeout=2) == 2
        except TimeoutError:
            return False


def editors(short_tmp: Path):
    """For a fixture: yields start(env=..., setup={...}) -> Nvim, a headless editor with
    the plugin loaded; every editor started is stopped after the yield."""
    procs: list[tuple[subprocess.Popen, Nvim]] = []

    def start(env: dict | None = None, setup: dict | None = None, path_prepend: Path | None = None,
              harness: bool = True, home: Path | None = None) -> Nvim:
        n = len(procs)
        sock = short_tmp / f"nvim{n}.sock"
        xdg = short_tmp / f"xdg{n}"
        e = {**os.environ, "XDG_CONFIG_HOME": str(xdg / "config"), "XDG_DATA_HOME": str(xdg / "data"),
             "XDG_CACHE_HOME": str(xdg / "cache"), "XDG_STATE_HOME": str(xdg / "state")}
        e.pop("LOFID_SOCKET", None)
        if path_prepend is not None:
            e["PATH"] = f"{path_prepend}{os.pathsep}{e.get('PATH', '')}"
        if home is not None:
            e["HOME"] = str(home)
        e.update(env or {})
        argv = [NVIM, "--headless", "--clean", "-n", "--listen", str(sock), "--cmd", f"set rtp^={PLUGIN}"]
        if harness:
            argv += ["--cmd", f"luafile {HARNESS}"]
        proc = subprocess.Popen(argv, env=e, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(short_tmp / f"nvim{n}.log", "ab"), cwd=short_tmp)
        deadline = time.monotonic() + 10
        while True:
            try:
                client = Nvim(sock, timeout=10)
                break
            except OSError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nvim did not start: {(short_tmp / f'nvim{n}.log').read_text()}") from err
                time.sleep(0.02)
        procs.append((proc, client))
        if setup is not False:
            client.lua("require('lofi').setup(...)", {"progress_interval_ms": 1000, **(setup or {})})
        return client

    yield start
    for proc, client in procs:
        try:
            client.close()
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fake_player(tmp: Path, name: str = "fakeplay") -> tuple[Path, Path]:
    """A 'player' script that logs "<pid> <file>" per run and plays for 0.4 s."""
    log = tmp / f"{name}.log"
    script = tmp / name
    script.write_text(f'#!/bin/sh\necho "$$ $1" >> {log}\nsleep 0.4\n')
    script.chmod(0o755)
    return script, log


def failing_player(tmp: Path, name: str, message: str) -> Path:
    """A 'player' that fails at once, as aplay does without a sound device."""
    script = tmp / name
    script.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    script.chmod(0o755)
    return script


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def lofid_wrapper(d, bindir: Path) -> Path:
    """A `lofid` first on PATH that runs `python -m lofid` with the test's flags and env."""
    bindir.mkdir(parents=True, exist_ok=True)
    argv = d.argv()
    i = argv.index("--socket")
    del argv[i:i + 2]  # the plugin passes --socket itself
    keep = ("HF_HOME", "PYTHONPATH", "LOFID_ENGINE")
    exports = "".join(f"export {k}='{d.env[k]}'\n" for k in keep)
    script = bindir / "lofid"
    script.write_text("#!/bin/sh\n" + exports + "exec " + " ".join(f"'{a}'" for a in argv) + ' "$@"\n')
    script.chmod(0o755)
    return bindir
