#!/usr/bin/env python3
"""Where a decoder step's milliseconds go: onnxruntime profiling of lofid's engine.

    python bench/op_profile.py [--variant int8] [--frames 300] [--model /tmp/lofid-full]

Runs ``frames`` steps with ``enable_profiling`` on the decoder session, groups the
kernel times by op type (per step), and times the numpy work of the loop (guidance,
sampling) separately. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lofid.worker import musicgen as mg  # noqa: E402
from lofid.worker import sessions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("/tmp/lofid-full"))
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--noshare", action="store_true")
    args = ap.parse_args()
    base = sessions.session_options

    def profiled(threads):
        opts = base(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = f"/tmp/lofid-profile-{args.variant}"
        return opts

    sessions.session_options = profiled
    numpy_s = collections.Counter()
    for name in ("guide", "sample"):
        fn = getattr(mg, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                numpy_s[_name] += time.perf_counter() - t
        setattr(mg, name, timed)
    eng = mg.MusicGen.load(args.model / "music_gen", args.variant, threads=args.threads,
                           share_kv=not args.noshare)
    stamps = []
    t0 = time.perf_counter()
    eng.generate_codes("lofi hip hop beat with soft piano", args.frames, 1,
                       progress=lambda d, n: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    steps = len(stamps)
    path = eng.decoder.with_past.end_profiling()
    events = json.loads(Path(path).read_text())
    by_op = collections.Counter()
    runs = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name", "?")] += e["dur"]
        if e.get("cat") == "Session" and e["name"] == "model_run":
            runs += 1
    total_kernel = sum(by_op.values()) / 1e3 / max(runs, 1)
    print(f"{args.variant}{' noshare' if args.noshare else ''}: {steps} steps, "
          f"{wall / steps * 1e3:.1f} ms/step wall, kernels {total_kernel:.1f} ms/step, "
          f"{runs} session runs")
    print("| op type | ms/step | share |\n|---|---|---|")
    for op, us in by_op.most_common(12):
        ms = us / 1e3 / max(runs, 1)
        print(f"| {op} | {ms:.2f} | {ms / total_kernel:.0%} |")
    for name, s in numpy_s.items():
        print(f"| numpy {name} | {s / steps * 1e3:.2f} | (outside the session) |")
    Path(path).unlink()


if __name__ == "__main__":
    main()
