"""The plugin as a user meets it on a stock Neovim: a UI of 80x24 attached, cmdheight=1,
Neovim's own vim.notify and vim.ui. Every message must fit the one line of the message
area: a longer one leaves the editor in a "Press ENTER" prompt, where it answers no rpc
and runs no timer until a key is pressed. After each message the test checks the screen
(the message on the last line only), that the editor does not wait for a key
(nvim_get_mode's `blocking`), and that nvim_eval answers (within a generous 2 s).
"""

from __future__ import annotations

import re

import pytest
from conftest import Daemon, make_fake_model
from nvim.editor import Nvim, editors, failing_player, needs_nvim

from lofid.models import size_text
from lofid.variants import hub_files

pytestmark = needs_nvim


@pytest.fixture
def start_nvim(short_tmp):
    yield from editors(short_tmp)


def stock_editor(start_nvim, env: dict, setup: dict | None = None) -> Nvim:
    nvim = start_nvim(env=env, setup=setup, harness=False)
    assert nvim.lua("return vim.notify == vim.notify and require('lofi.util').is_stock(vim.notify)")
    nvim.cmd("set cmdheight=1")
    nvim.attach(80, 24)
    return nvim


def one_line(nvim: Nvim, text: str, timeout: float = 20.0) -> str:
    """Wait for a message holding `text`; check it is on the last line alone and that the
    editor goes on; return that line."""
    lines = nvim.wait_screen(text, timeout)
    screen = "\n".join(lines)
    rows = [i for i, line in enumerate(lines) if "lofi:" in line]
    assert rows == [len(lines) - 1], screen
    assert "Press ENTER" not in screen, screen
    assert not nvim.is_blocked(), screen
    assert nvim.answers_quickly(), screen
    return lines[-1]


def clear(nvim: Nvim) -> None:
    nvim.cmd("echo ''")
    nvim.pump(0.1)


def test_messages_fit_one_line_without_a_daemon(start_nvim, short_tmp):
    nvim = stock_editor(start_nvim, {"LOFID_SOCKET": str(short_tmp / "nothing" / "lofid.sock")},
                        setup={"players": ["no-such-player"]})
    nvim.cmd("LofiGenerate some music")
    line = one_line(nvim, "NOT_RUNNING")
    assert line.startswith("lofi: NOT_RUNNING: lofid is not running") and line.endswith("…"), line
    # the whole message, with its hint, is kept for :LofiStatus and :checkhealth
    full = nvim.lua("return require('lofi.util').last_error.text")
    assert "nothing/lofid.sock" in full and "setup({ auto_start = true })" in full, full
    clear(nvim)
    nvim.cmd("LofiStatus")  # only reports: it does not start lofid either
    one_line(nvim, "NOT_RUNNING")
    clear(nvim)
    nvim.cmd("LofiGenerate rain seed=-1")
    assert "INVALID_PARAMS: seed must be" in one_line(nvim, "INVALID_PARAMS")
    clear(nvim)
    nvim.cmd("LofiGenerate rain play=maybe")
    assert "play must be true or false" in one_line(nvim, "INVALID_PARAMS")
    clear(nvim)
    wav = short_tmp / "x.wav"
    wav.write_bytes(b"RIFF")
    nvim.cmd(f"LofiPlay {wav}")
    assert "no audio player found" in one_line(nvim, "NO_PLAYER")
    clear(nvim)
    nvim.cmd("LofiPlay 0123456789abcdef")
    one_line(nvim, "NOT_RUNNING")
    clear(nvim)
    # auto_start with a lofid that exits at once
    fail = short_tmp / "bin" / "lofid"
    fail.parent.mkdir()
    fail.write_text("#!/bin/sh\necho 'lofid: invalid configuration: nope' >&2\nexit 2\n")
    fail.chmod(0o755)
    nvim.lua("require('lofi').setup({ auto_start = true, lofid_cmd = { ... } })", str(fail))
    nvim.cmd("LofiGenerate some music")
    assert "START_FAILED: lofid exited with code 2" in one_line(nvim, "START_FAILED")


def test_messages_fit_one_line_with_a_daemon(daemon, start_nvim, short_tmp):
    bad = failing_player(short_tmp, "badplay", "badplay: audio open error: No such device, and more words after it")
    nvim = stock_editor(start_nvim, {"LOFID_SOCKET": str(daemon.socket)},
                        setup={"players": [[str(bad)]], "progress_interval_ms": 200})
    # progress, in place and out of :messages, then the track
    nvim.cmd("LofiGenerate a long prompt to fill the message line, with piano and rain step=0.01 duration=5")
    one_line(nvim, "generating")
    line = one_line(nvim, "ready")
    assert line.startswith("lofi: ♪ ready: "), line
    history = nvim.request("nvim_exec", "messages", True)
    assert "ready" in history and "generating" not in history and "queued" not in history, history
    clear(nvim)
    nvim.cmd("LofiGenerate too long duration=500")
    one_line(nvim, "INVALID_DURATION")
    clear(nvim)
    nvim.cmd("LofiGenerate broken nan@20 step=0.002 duration=5")
    one_line(nvim, "MODEL_INFERENCE_FAILED")
    clear(nvim)
    nvim.cmd("LofiPlay 0123456789abcdef")
    one_line(nvim, "TRACK_NOT_FOUND")
    clear(nvim)
    nvim.cmd("LofiPlay")
    assert "PLAYER_FAILED: cannot play it: badplay: audio open error" in one_line(nvim, "PLAYER_FAILED")
    clear(nvim)
    # :LofiStatus was asked for: its lines may take the screen, and the last error is there
    # in full
    nvim.cmd("LofiStatus")
    status = nvim.wait_screen("last error")
    assert any("No such device, and more words after it" in line for line in status), "\n".join(status)
    nvim.request("nvim_input", "<CR>")
    nvim.pump(0.2)
    assert not nvim.is_blocked()
    # lofid killed mid-generation, then back
    nvim.cmd("LofiGenerate doomed step=0.02 duration=5")
    nvim.wait_screen("generating")
    daemon.kill()
    assert "lofid went away during “doomed" in one_line(nvim, "DISCONNECTED")
    daemon.start()
    one_line(nvim, "reconnected to lofid")
    one_line(nvim, "ready")


def test_consent_outside_insert_mode_one_line_each_way(short_tmp, start_nvim):
    """The model is missing: the question waits while the user types, then takes one line
    and one key; each answer (no, yes with a failing hub, yes) is one line too."""
    from fakehub import FakeHub

    served = make_fake_model(short_tmp / "served")
    with FakeHub(served) as hub:
        d = Daemon(short_tmp, env=hub.env(short_tmp / "hf"))  # no --model-dir: the HF cache, empty
        d.start()
        try:
            nvim = stock_editor(start_nvim, {"LOFID_SOCKET": str(d.socket)})
            # the size is the hub's where it answers in time, else the labelled estimate
            size = size_text(sum((served / f).stat().st_size for f in hub_files("int8")))
            sizes = f"{re.escape(size)}|about 1\\.0 GB, an estimate"
            question = re.compile(rf"lofi: download the int8 model \(({sizes})\)\? \[y/N\]$")
            nvim.request("nvim_input", "i")
            nvim.cmd("LofiGenerate consent please step=0.002 duration=5")
            nvim.request("nvim_input", "typing along")
            nvim.pump(1.5)
            assert nvim.request("nvim_get_mode") == {"mode": "i", "blocking": False}
            assert not any("download the" in "\n".join(s) for s in nvim.screen.shown)  # not asked yet
            nvim.request("nvim_input", "<Esc>")
            assert one_line_question(nvim, question)
            nvim.request("nvim_input", "n")
            line = one_line(nvim, "MODEL_NOT_FOUND")
            assert line.startswith("lofi: MODEL_NOT_FOUND: download declined"), line
            assert nvim.request("nvim_buf_get_lines", 0, 0, -1, False) == ["typing along"]
            assert hub.count("GET") == 0

            hub.fail("*", 404)
            nvim.cmd("LofiGenerate consent please step=0.002 duration=5")
            one_line_question(nvim, question)
            nvim.request("nvim_input", "y")
            one_line(nvim, "downloading the model")
            line = one_line(nvim, "MODEL_DOWNLOAD_FAILED")
            assert line.startswith("lofi: MODEL_DOWNLOAD_FAILED: model download failed: "), line

            # the consent was given (lofid remembers it): the next generation downloads and
            # generates without asking
            hub.clear()
            mark = len(nvim.screen.shown)
            nvim.cmd("LofiGenerate consent please step=0.002 duration=5")
            one_line(nvim, "ready")
            assert not any("[y/N]" in "\n".join(s) for s in nvim.screen.shown[mark:])
        finally:
            d.stop()


def one_line_question(nvim: Nvim, question: str | re.Pattern) -> bool:
    """The question on the last line alone; while it waits for the key that answers it, the
    editor still answers rpc requests."""
    if isinstance(question, str):
        question = re.compile(re.escape(question) + "$")
    lines = nvim.wait_screen("[y/N]")
    assert [i for i, line in enumerate(lines) if "lofi:" in line] == [len(lines) - 1], "\n".join(lines)
    assert question.match(lines[-1]), lines[-1]
    assert nvim.answers_quickly()
    return True
