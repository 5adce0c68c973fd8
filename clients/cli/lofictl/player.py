"""Find a system audio player; play a WAV file with it, or play a track while it is
generated from its ``audio_chunk`` notifications (the player reads raw PCM on stdin)."""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lofictl.output import NO_PLAYER, PLAYER_FAILED, CliError


@dataclass(frozen=True)
class Player:
    name: str
    file_args: tuple[str, ...]  # before the WAV's path; "--" ends the options of those that take it
    # to read 16-bit little-endian mono PCM at {rate} Hz on stdin; None: it cannot
    stream_args: tuple[str, ...] | None


PLAYERS = (
    Player("pw-play", ("--",), ("--format", "s16", "--rate", "{rate}", "--channels", "1", "-")),
    Player("paplay", ("--",), ("--raw", "--format=s16le", "--rate={rate}", "--channels=1")),
    Player("aplay", ("-q", "--"), ("-q", "-t", "raw", "-f", "S16_LE", "-r", "{rate}", "-c", "1", "-")),
    Player("afplay", (), None),
    Player("ffplay", ("-nodisp", "-autoexit", "-loglevel", "quiet", "--"),
           ("-nodisp", "-autoexit", "-loglevel", "quiet", "-f", "s16le", "-ar", "{rate}", "-i", "pipe:0")),
    Player("mpv", ("--no-video", "--really-quiet", "--"),
           ("--no-video", "--really-quiet", "--demuxer=rawaudio", "--demuxer-rawaudio-format=s16le",
            "--demuxer-rawaudio-rate={rate}", "--demuxer-rawaudio-channels=1", "-")),
    Player("play", ("-q",), ("-q", "-t", "raw", "-r", "{rate}", "-e", "signed", "-b", "16", "-c", "1", "-L", "-")),
)


def find_player(stream: bool = False) -> tuple[str, Player] | None:
    """The first player on PATH (-> its executable and entry); with ``stream``, the first
    that can read PCM on stdin."""
    for player in PLAYERS:
        if stream and player.stream_args is None:
            continue
        exe = shutil.which(player.name)
        if exe:
            return exe, player
    return None


def play(path: Path) -> None:
    """Play the WAV at ``path`` (a path ``client.check_track_path`` accepted: absolute, so no
    player takes it for an option even where it has no "--")."""
    found = find_player()
    if found is None:
        raise CliError(NO_PLAYER, f"no audio player found (tried {', '.join(p.name for p in PLAYERS)}); "
                       f"the track is {path}")
    exe, player = found
    run([exe, *player.file_args, str(path)], path)


def run(argv: list[str], path: Path) -> None:
    try:
        done = subprocess.run(argv, check=False)  # an argument list: never a shell
    except OSError as e:
        raise CliError(PLAYER_FAILED, f"cannot run {argv[0]}: {e.strerror or e}; the track is {path}") from None
    check_exit(argv[0], done.returncode, path)


def check_exit(exe: str, returncode: int, path: Path | str) -> None:
    if returncode != 0:
        raise CliError(PLAYER_FAILED, f"{Path(exe).name} exited with status {returncode}; the track is {path}")


class StreamPlayback:
    """Plays a track from its chunks while it is generated. The player starts
    ``start_after_sec`` after chunk 0 arrives and reads the PCM on stdin; a thread feeds it,
    so that reading the socket never waits for the player (lofid drops a client that stops
    reading)."""

    def __init__(self, exe: str, player: Player) -> None:
        self.exe, self.player = exe, player
        self.chunks: queue.Queue[bytes | None] = queue.Queue()
        self.next_seq = 0
        self.ended = False  # the last chunk (or the end of the stream) was queued
        self.proc: subprocess.Popen | None = None
        self.error: CliError | None = None
        self.thread: threading.Thread | None = None
        self.aborted = threading.Event()

    @property
    def started(self) -> bool:
        return self.thread is not None

    def chunk(self, p: dict) -> None:
        """One ``audio_chunk`` notification (they come in ``seq`` order)."""
        if self.ended or p.get("seq") != self.next_seq:
            return  # a repeat, or a stream this playback did not start with
        self.next_seq += 1
        if self.thread is None:
            argv = [self.exe, *(a.format(rate=int(p["sample_rate"])) for a in self.player.stream_args)]
            start_at = time.monotonic() + max(0.0, float(p.get("start_after_sec") or 0))
            self.thread = threading.Thread(target=self._feed, args=(argv, start_at), daemon=True,
                                           name="lofictl-player")
            self.thread.start()
        self.chunks.put(bytes(p["pcm"]))
        if p.get("last"):
            self.end()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.chunks.put(None)

    def _feed(self, argv: list[str], start_at: float) -> None:
        if self.aborted.wait(max(0.0, start_at - time.monotonic())):
            return
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        except OSError as e:
            self.error = CliError(PLAYER_FAILED, f"cannot run {argv[0]}: {e.strerror or e}")
            return
        while (data := self.chunks.get()) is not None:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except OSError:  # the player quit; its exit status tells why
                break
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def wait(self, path: Path | str) -> None:
        """After the track completed: let the player finish; PLAYER_FAILED if it failed."""
        self.end()
        self.thread.join()
        if self.error is not None:
            raise self.error
        check_exit(self.exe, self.proc.wait(), path)

    def abort(self) -> None:
        """The track failed, or the user pressed Ctrl-C: stop the player."""
        self.aborted.set()
        self.end()
        if self.thread is not None:
            self.thread.join(timeout=1.0)  # the player starts (and is stopped below) or never will
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
