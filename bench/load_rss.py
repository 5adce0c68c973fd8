#!/usr/bin/env python3
"""Worker memory at load and per request: VmHWM / VmRSS of a fresh worker-like process.

    python bench/load_rss.py [--variant int8] [--seconds 10] [--requests 2] [--model /tmp/lofid-full]

Runs three fresh processes one after the other, each ``MusicGen.load`` then ``requests``
requests (codes + EnCodec, as the worker does): ``cold`` with an empty
``LOFID_OPTIMIZED_DIR`` (the first load ever: the decoder rewrite and the cached copies
are made), then ``warm`` twice on that cache (every later load). Prints VmHWM (peak RSS)
and VmRSS after the load and after each request, against the size of the model files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mem() -> dict:
    return {ln.split(":")[0]: int(ln.split()[1]) // 1024
            for ln in Path("/proc/self/status").read_text().splitlines()
            if ln.startswith(("VmRSS:", "VmHWM:"))}


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    from lofid import variants
    from lofid.worker.musicgen import MusicGen

    root = args.model / "music_gen"
    files = sum((root / f).stat().st_size for f in variants.file_roles(args.variant).values())
    eng = MusicGen.load(root, args.variant, threads=2)
    out = {"files_mb": files / 2**20, "load_s": eng.load_time_sec, "after_load": mem(),
           "requests": []}
    for r in range(args.requests):
        t = time.perf_counter()
        codes = eng.generate_codes("lofi hip hop beat with soft piano",
                                   eng.frames_for(args.seconds), 1234 + r)
        gen = mem()
        eng.decode_audio(codes)
        out["requests"].append({"s": time.perf_counter() - t, "after_codes": gen,
                                "after_encodec": mem()})
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/lofid-full"))
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args)
    cache = tempfile.mkdtemp(prefix="lofid-opt-")
    env = {**os.environ, "LOFID_OPTIMIZED_DIR": cache}
    print("| load | load s | VmHWM after load | " + " | ".join(
        f"VmHWM / VmRSS after request {i + 1}" for i in range(args.requests)) +
        " | peak / files |")
    print("|---|---|---|" + "---|" * args.requests + "---|")
    try:
        runs(args, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def runs(args, env: dict) -> None:
    for name in ("cold", "warm", "warm"):
        p = subprocess.run([sys.executable, __file__, "--child", "--variant", args.variant,
                            "--seconds", str(args.seconds), "--requests", str(args.requests),
                            "--model", str(args.model)], env=env, capture_output=True,
                           text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name} failed: {p.stderr[-2000:]}")
            continue
        r = json.loads(line[7:])
        peak = max([r["after_load"]["VmHWM"]] +
                   [q["after_encodec"]["VmHWM"] for q in r["requests"]])
        reqs = " | ".join(f"{q['after_encodec']['VmHWM']} / {q['after_encodec']['VmRSS']}"
                          for q in r["requests"])
        print(f"| {name} | {r['load_s']:.2f} | {r['after_load']['VmHWM']} | {reqs} | "
              f"{peak / r['files_mb']:.2f}x ({r['files_mb']:.0f} MB files) |", flush=True)


if __name__ == "__main__":
    main()
