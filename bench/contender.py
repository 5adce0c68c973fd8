#!/usr/bin/env python3
"""One benchmark contender in its own process; prints one JSON line (``RESULT {...}``).

Contenders (all: CFG batch 2, guidance 3, top_k 250, the same seed, ``frames + 3``
decoder positions for ``frames`` frames of audio, EnCodec decode included in the wall):

  transformers          MusicgenForConditionalGeneration.generate, PyTorch fp32
                        (needs the tools venv: torch + transformers)
  plain:<fp32|int8>     the straightforward numpy + onnxruntime loop (bench/plain_loop.py)
  lofid:<variant>[:noshare]  lofid's engine (MusicGen.load + generate); ``noshare`` runs
                        the decoder as exported (the engine before the KV rewrite)
  bandwidth             read bandwidth: numpy sum over a 1 GiB float32 array

Peak RSS is the process's VmHWM at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
PROMPT = "lofi hip hop beat with soft piano"
GUIDANCE, TOP_K = 3.0, 250


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bandwidth(threads: int) -> dict:
    """Best of 7: ``threads`` threads each summing its share of a 1 GiB float32 array
    (numpy releases the GIL in the reduction)."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(1 << 28, dtype=np.float32)
    parts = np.array_split(a, threads)
    out = {}
    with ThreadPoolExecutor(threads) as pool:
        for n, chunks in ((1, [a]), (threads, parts)):
            best = 0.0
            for _ in range(7):
                t = time.perf_counter()
                list(pool.map(np.sum, chunks))
                best = max(best, a.nbytes / (time.perf_counter() - t))
            out[f"read_gbps_{n}t"] = best / 1e9
    out["read_gbps"] = max(out.values())
    return out


def run_transformers(model_dir: Path, frames: int, threads: int, seed: int) -> dict:
    import torch
    from tokenizers import Tokenizer
    from transformers import LogitsProcessor, LogitsProcessorList, MusicgenForConditionalGeneration

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = MusicgenForConditionalGeneration.from_pretrained(model_dir / "hf").eval()
    load = time.perf_counter() - t0
    tok = Tokenizer.from_file(str(model_dir / "hf" / "tokenizer.json"))
    ids = torch.tensor([tok.encode(PROMPT).ids])
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        audio = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               do_sample=True, guidance_scale=GUIDANCE, top_k=TOP_K,
                               max_new_tokens=frames + 3,
                               logits_processor=LogitsProcessorList([Stamp()]))
    wall = time.perf_counter() - t0
    return {"load_s": load, "wall_s": wall, "step_ends": [s - t0 for s in stamps],
            "samples": int(audio.shape[-1])}


def run_plain(model_dir: Path, variant: str, frames: int, threads: int, seed: int) -> dict:
    from plain_loop import PlainLoop

    t0 = time.perf_counter()
    loop = PlainLoop(model_dir / "music_gen", variant, threads)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    audio, stamps = loop.generate(PROMPT, frames, seed, top_k=TOP_K, guidance=GUIDANCE)
    wall = time.perf_counter() - t0
    return {"load_s": load, "wall_s": wall, "step_ends": [s - t0 for s in stamps],
            "samples": int(audio.size)}


def run_lofid(model_dir: Path, spec: str, frames: int, threads: int, seed: int,
              profile: str | None = None) -> dict:
    from lofid.worker.musicgen import MusicGen

    parts = spec.split(":")
    variant, share = parts[0], "noshare" not in parts
    form = "split" if "split" in parts else None
    t0 = time.perf_counter()
    eng = MusicGen.load(model_dir / "music_gen", variant, threads=threads, share_kv=share,
                        decoder_form=form)
    load = time.perf_counter() - t0
    stamps: list[float] = []
    t0 = time.perf_counter()
    codes = eng.generate_codes(PROMPT, frames, seed, top_k=TOP_K, guidance_scale=GUIDANCE,
                               progress=lambda d, n: stamps.append(time.perf_counter()))
    t1 = time.perf_counter()
    audio = eng.decode_audio(codes)
    wall = time.perf_counter() - t0
    out = {"load_s": load, "wall_s": wall, "step_ends": [s - t0 for s in stamps],
           "encodec_s": time.perf_counter() - t1, "samples": int(audio.size),
           "shared_kv": eng.decoder.shared}
    if os.environ.get("BENCH_SAVE_CODES"):
        np.save(os.environ["BENCH_SAVE_CODES"], codes)
    return out


def run_codes(model_dir: Path, variant: str, frames: int, threads: int, seed: int) -> dict:
    """Greedy codes and audio of ``variant`` (for the closeness-to-fp32 comparison)."""
    from lofid.worker.musicgen import MusicGen

    eng = MusicGen.load(model_dir / "music_gen", variant, threads=threads)
    codes = eng.generate_codes(PROMPT, frames, seed, top_k=1, guidance_scale=GUIDANCE)
    audio = eng.decode_audio(codes)
    out = Path(os.environ.get("BENCH_OUT", "/tmp")) / f"codes_{variant}.npz"
    np.savez(out, codes=codes, audio=audio)
    return {"file": str(out)}


def main() -> None:
    kind, model_dir = sys.argv[1], Path(sys.argv[2])
    frames, threads, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if kind == "bandwidth":
        res = bandwidth(threads)
    elif kind == "transformers":
        res = run_transformers(model_dir, frames, threads, seed)
    elif kind.startswith("plain:"):
        res = run_plain(model_dir, kind.split(":", 1)[1], frames, threads, seed)
    elif kind.startswith("codes:"):
        res = run_codes(model_dir, kind.split(":", 1)[1], frames, threads, seed)
    elif kind.startswith("lofid:"):
        res = run_lofid(model_dir, kind.split(":", 1)[1], frames, threads, seed)
    else:
        raise SystemExit(f"unknown contender {kind}")
    res.update(kind=kind, peak_rss_mb=peak_rss_mb())
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
