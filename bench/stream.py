#!/usr/bin/env python3
"""Streamed playback through a warm daemon: when sound could start, and whether any chunk
comes after its play time.

For each case a real lofid (full-size random-weight model, tools/make_full_model.py) runs
with the case's variant and 2 threads; after a warm-up request of the default length (30 s:
a daemon in use has served one; what the pacing learns from it is in
lofid/worker/pacing.py) it generates the case once
with ``stream: true`` and once without (another seed, so no cache hit), and records:
- chunk 0: seconds from the request to the first audio_chunk; ``start_after_sec`` on it;
- first sound: chunk 0 + start_after_sec, when a player that follows the daemon starts;
- forced: what the machine's speed forces, max(chunk 0, whole-track time - duration);
- late chunks: chunks that arrive after their play time (first sound + offset), and the
  worst lateness;
- the streamed and the non-streamed completion times.

  python bench/stream.py [--model /tmp/lofid-full/music_gen] [--cases int8:10 int4:30 int4:120]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "cli")]

from lofictl.client import Client  # noqa: E402


def start_daemon(model: Path, variant: str, tmp: Path, optimized: Path) -> tuple[subprocess.Popen, Path]:
    sock = tmp / "lofid.sock"
    env = {**os.environ, "LOFID_OPTIMIZED_DIR": str(optimized),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "cli")])}
    env.pop("LOFID_ENGINE", None)
    proc = subprocess.Popen([sys.executable, "-m", "lofid", "--socket", str(sock), "--cache-dir", str(tmp / "tracks"),
                             "--state-dir", str(tmp / "state"), "--config", "/dev/null", "--model-dir", str(model),
                             "--variant", variant, "--threads", "2"],
                            env=env, stderr=open(tmp / "lofid.log", "ab"))
    for _ in range(600):
        try:
            with Client(sock, timeout=5) as c:
                c.call("status")
            return proc, sock
        except (OSError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError((tmp / "lofid.log").read_text())


def one_request(sock: Path, duration: float, seed: int, stream: bool) -> dict:
    with Client(sock, timeout=None) as c:
        began = time.monotonic()
        r = c.call("generate", {"prompt": "lofi hip hop, jazzy piano", "duration_sec": duration, "seed": seed,
                                "stream": stream})
        arrivals: list[tuple[float, dict]] = []
        progress: list[float] = []

        def seen(method: str, payload: dict) -> None:
            if method == "audio_chunk":
                arrivals.append((time.monotonic() - began, payload))
            elif method == "generation_progress" and not progress:
                progress.append(time.monotonic() - began)

        c.wait_track(r["track_id"], on_event=seen)
        total = time.monotonic() - began
    out = {"total_sec": round(total, 2)}
    if not stream:
        return out
    first, chunk0 = arrivals[0]
    wait = chunk0["start_after_sec"]
    sound = first + wait
    lateness = [t - (sound + p["offset"] / p["sample_rate"]) for t, p in arrivals]
    out.update(chunks=len(arrivals), progress0_sec=round(progress[0], 3),
               chunk0_sec=round(first, 3), start_after_sec=wait,
               first_sound_sec=round(sound, 3), forced_sec=round(max(first, total - duration), 3),
               late_chunks=sum(1 for x in lateness if x > 0), worst_lateness_sec=round(max(lateness), 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/lofid-full/music_gen"))
    ap.add_argument("--cases", nargs="+", default=["int8:10", "int4:30", "int4:120"])
    ap.add_argument("--optimized", type=Path, default=Path("/tmp/lofid-bench-optimized"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stream.json")
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        variant, seconds = case.split(":")
        duration = float(seconds)
        with tempfile.TemporaryDirectory(prefix="lofid-bench-") as tmp:
            proc, sock = start_daemon(args.model, variant, Path(tmp), args.optimized)
            try:
                one_request(sock, 30, 1, stream=False)   # load, and a request of the default length before
                streamed = one_request(sock, duration, 2, stream=True)
                plain = one_request(sock, duration, 3, stream=False)
            finally:
                with Client(sock, timeout=30) as c:
                    c.call("shutdown")
                proc.wait(60)
            log = (Path(tmp) / "lofid.log").read_text(errors="replace").splitlines()
        predictions = [line.split("stream: ", 1)[1] for line in log if "stream: at chunk 0" in line]
        row = {"variant": variant, "duration_sec": duration, **streamed, "plain_total_sec": plain["total_sec"],
               "prediction": predictions[1] if len(predictions) > 1 else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg(),
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
