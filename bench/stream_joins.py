#!/usr/bin/env python3
"""How far span-by-span EnCodec decoding (lofid/worker/spans.py) moves the audio against
one EnCodec run over the whole track, and what it costs, for several span settings.

Full-size EnCodec (tools/make_full_model.py), 2 threads, random codes. For each setting:
the join error in dB below the signal (10 log10 of signal power over error power), the
largest sample error, the EnCodec time of the first span (it delays the first chunk)
and of the whole track.

  python bench/stream_joins.py [--model /tmp/lofid-full/music_gen] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lofid.worker.spans import FADE, FIRST_SPAN, LEFT_CONTEXT, MAX_SPAN, RIGHT_CONTEXT, SpanDecoder, plan_spans

HOP = 640


def session(root: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(root / "small_fp32" / "encodec_decode.onnx"), opts,
                                providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/lofid-full/music_gen"))
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stream_joins.json")
    args = ap.parse_args()
    sess = session(args.model, args.threads)

    def run(codes: np.ndarray) -> np.ndarray:
        (audio,) = sess.run(["audio_values"], {"audio_codes": codes[None, None]})
        return np.clip(audio.astype(np.float32).reshape(-1)[:codes.shape[-1] * HOP], -1, 1)

    frames = round(args.seconds * 50)
    codes = np.random.default_rng(0).integers(0, 2048, (4, frames), dtype=np.int64)
    run(codes[:, :50])  # warm-up
    began = time.perf_counter()
    whole = run(codes)
    whole_sec = time.perf_counter() - began
    power = float((whole ** 2).mean())
    print(f"one run over {args.seconds:g} s: {whole_sec:.2f} s")

    settings = [  # (first, longest, left, right, fade)
        (FIRST_SPAN, MAX_SPAN, LEFT_CONTEXT, RIGHT_CONTEXT, FADE),
        (25, 150, 50, 5, 0), (25, 150, 50, 5, 5), (25, 150, 50, 10, 0), (25, 150, 50, 20, 10),
        (25, 150, 25, 10, 5), (25, 150, 100, 10, 5), (25, 150, 10, 10, 5), (25, 150, 0, 10, 5),
        (25, 300, 50, 10, 5), (50, 150, 50, 10, 5), (25, 150, 50, 50, 50),
    ]
    rows = []
    for first, longest, left, right, fade in settings:
        times: list[float] = []

        def timed(c: np.ndarray, times: list[float] = times) -> np.ndarray:
            t = time.perf_counter()
            out = run(c)
            times.append(time.perf_counter() - t)
            return out

        spans = SpanDecoder(frames, HOP, timed, bounds=plan_spans(frames, first, longest), left=left,
                            right=right, fade=fade)
        audio = spans.finish(codes)
        err = audio - whole
        row = {"first": first, "longest": longest, "left": left, "right": right, "fade": fade,
               "spans": len(times), "db_below_signal": round(10 * np.log10(power / max(float((err ** 2).mean()),
                                                                                         1e-30)), 1),
               "max_abs_error": float(np.abs(err).max()), "first_span_sec": round(times[0], 3),
               "total_sec": round(sum(times), 2)}
        rows.append(row)
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": args.seconds, "threads": args.threads,
                                    "one_run_sec": round(whole_sec, 2), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
