#!/usr/bin/env python3
"""How far each variant's next-token distribution is from fp32's, teacher-forced.

Free-running greedy agreement (bench/run.py's quality table) stops meaning much after the
first differing token: from there the variants decode different sequences. Here every
variant is fed fp32's own greedy tokens, step by step, and its guided logits at each step
are compared with fp32's: top-1 agreement and the KL divergence of the softmax
distributions (nats). Same weights, same prompt, one process.

    python bench/closeness.py [--model /tmp/lofid-full] [--frames 500]
    python bench/closeness.py --int4 128:peak 256:peak 128:searched 256:searched

``--int4 BLOCK:SCALES`` compares int4 decoders made with other 4-bit blocks instead of the
variants: ``peak`` scales each block by its largest value, ``searched`` as lofid does
(nbits.CLIPS); each is built once in a temporary cache (~20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lofid.worker.musicgen as mg  # noqa: E402
from lofid import variants  # noqa: E402
from lofid.worker.graphs import nbits  # noqa: E402
from lofid.worker.musicgen import MusicGen  # noqa: E402

PROMPT = "lofi hip hop beat with soft piano"
CLIPS = nbits.CLIPS


def run(engine: MusicGen, frames: int, forced: list[np.ndarray] | None):
    """-> (tokens returned per sampling call, guided logits per call)."""
    tokens, logits = [], []
    real_sample = mg.sample

    def recording(guided, params, rng):
        logits.append(guided.astype(np.float64))
        token = forced[len(tokens)] if forced is not None else real_sample(guided, params, rng)
        tokens.append(token)
        return token

    mg.sample = recording
    try:
        engine.generate_codes(PROMPT, frames, seed=0, top_k=1)
    finally:
        mg.sample = real_sample
    return tokens, logits


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/lofid-full"))
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int4", nargs="+", metavar="BLOCK:SCALES",
                    help="int4 block configurations to compare instead (e.g. 256:searched)")
    args = ap.parse_args()
    root = args.model / "music_gen"
    ref_tokens, ref_logits = run(MusicGen.load(root, "fp32", threads=args.threads), args.frames, None)
    p = softmax(np.stack(ref_logits))
    out = {}
    for variant in args.int4 or ("fp16", "int8", "int4"):
        if args.int4:   # an int4 made another way, in a cache of its own
            block, scales = variant.split(":")
            variants.NBITS_BLOCK = int(block)
            nbits.CLIPS = (1.0,) if scales == "peak" else CLIPS
            os.environ["LOFID_OPTIMIZED_DIR"] = tempfile.mkdtemp(prefix="lofid-closeness-")
        engine = MusicGen.load(root, "int4" if args.int4 else variant, threads=args.threads)
        _, logits = run(engine, args.frames, ref_tokens)
        del engine
        if args.int4:
            shutil.rmtree(os.environ["LOFID_OPTIMIZED_DIR"], ignore_errors=True)
        q = softmax(np.stack(logits))
        kl = (p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum(axis=-1)       # [steps, K]
        top1 = (q.argmax(axis=-1) == p.argmax(axis=-1)).mean(axis=0)
        out[variant] = {"top1_agreement_per_codebook": top1.round(4).tolist(),
                        "top1_agreement": round(float(top1.mean()), 4),
                        "kl_mean_nats": float(kl.mean()), "kl_p95_nats": float(np.percentile(kl, 95))}
        print(variant, json.dumps(out[variant]), flush=True)
    ent = -(p * np.log(p + 1e-30)).sum(axis=-1)
    out["fp32_entropy_mean_nats"] = float(ent.mean())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
