"""Find a system audio player; play a WAV file with it, or play a track while it is
generated from its ``audio_chunk`` notifications (the player reads raw PCM on stdin).

The players found on PATH are tried in the order of PLAYERS: one that fails at once (no
sound device, say) gives way to the next, which plays the track from its start; when all
fail, PLAYER_FAILED names each with the last line of its stderr. A player's stdout is
discarded and its stderr kept for that message: nothing of theirs reaches the terminal."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lofictl.output import NO_PLAYER, PLAYER_FAILED, CliError

QUICK_SEC = 1.0  # a player that exits with an error sooner than this failed to start
STDERR_KEEP = 4096  # bytes of a player's stderr kept for the error message


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


def find_players(stream: bool = False) -> list[tuple[str, Player]]:
    """The players on PATH, in order (-> their executable and entry); with ``stream``, those
    that can read PCM on stdin."""
    found = []
    for player in PLAYERS:
        if stream and player.stream_args is None:
            continue
        exe = shutil.which(player.name)
        if exe:
            found.append((exe, player))
    return found


class PlayerRun:
    """One player process, started from an argument list (never a shell): stdout discarded,
    the tail of its stderr kept by a thread (so that a chatty player never blocks on it)."""

    def __init__(self, argv: list[str], stdin: int | None = None) -> None:
        self.name = Path(argv[0]).name
        self.started = time.monotonic()
        self.exited: float | None = None
        self.stderr = b""
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read_stderr, daemon=True, name=f"lofictl-{self.name}-stderr")
        self.reader.start()

    def _read_stderr(self) -> None:
        with self.proc.stderr:
            while data := self.proc.stderr.read1(65536):
                self.stderr = (self.stderr + data)[-STDERR_KEEP:]

    def wait(self) -> int:
        returncode = self.proc.wait()
        self.exited = time.monotonic()
        self.reader.join(timeout=1.0)  # a child of the player may hold its stderr open
        return returncode

    def failed_at_once(self, returncode: int) -> bool:
        """It exited with an error (not a signal: stopped on purpose) as soon as it started."""
        return returncode > 0 and self.exited is not None and self.exited - self.started < QUICK_SEC

    def failure(self, returncode: int) -> str:
        """How it failed: the last line of its stderr (led by its name) and its exit status."""
        how = f"exited with status {returncode}" if returncode >= 0 else f"was killed by signal {-returncode}"
        lines = [line.strip() for line in self.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
        if not lines:
            return f"{self.name} {how}"
        last = lines[-1] if lines[-1].startswith(f"{self.name}:") else f"{self.name}: {lines[-1]}"
        return f"{last} ({how})"

    def stop(self, wait_sec: float = 0.0) -> None:
        """Terminate it (if it still runs), and wait up to ``wait_sec`` for it to end."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(wait_sec)
            except subprocess.TimeoutExpired:
                pass


def close_quietly(stdin) -> bool:
    """Close a player's stdin: False if it had quit already."""
    try:
        stdin.close()
    except OSError:
        return False
    return True


def cannot_run(exe: str, e: OSError) -> str:
    return f"{Path(exe).name}: cannot run it: {e.strerror or e}"


def play(path: Path) -> None:
    """Play the WAV at ``path`` with the first player on PATH that does not fail at once
    (a path ``client.check_track_path`` accepted: absolute, so no player takes it for an
    option even where it has no "--")."""
    players = find_players()
    if not players:
        raise CliError(NO_PLAYER, f"no audio player found (tried {', '.join(p.name for p in PLAYERS)}); "
                       f"the track is {path}")
    failures = []
    for exe, player in players:
        try:
            run = PlayerRun([exe, *player.file_args, str(path)])
        except OSError as e:
            failures.append(cannot_run(exe, e))
            continue
        try:
            returncode = run.wait()
        except BaseException:  # Ctrl-C: the player stops too
            run.stop(wait_sec=1.0)
            raise
        if returncode == 0:
            return
        failures.append(run.failure(returncode))
        if not run.failed_at_once(returncode):
            break  # it played, then failed: no other player starts the track again
    raise CliError(PLAYER_FAILED, f"{'; '.join(failures)}; the track is {path}")


class StreamPlayback:
    """Plays a track from its chunks while it is generated. The player starts
    ``start_after_sec`` after chunk 0 arrives and reads the PCM on stdin; a thread feeds it,
    so that reading the socket never waits for the player (lofid drops a client that stops
    reading). Every chunk received is kept, so that a player failing before it read them all
    gives way to the next one, which gets the PCM from the start."""

    def __init__(self, players: list[tuple[str, Player]]) -> None:
        self.players = players
        self.received: list[bytes] = []  # the PCM of the chunks so far, in order
        self.changed = threading.Condition()  # guards received, ended, aborted, run
        self.next_seq = 0
        self.ended = False  # the last chunk (or the end of the stream) was received
        self.aborted = False
        self.run: PlayerRun | None = None  # the player now fed
        self.failures: list[str] = []
        self.failed = False  # every player failed (self.failures says how)
        self.thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self.thread is not None

    def chunk(self, p: dict) -> None:
        """One ``audio_chunk`` notification (they come in ``seq`` order)."""
        if self.ended or p.get("seq") != self.next_seq:
            return  # a repeat, or a stream this playback did not start with
        self.next_seq += 1
        if self.thread is None:
            start_at = time.monotonic() + max(0.0, float(p.get("start_after_sec") or 0))
            self.thread = threading.Thread(target=self._feed, args=(int(p["sample_rate"]), start_at), daemon=True,
                                           name="lofictl-player")
            self.thread.start()
        with self.changed:
            self.received.append(bytes(p["pcm"]))
            self.changed.notify_all()
        if p.get("last"):
            self.end()

    def end(self) -> None:
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def _feed(self, rate: int, start_at: float) -> None:
        """The feeding thread: each player in turn until one plays the track or fails late."""
        with self.changed:
            if self.changed.wait_for(lambda: self.aborted, max(0.0, start_at - time.monotonic())):
                return
        for exe, player in self.players:
            with self.changed:  # abort() sees every player started, or none starts
                if self.aborted:
                    return
                try:
                    self.run = run = PlayerRun([exe, *(a.format(rate=rate) for a in player.stream_args)],
                                               stdin=subprocess.PIPE)
                except OSError as e:
                    self.failures.append(cannot_run(exe, e))
                    continue
            read_all = self._write_all(run)
            returncode = run.wait()
            if returncode == 0 or self.aborted:
                return
            self.failures.append(run.failure(returncode))
            if returncode < 0 or (read_all and not run.failed_at_once(returncode)):
                break  # stopped, or it failed after it had the whole track
        self.failed = True

    def _write_all(self, run: PlayerRun) -> bool:
        """Write every chunk, from the first, to the player's stdin as they come, then close
        it: True if the player took them all, False if it quit before (or playback stopped)."""
        sent = 0
        while True:
            with self.changed:
                while sent == len(self.received) and not (self.ended or self.aborted):
                    self.changed.wait()
                if self.aborted:
                    return False
                if sent == len(self.received):
                    break
                data = self.received[sent]
            try:
                run.proc.stdin.write(data)
                run.proc.stdin.flush()
            except OSError:  # the player quit; its exit status tells why
                close_quietly(run.proc.stdin)
                return False
            sent += 1
        return close_quietly(run.proc.stdin)

    def wait(self, path: Path | str) -> None:
        """After the track completed: let the player finish; PLAYER_FAILED if every one failed."""
        self.end()
        self.thread.join()
        if self.failed:
            raise CliError(PLAYER_FAILED, f"{'; '.join(self.failures)}; the track is {path}")

    def abort(self) -> None:
        """The track failed, or the user pressed Ctrl-C: stop the player."""
        with self.changed:
            self.aborted = True
            self.changed.notify_all()
            if self.run is not None:
                self.run.stop()
        if self.thread is not None:
            self.thread.join(timeout=1.0)
