#!/usr/bin/env python3
"""Thread settings A/B for lofid's engine, interleaved in one process (machine noise
hits every setting alike): intra-op threads 1 vs 2, intra-op spinning on vs off.

    python bench/threads.py [--variant int8] [--frames 200] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lofid.worker import musicgen as mg  # noqa: E402
from lofid.worker import sessions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("/tmp/lofid-full"))
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    base = sessions.session_options
    engines = {}
    for threads in (1, 2):
        for spin in ("1", "0"):
            def opts(n, _spin=spin):
                o = base(n)
                o.add_session_config_entry("session.intra_op.allow_spinning", _spin)
                return o
            sessions.session_options = opts
            engines[(threads, spin)] = mg.MusicGen.load(args.model / "music_gen", args.variant,
                                                        threads=threads)
    res = {k: [] for k in engines}
    for _ in range(args.reps):
        for k, eng in engines.items():
            st = []
            eng.generate_codes("lofi", args.frames, 1,
                               progress=lambda d, n, _st=st: _st.append(time.perf_counter()))
            res[k].append(float(np.median(np.diff(st))) * 1e3)
    print("| intra-op threads | spinning | median ms/step per rep |\n|---|---|---|")
    for (threads, spin), v in res.items():
        print(f"| {threads} | {'on' if spin == '1' else 'off'} | "
              f"{' / '.join(f'{x:.1f}' for x in v)} |")


if __name__ == "__main__":
    main()
