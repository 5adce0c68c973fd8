#!/usr/bin/env python3
"""lofid's benchmark (issue 9): one command, every contender in its own process.

    python bench/run.py [--model /tmp/lofid-full] [--seconds 10] [--threads 2]

Needs the full-size model from tools/make_full_model.py and, for the transformers
contender, the tools venv (/tmp/toolsvenv, see tools/README.md). Writes
bench/results/latest.json and bench/results/latest.md (its tables); bench/README.md says
how a run is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WITH_PAST = {"fp32": "small_fp32/decoder_with_past_model.onnx",
             "fp16": "small_fp16/decoder_with_past_model.onnx",
             "int8": "small_i8/decoder_with_past_model.onnx"}


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                  if ln.startswith("Model name")), platform.processor())
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    import onnxruntime

    return {"cpu": model, "cores": os.cpu_count(), "mem_gib": int(mem) / 2**20,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def contender(kind: str, args, frames: int, python: str = sys.executable,
              env: dict | None = None) -> dict:
    cmd = [python, str(HERE / "contender.py"), kind, str(args.model), str(frames),
           str(args.threads), str(args.seed)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"{kind} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
        return {"kind": kind, "error": p.stderr[-500:]}
    res = json.loads(line[7:])
    res["process_s"], res["loadavg_before"] = time.perf_counter() - t0, load
    ends = np.array(res.get("step_ends", []))
    if ends.size > 2:
        d = np.diff(ends) * 1e3
        res["steps"] = int(ends.size)
        res["ms_step_mean"] = float(d.mean())
        res["ms_step_median"] = float(np.median(d))
        res["buckets_ms"] = [float(np.median(d[i:i + 100])) for i in range(0, d.size, 100)]
        res.pop("step_ends")
    print(f"  {kind}: {json.dumps({k: v for k, v in res.items() if k != 'buckets_ms'})[:300]}",
          flush=True)
    return res


def daemon_run(args, variant: str, seconds: float) -> dict:
    """A real lofid on the full model: time to track_id / first progress, accuracy, RSS."""
    sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "cli")]
    from lofictl.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="lofid-bench-", dir="/tmp"))
    sock = tmp / "s.sock"
    (tmp / "config.toml").write_text("")
    env = {**os.environ, "HF_HOME": str(tmp / "hf"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "cli")])}
    env.pop("LOFID_ENGINE", None)
    argv = [sys.executable, "-m", "lofid", "--socket", str(sock), "--cache-dir",
            str(tmp / "tracks"), "--state-dir", str(tmp / "state"), "--config",
            str(tmp / "config.toml"), "--model-dir", str(args.model / "music_gen"),
            "--variant", variant, "--threads", str(args.threads), "--device", "cpu"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "lofid.log", "wb"), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(sock, timeout=5) as c:
                    c.call("status")
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((tmp / "lofid.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        out = {"variant": variant}
        with Client(sock, timeout=600) as c:
            t0 = time.perf_counter()
            r = c.call("generate", {"prompt": "lofi hip hop beat with soft piano",
                                    "duration_sec": seconds, "seed": args.seed})
            out["track_id_s"] = time.perf_counter() - t0
            events = []
            c.wait_track(r["track_id"], on_event=lambda m, p: events.append(
                (time.perf_counter() - t0, m, p)))
            out["complete_s"] = events[-1][0]
            status = c.call("status")
        prog = [(t, p["percent"]) for t, m, p in events if m == "generation_progress"]
        out["first_progress_s"] = prog[0][0] if prog else None
        out["progress_events"] = len(prog)
        # the worker's real generation time: from the 0% event (sent when generation
        # starts) to completion; accuracy = reported percent vs elapsed share
        start, end = prog[0][0], out["complete_s"]
        errs = [abs(pc / 100 - (t - start) / (end - start)) * 100 for t, pc in prog]
        out["progress_max_err_pct"] = max(errs) if errs else None
        # the same against the whole request (track_id -> complete)
        errs = [abs(pc / 100 - t / end) * 100 for t, pc in prog]
        out["progress_max_err_vs_request_pct"] = max(errs) if errs else None
        out["progress"] = [(round(t, 2), pc) for t, pc in prog]
        out["model_load_s"] = status.get("model", {}).get("load_time_sec")
        out["broker_rss_mb"] = _rss(proc.pid)
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
        out["worker_rss_mb"] = {k: _rss(int(k)) for k in kids}
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _rss(pid: int) -> dict:
    d = {}
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith(("VmRSS:", "VmHWM:")):
            d[ln.split(":")[0]] = int(ln.split()[1]) / 1024
    return d


def quality(args, frames: int) -> dict:
    """Greedy codes of fp16, int8 and int4 vs fp32 on the full model: token agreement, and a
    log-spectral distance of the audio after removing the code-independent part."""
    out_dir = Path(tempfile.mkdtemp(prefix="lofid-q-"))
    res = {}
    for v in ("fp32", "fp16", "int8", "int4"):
        contender(f"codes:{v}", args, frames, env={"BENCH_OUT": str(out_dir)})
    ref = np.load(out_dir / "codes_fp32.npz")
    # the part of a random EnCodec's output that does not depend on the codes:
    # estimated as the mean audio over the three variants is not code-free, so use
    # spectra of the difference to fp32 relative to fp32's own spectrum instead
    for v in ("fp16", "int8", "int4"):
        other = np.load(out_dir / f"codes_{v}.npz")
        agree = (other["codes"] == ref["codes"]).mean(axis=1)
        first_diff = np.flatnonzero((other["codes"] != ref["codes"]).any(axis=0))
        a, b = ref["audio"], other["audio"]
        def spec(x):
            n = 2048
            frames_ = np.lib.stride_tricks.sliding_window_view(x, n)[::512] * np.hanning(n)
            return np.abs(np.fft.rfft(frames_, axis=-1))
        sa, sd = spec(a), spec(b - a)
        res[v] = {"code_agreement_per_codebook": agree.round(4).tolist(),
                  "code_agreement": float(agree.mean()),
                  "first_differing_frame": int(first_diff[0]) if first_diff.size else None,
                  "diff_to_signal_db": float(10 * np.log10((sd**2).sum() / (sa**2).sum()))}
    return res


def table(results: list[dict], bw: float, tf_wall: float | None) -> str:
    rows = ["| contender | wall s | ratio vs transformers | load s | ms/step mean | "
            "ms/step median | step curve (median ms per 100-step bucket) | peak RSS MB | "
            "share of BW floor |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['kind']} | failed | | | | | | | |")
            continue
        var = next((v for v in WITH_PAST if v in r["kind"]), None)
        share = ""
        if var and r["kind"] != "transformers":
            floor = r.get("with_past_mb", 0) / 1e3 / bw * 1e3
            share = f"{floor / r['ms_step_median']:.0%} (floor {floor:.1f} ms)"
        ratio = f"{tf_wall / r['wall_s']:.1f}x" if tf_wall else ""
        curve = " / ".join(f"{x:.0f}" for x in r.get("buckets_ms", []))
        wall = f"{r['wall_s']:.1f}"
        if len(r.get("wall_rounds", [])) > 1:
            wall += " (" + " / ".join(f"{x:.1f}" for x in r["wall_rounds"]) + ")"
        rows.append(f"| {r['kind']} | {wall} | {ratio} | {r['load_s']:.2f} | "
                    f"{r['ms_step_mean']:.1f} | {r['ms_step_median']:.1f} | {curve} | "
                    f"{r['peak_rss_mb']:.0f} | {share} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/lofid-full"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tools-python", default="/tmp/toolsvenv/bin/python")
    ap.add_argument("--only", default="", help="comma list of contenders to run")
    ap.add_argument("--no-long", action="store_true", help="skip the 30 s step curves")
    ap.add_argument("--no-daemon", action="store_true")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the contenders this many times, interleaved; report the median")
    args = ap.parse_args()
    frames = round(args.seconds * 50)
    info = machine()
    print(json.dumps(info), flush=True)
    bw = contender("bandwidth", args, 0)["read_gbps"]
    kinds = ["transformers", "plain:fp32", "plain:int8", "lofid:fp32", "lofid:fp16",
             "lofid:int8", "lofid:int4", "lofid:int8:noshare", "lofid:fp32:noshare"]
    if args.only:
        kinds = args.only.split(",")
    for kind in kinds:
        if kind.startswith("lofid:"):
            contender(kind, args, 1)   # warm-up: builds the cached graph, warms the disk
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):   # interleaved, so a busy minute hits every contender
        for kind in kinds:
            py = args.tools_python if kind == "transformers" else sys.executable
            runs[kind].append(contender(kind, args, frames, python=py))
    results = []
    for kind in kinds:
        ok = sorted((r for r in runs[kind] if "wall_s" in r), key=lambda r: r["wall_s"])
        r = ok[len(ok) // 2] if ok else runs[kind][0]
        r["wall_rounds"] = [round(x["wall_s"], 2) for x in ok]
        var = next((v for v in WITH_PAST if v in kind), None)
        if var:
            r["with_past_mb"] = (args.model / "music_gen" / WITH_PAST[var]).stat().st_size / 1e6
        results.append(r)
    tf = next((r["wall_s"] for r in results if r["kind"] == "transformers" and "wall_s" in r),
              None)
    long = []
    if not args.no_long:
        for kind in ("lofid:int8", "lofid:int4", "lofid:int8:noshare"):
            r = contender(kind, args, 1500)
            r["with_past_mb"] = (args.model / "music_gen" / WITH_PAST["int8"]).stat().st_size / 1e6
            long.append(r)
    daemon = None if args.no_daemon else daemon_run(args, "int8", args.seconds)
    print(f"  daemon: {daemon}", flush=True)
    qual = None if args.no_quality else quality(args, frames)
    print(f"  quality: {qual}", flush=True)
    info["loadavg_end"] = os.getloadavg()
    out = {"machine": info, "read_gbps": bw, "frames": frames, "threads": args.threads,
           "results": results, "long": long, "daemon": daemon, "quality": qual}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=1))
    md = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']:.0f} GiB, "
          f"onnxruntime {info['onnxruntime']}; load average at start "
          f"{info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}; read "
          f"bandwidth {bw:.1f} GB/s (numpy sum over 1 GiB, best of 1 and "
          f"{args.threads} threads).", "",
          f"{args.seconds:g} s of audio ({frames} frames, {frames + 3} decoder steps), "
          f"{args.threads} threads, top_k 250, guidance 3, seed {args.seed}:", "",
          table(results, bw, tf), ""]
    if long:
        md += ["30 s (1503 steps):", "", table(long, bw, None), ""]
    if daemon:
        md += ["Through the daemon: " + json.dumps(daemon), ""]
    if qual:
        md += ["Greedy vs fp32: " + json.dumps(qual), ""]
    (RESULTS / "latest.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
