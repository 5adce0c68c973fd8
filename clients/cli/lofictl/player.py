"""Find a system audio player and play a WAV file with it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lofictl.output import CliError

PLAYERS = (
    ("pw-play", []),
    ("paplay", []),
    ("aplay", ["-q"]),
    ("afplay", []),
    ("ffplay", ["-nodisp", "-autoexit", "-loglevel", "quiet"]),
    ("mpv", ["--no-video", "--really-quiet"]),
)


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
