"""Find a system audio player and play a WAV file with it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lofictl.output import NO_PLAYER, PLAYER_FAILED, CliError

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
        raise CliError(NO_PLAYER, f"no audio player found (tried {', '.join(n for n, _ in PLAYERS)}); "
                       f"the track is {path}")
    try:
        done = subprocess.run([*player, str(path)], check=False)  # an argument list: never a shell
    except OSError as e:
        raise CliError(PLAYER_FAILED, f"cannot run {player[0]}: {e.strerror or e}; the track is {path}") from None
    if done.returncode != 0:
        raise CliError(PLAYER_FAILED, f"{Path(player[0]).name} exited with status {done.returncode}; "
                       f"the track is {path}")
