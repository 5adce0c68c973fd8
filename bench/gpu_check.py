"""The engine and the daemon on an NVIDIA GPU, with onnxruntime's CUDA provider.

Not part of CI (CI has no GPU). Run it on a machine with a GPU and ``onnxruntime-gpu``:

    python bench/gpu_check.py [--out DIR]

On the committed tiny model (tests/fixtures/music_gen) it checks, per variant on
``--device cuda``: the provider that really runs, where each node runs (onnxruntime's
profiler: CUDA or CPU fallback), greedy codes against transformers' references and
against the CPU engine, the audio, same seed -> same audio, and ms per decoder step next
to the CPU. Then the daemon end to end: ``lofid --device cuda`` and ``--device auto``
generate through ``lofictl``. The tiny model's step times are launch overhead, not the
real model's speed. Prints one JSON document and writes it to DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "cli")]

from lofid.worker import sessions as engine_sessions  # noqa: E402
from lofid.worker.device import select  # noqa: E402
from lofid.worker.musicgen import MusicGen  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "music_gen"
REF = ROOT / "tests" / "fixtures" / "reference"
CASES = json.loads((REF / "references.json").read_text())["cases"]
DEVICE = "cuda"   # --device cpu tries the script out on a machine without a GPU
PROFILE_DIR = Path(tempfile.mkdtemp(prefix="lofid-gpu-prof-"))


def profiled_options(threads: int):
    opts = _plain_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(PROFILE_DIR / "p")
    return opts


_plain_options = engine_sessions.session_options


def placement(sessions: dict) -> dict:
    """Per session: node count and kernel milliseconds per execution provider."""
    result = {}
    for role, sess in sessions.items():
        path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
        nodes, ms, ops_on_cpu = {}, {}, set()
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            prov = e["args"].get("provider", "?")
            nodes.setdefault(prov, set()).add(e["name"])
            ms[prov] = ms.get(prov, 0.0) + e["dur"] / 1000
            if prov == "CPUExecutionProvider":
                ops_on_cpu.add(e["args"].get("op_name", "?"))
        result[role] = {p: {"nodes": len(n), "ms": round(ms[p], 2)} for p, n in nodes.items()}
        result[role]["ops_on_cpu"] = sorted(ops_on_cpu)
    return result


def first_diff(a: np.ndarray, b: np.ndarray) -> int | None:
    cols = np.nonzero((a != b).any(axis=0))[0]
    return int(cols[0]) if cols.size else None


def ms_per_step(m: MusicGen, frames: int) -> float:
    m.generate_codes("warm lofi piano", 8, seed=1)   # warm-up
    t = time.perf_counter()
    m.generate_codes("warm lofi piano", frames, seed=1)
    return round((time.perf_counter() - t) * 1000 / (frames + m.num_codebooks - 1), 3)


def check_variant(variant: str, cpu: MusicGen) -> dict:
    r: dict = {"variant": variant}
    engine_sessions.session_options = profiled_options
    try:
        m = MusicGen.load(MODEL, variant, device=DEVICE, threads=2)
    finally:
        engine_sessions.session_options = _plain_options
    r["provider"], r["device"], r["load_s"] = m.provider, m.device, round(m.load_time_sec, 3)
    r["session_providers"] = m.decoder.first.get_providers()
    r["cuda_options"] = {k: v for k, v in m.decoder.first.get_provider_options().get(
        "CUDAExecutionProvider", {}).items() if k in ("use_tf32", "cudnn_conv_algo_search")}
    r["encodec_output"] = m.encodec.get_outputs()[0].type
    r["greedy"] = []
    for case in CASES:
        with np.load(REF / case["file"]) as d:
            ref_codes, ref_audio = d["codes"][0], d["audio"].reshape(-1)
        codes = m.generate_codes(case["prompt"], case["frames"], seed=0, top_k=1)
        cpu_codes = cpu.generate_codes(case["prompt"], case["frames"], seed=0, top_k=1)
        audio = m.decode_audio(codes)
        r["greedy"].append({
            "case": case["name"],
            "codes_equal_transformers": bool((codes == ref_codes).all()),
            "agreement_transformers": round(float((codes == ref_codes).mean()), 4),
            "first_diff_transformers": first_diff(codes, ref_codes),
            "codes_equal_cpu": bool((codes == cpu_codes).all()),
            "agreement_cpu": round(float((codes == cpu_codes).mean()), 4),
            "audio_max_abs_diff_vs_transformers": float(np.abs(audio - ref_audio).max()),
            "audio_of_cpu_codes_max_abs_diff": float(np.abs(
                m.decode_audio(cpu_codes) - cpu.decode_audio(cpu_codes)).max()),
        })
    codes = [m.generate_codes("warm lofi piano", 250, seed=5) for _ in range(2)]
    r["same_seed_same_codes"] = bool(np.array_equal(*codes))
    r["same_codes_same_audio"] = bool(np.array_equal(m.decode_audio(codes[0]),
                                                     m.decode_audio(codes[0])))
    a = m.generate("warm lofi piano", 5.0, seed=5)
    b = m.generate("warm lofi piano", 5.0, seed=5)
    c = m.generate("warm lofi piano", 5.0, seed=6)
    r["same_seed_identical"] = bool(np.array_equal(a, b))
    r["other_seed_differs"] = not np.array_equal(a, c)
    r["audio_finite_in_range"] = bool(np.isfinite(a).all() and np.abs(a).max() <= 1.0)
    sessions = {"decoder": m.decoder.first, "encodec": m.encodec}
    if not m.decoder.merged:
        sessions["decoder_with_past"] = m.decoder.with_past
    if m.text_encoder is not None:
        sessions["text_encoder"] = m.text_encoder
    r["placement"] = placement(sessions)
    plain = MusicGen.load(MODEL, variant, device=DEVICE, threads=2)
    r["ms_per_step_device_tiny"] = ms_per_step(plain, 500)
    return r


def check_daemon(device: str, tmp: Path) -> dict:
    """lofid with ``--device`` on the tiny model, one generation through lofictl."""
    sock = tmp / f"{device}.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "cli"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "LOFID_OPTIMIZED_DIR": str(tmp / "optimized")}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "lofid", "--socket", str(sock), "--model-dir", str(MODEL),
         "--device", device, "--cache-dir", str(tmp / f"cache-{device}"),
         "--state-dir", str(tmp / f"state-{device}"), "--log-level", "debug"],
        env=env, stderr=subprocess.PIPE, text=True)
    ctl = [sys.executable, "-m", "lofictl", "--socket", str(sock), "--no-start", "--timeout", "120"]
    r: dict = {"device_flag": device}
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        t = time.perf_counter()
        gen = subprocess.run([*ctl, "--json", "generate", "rainy night jazz", "--duration", "12",
                              "--seed", "3"], env=env, capture_output=True, text=True, timeout=180)
        r["generate_s"] = round(time.perf_counter() - t, 2)
        r["generate_rc"], r["generate_out"] = gen.returncode, (gen.stdout + gen.stderr)[-1500:]
        st = subprocess.run([*ctl, "--json", "status"], env=env, capture_output=True, text=True,
                            timeout=60)
        r["status"] = json.loads(st.stdout) if st.returncode == 0 else st.stderr[-800:]
        subprocess.run([*ctl, "daemon", "--help"], env=env, capture_output=True, timeout=30)
    finally:
        daemon.terminate()
        try:
            _, err = daemon.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            _, err = daemon.communicate()
        r["daemon_rc"] = daemon.returncode
        r["daemon_log_tail"] = err[-2500:]
    return r


PROMPT = "lofi hip hop beat with soft piano"


def timed_run(m: MusicGen, frames: int) -> dict:
    stamps: list[float] = []
    m.generate_codes(PROMPT, 8, seed=1)   # warm-up
    t0 = time.perf_counter()
    codes = m.generate_codes(PROMPT, frames, seed=1234,
                             progress=lambda d, n: stamps.append(time.perf_counter()))
    t1 = time.perf_counter()
    audio = m.decode_audio(codes)
    t2 = time.perf_counter()
    steps = np.diff([t0, *stamps]) * 1000
    curve = [round(float(np.median(steps[i:i + 100])), 2) for i in range(0, len(steps), 100)]
    return {"frames": frames, "wall_s": round(t2 - t0, 3), "decode_s": round(t1 - t0, 3),
            "encodec_s": round(t2 - t1, 3), "ms_per_step_median": round(float(np.median(steps)), 3),
            "step_curve_ms": curve, "samples": int(audio.size),
            "finite": bool(np.isfinite(audio).all())}


def full_size(root: Path) -> list[dict]:
    """The full-size shapes (tools/weightless.py fill): 10 s on the GPU per variant and
    on this machine's CPU (int8, all cores and 2 threads), and 30 s for fp16 on the GPU."""
    rows = []
    for variant, device, threads, seconds in (("fp16", "cuda", None, (10, 30)),
                                              ("fp32", "cuda", None, (10,)),
                                              ("int8", "cpu", None, (10,)),
                                              ("int8", "cpu", 2, (10,))):
        row: dict = {"variant": variant, "device": device}
        try:
            t = time.perf_counter()
            MusicGen.load(root, variant, device=device, threads=threads)   # builds caches
            row["first_load_s"] = round(time.perf_counter() - t, 2)
            m = MusicGen.load(root, variant, device=device, threads=threads)
            row.update(provider=m.provider, threads=m.threads, load_s=round(m.load_time_sec, 2))
            for sec in seconds:
                row[f"{sec}s"] = timed_run(m, sec * 50)
            del m
        except Exception:
            row["error"] = traceback.format_exc()[-1500:]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def transformers_gpu() -> list[dict]:
    """transformers' own generate on the GPU, same shapes (random init), 10 s."""
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from make_full_model import build_model

    rows = []
    for dtype in (torch.float32, torch.float16):
        row: dict = {"dtype": str(dtype)}
        try:
            t = time.perf_counter()
            model = build_model(1234, 3.0).to("cuda", dtype)
            row["build_s"] = round(time.perf_counter() - t, 2)
            ids = torch.tensor([[37, 3, 7, 9, 2, 5, 1]], device="cuda")
            for label in ("warm", "timed"):
                torch.manual_seed(1234)
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.inference_mode():
                    audio = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           do_sample=True, guidance_scale=3.0, top_k=250,
                                           max_new_tokens=503 if label == "timed" else 20)
                torch.cuda.synchronize()
                row[f"{label}_s"] = round(time.perf_counter() - t, 3)
            row["samples"] = int(audio.shape[-1])
            del model
            torch.cuda.empty_cache()
        except Exception:
            row["error"] = traceback.format_exc()[-1500:]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--full", type=Path, help="a full-size model folder: time it instead")
    ap.add_argument("--transformers", action="store_true", help="time transformers instead")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    if args.full:
        os.environ.setdefault("LOFID_OPTIMIZED_DIR", tempfile.mkdtemp(prefix="lofid-opt-"))
        (args.out / "gpu_full.json").write_text(json.dumps(full_size(args.full), indent=1))
        return 0
    if args.transformers:
        (args.out / "gpu_transformers.json").write_text(json.dumps(transformers_gpu(), indent=1))
        return 0
    report: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    try:
        report["gpu"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                                       text=True).stdout.strip()
    except OSError as e:
        report["gpu"] = repr(e)
    report["auto_selects"] = select("auto", ort.get_available_providers()).device
    tmp = Path(tempfile.mkdtemp(prefix="lofid-gpu-"))
    os.environ["LOFID_OPTIMIZED_DIR"] = str(tmp / "optimized")
    report["variants"] = []
    for variant in ("fp32", "fp16", "int8"):
        try:
            cpu = MusicGen.load(MODEL, variant, device="cpu", threads=2)
            row = check_variant(variant, cpu)
            row["ms_per_step_cpu_tiny"] = ms_per_step(cpu, 500)
        except Exception:
            row = {"variant": variant, "error": traceback.format_exc()[-2000:]}
        report["variants"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    # the int4 variant is a CPU format: refused on a GPU, run on the CPU under auto
    from lofid.errors import LofiError
    try:
        MusicGen.load(MODEL, "int4", device=DEVICE)
        report["int4_on_device"] = "loaded"
    except LofiError as e:
        report["int4_on_device"] = f"{e.code}: {e.message}"
    report["int4_auto_device"] = MusicGen.load(MODEL, "int4", device="auto").device
    # past 10 s EnCodec runs in chunks: 25 s of fp16 on the device
    m = MusicGen.load(MODEL, "fp16", device=DEVICE)
    t = time.perf_counter()
    audio = m.generate("rainy night jazz", 25.0, seed=9)
    report["fp16_25s"] = {"samples": int(audio.size), "finite": bool(np.isfinite(audio).all()),
                          "s": round(time.perf_counter() - t, 2),
                          "same_again": bool(np.array_equal(audio, m.generate(
                              "rainy night jazz", 25.0, seed=9)))}
    print(json.dumps({k: report[k] for k in ("int4_on_device", "int4_auto_device", "fp16_25s")}))
    report["daemon"] = []
    for device in (DEVICE, "auto"):
        try:
            report["daemon"].append(check_daemon(device, tmp))
        except Exception:
            report["daemon"].append({"device_flag": device, "error": traceback.format_exc()[-2000:]})
        print(json.dumps(report["daemon"][-1], indent=1), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("onnxruntime", "providers", "gpu", "auto_selects")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
