"""The ONNX MusicGen engine against transformers, on the committed tiny model.

Parity is checked on the codes, token for token, and on the audio within 1e-5: the
audio of a random EnCodec is mostly independent of its codes (REFERENCES.md), so
``test_audio_tolerance_detects_one_changed_code`` proves the audio check still bites.
No torch here: the references were written by tools/make_test_model.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lofid import errors
from lofid.errors import LofiError
from lofid.worker.graphs import cache
from lofid.worker.graphs.kvshare import share_kv_graph
from lofid.worker.musicgen import MusicGen, StepCounter, plan_windows
from lofid.worker.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "music_gen"
REF = ROOT / "tests" / "fixtures" / "reference"
CASES = json.loads((REF / "references.json").read_text())["cases"]
AUDIO_ATOL = 1e-5


@pytest.fixture(scope="module")
def engines() -> dict[str, MusicGen]:
    return {
        "merged": MusicGen.load(MODEL, "fp32", threads=1),
        "split": MusicGen.load(MODEL, "fp32", threads=1, decoder_form="split"),
        "fp16": MusicGen.load(MODEL, "fp16", threads=1),
        "int8": MusicGen.load(MODEL, "int8", threads=1),
    }


def reference(case: dict) -> dict:
    with np.load(REF / case["file"]) as d:
        return {k: d[k] for k in d.files}


def test_loaded_model_reports_what_it_is(engines):
    m = engines["merged"]
    assert (m.sample_rate, m.frame_rate, m.hop_length, m.num_codebooks) == (32000, 50, 640, 4)
    assert m.provider == "CPUExecutionProvider" and m.device == "cpu" and m.threads == 1
    assert 0 < m.load_time_sec < 30
    assert engines["merged"].decoder.merged and not engines["split"].decoder.merged
    assert engines["fp16"].decoder.dtype == np.float16 and not engines["fp16"].decoder.merged
    assert engines["int8"].decoder.merged
    # every variant runs its steps on the rewritten graph (shared KV buffers)
    assert all(e.decoder.shared for e in engines.values())


@pytest.mark.parametrize("variant,form", [("fp32", "merged"), ("fp32", "split"),
                                          ("fp16", None), ("int8", None), ("int8", "split")])
def test_shared_kv_buffers_match_the_exported_graph(variant, form, tmp_path, monkeypatch):
    """The GroupQueryAttention rewrite gives the exported graph's codes, sampled and
    greedy, and its cached form (second load) gives them too."""
    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path))
    plain = MusicGen.load(MODEL, variant, threads=1, decoder_form=form, share_kv=False)
    first = MusicGen.load(MODEL, variant, threads=1, decoder_form=form)
    cached = list(tmp_path.iterdir())
    again = MusicGen.load(MODEL, variant, threads=1, decoder_form=form)
    assert not plain.decoder.shared and first.decoder.shared and again.decoder.shared
    # one cached rewritten graph (and its weights file); the second load only reads them
    assert len([p for p in cached if p.name.endswith(".kvshare.onnx")]) == 1
    assert sorted(tmp_path.iterdir()) == sorted(cached)
    for top_k in (250, 1):
        want = plain.generate_codes("rainy night jazz", 90, 7, top_k=top_k)
        for eng in (first, again):
            np.testing.assert_array_equal(eng.generate_codes("rainy night jazz", 90, 7,
                                                             top_k=top_k), want)


def test_first_load_stages_the_rewrite_on_disk_and_leaves_nothing(tmp_path, monkeypatch):
    """The rewritten decoder reaches onnxruntime as a graph with its weights in a file
    beside it (``cache.stage``; the first load's memory peak). The stage is gone after the
    load, a crashed load's stage is removed by the next one, and where no stage can be
    made the graph goes over in memory: the same codes either way."""
    rel, kind = "small_i8/decoder_model_merged.onnx", cache.rewrite_kind(None, True)
    staged = []
    real = cache.stage

    def spy(model, stage):
        staged.append(real(model, stage))
        return staged[-1]

    monkeypatch.setattr(cache, "stage", spy)
    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path / "disk"))
    _, stem = cache.cache_file(MODEL, rel, kind)
    crashed = tmp_path / "disk" / f"{stem}.1-2.ort0-cpu-r1.{kind}.onnx.stage"
    crashed.mkdir()
    (crashed / "graph.data").write_bytes(b"\0" * 4096)
    on_disk = MusicGen.load(MODEL, "int8", threads=1)
    assert isinstance(staged[-1], str) and staged[-1].endswith("graph.onnx")
    assert not list((tmp_path / "disk").glob("*.stage"))        # neither ours nor the crashed one
    monkeypatch.setattr(cache, "stage", lambda model, stage: spy(model, Path("/proc/no/stage")))
    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path / "memory"))
    in_memory = MusicGen.load(MODEL, "int8", threads=1)
    assert isinstance(staged[-1], bytes)
    assert on_disk.decoder.shared and in_memory.decoder.shared
    np.testing.assert_array_equal(on_disk.generate_codes("rainy night jazz", 60, 5),
                                  in_memory.generate_codes("rainy night jazz", 60, 5))


def test_shared_kv_rewrite_refuses_an_unknown_graph(tmp_path, monkeypatch):
    """A graph the rewrite does not recognise runs as exported instead of failing."""
    import onnx

    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path))
    model = onnx.load(str(MODEL / "small_fp32" / "text_encoder.onnx"))
    with pytest.raises(ValueError):
        share_kv_graph(model, 2, 8)


@pytest.mark.parametrize("form", ["merged", "split"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_greedy_codes_and_audio_match_transformers(engines, form, case):
    m, ref = engines[form], reference(case)
    ids = np.array([m.tokenizer.encode(case["prompt"]).ids])
    np.testing.assert_array_equal(ids, ref["input_ids"])
    codes = m.generate_codes(case["prompt"], case["frames"], seed=0, top_k=1)
    np.testing.assert_array_equal(codes, ref["codes"][0])            # [K, T], every token
    audio = m.decode_audio(codes)
    assert audio.shape == (case["frames"] * m.hop_length,)
    np.testing.assert_allclose(audio, ref["audio"].reshape(-1), rtol=0, atol=AUDIO_ATOL)
    # generate() is the same path end to end
    full = m.generate(case["prompt"], case["frames"] / m.frame_rate, seed=0, top_k=1)
    np.testing.assert_array_equal(full, audio)


def test_audio_tolerance_detects_one_changed_code(engines):
    m, ref = engines["merged"], reference(CASES[1])
    codes = ref["codes"][0].copy()
    codes[2, codes.shape[1] // 2] = (codes[2, codes.shape[1] // 2] + 1) % 2048
    diff = np.abs(m.decode_audio(codes) - ref["audio"].reshape(-1)).max()
    assert diff > 100 * AUDIO_ATOL


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_fp16_and_int8_run_end_to_end(engines, variant):
    m = engines[variant]
    audio = m.generate("warm lofi piano", 1.3, seed=5)
    assert audio.dtype == np.float32 and audio.shape == (65 * 640,)
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0 and audio.std() > 0
    greedy = m.generate_codes(CASES[0]["prompt"], CASES[0]["frames"], seed=0, top_k=1)
    assert greedy.shape == (4, CASES[0]["frames"]) and greedy.max() < 2048


@pytest.mark.parametrize("duration", [0.02, 0.5, 1.01, 2.0])
def test_exact_length(engines, duration):
    m = engines["merged"]
    assert m.generate("x", duration, seed=1).shape == (round(duration * 50) * 640,)


def test_same_seed_same_samples_other_seed_differs(engines):
    m = engines["merged"]
    a = m.generate("rainy jazz", 1.0, seed=42)
    again = MusicGen.load(MODEL, "fp32", threads=1).generate("rainy jazz", 1.0, seed=42)
    assert a.tobytes() == again.tobytes()
    assert a.tobytes() != m.generate("rainy jazz", 1.0, seed=43).tobytes()
    assert not np.array_equal(m.generate_codes("rainy jazz", 50, 42),
                              m.generate_codes("rainy jazz", 50, 43))


def test_same_seed_identical_across_processes(engines):
    script = (
        "import hashlib, sys; from lofid.worker.musicgen import MusicGen; "
        f"m = MusicGen.load({str(MODEL)!r}, 'int8', threads=1); "
        "print(hashlib.sha256(m.generate('vinyl crackle', 0.6, seed=9).tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    here = engines["int8"].generate("vinyl crackle", 0.6, seed=9)
    assert out == hashlib.sha256(here.tobytes()).hexdigest()


def test_sampling_params_change_the_result(engines):
    m = engines["merged"]
    base = m.generate_codes("chill", 30, seed=3)
    assert not np.array_equal(base, m.generate_codes("chill", 30, seed=3, temperature=0.5))
    assert not np.array_equal(base, m.generate_codes("chill", 30, seed=3, top_k=5))
    assert not np.array_equal(m.generate_codes("chill", 30, 0, top_k=1),
                              m.generate_codes("chill", 30, 0, top_k=1, guidance_scale=1.0))


def test_progress_counts_every_step(engines):
    seen = []
    engines["merged"].generate("x", 0.4, seed=0, progress=lambda d, e: seen.append((d, e)))
    assert seen == [(i, 23) for i in range(1, 24)]      # 20 frames = 20 + 3 steps


# ------------------------------------------------------------------ long form
def test_plan_windows_follows_audiocraft():
    assert plan_windows(1500, 1500, 900) == [(0, 0, 1500)]
    assert plan_windows(6000, 1500, 900) == [(0, 0, 1500)] + [
        (900 * i, 600, 1500) for i in range(1, 6)]
    assert plan_windows(2000, 1500, 900) == [(0, 0, 1500), (900, 600, 1100)]
    for total in range(1, 400, 7):
        plan = plan_windows(total, 60, 36)
        covered = [f for off, p, n in plan for f in range(off + p, off + n)]
        assert covered == list(range(total))             # no gap, no repeat
        assert all(p == 0 or p == 24 for _, p, _ in plan)


def test_120_seconds_exact_length_and_progress(engines):
    m, seen = engines["merged"], []
    audio = m.generate("long lofi", 120, seed=11, progress=lambda d, e: seen.append((d, e)))
    assert (m.window_frames, m.stride_frames) == (1500, 900)
    assert audio.shape == (120 * 32000,) and np.isfinite(audio).all()
    estimated = 1503 + 5 * (1500 + 3 - 600)
    assert seen[-1] == (estimated, estimated) and len(seen) == estimated


def test_long_form_first_window_is_a_plain_generation(engines):
    m = engines["merged"]
    long = m.generate_codes("long lofi", 2000, seed=0, top_k=1)       # 40 s: two windows
    np.testing.assert_array_equal(long[:, :1500], m.generate_codes("long lofi", 1500, 0, top_k=1))


@pytest.fixture
def short_windows(engines):
    m = engines["merged"]
    saved = m.window_frames, m.stride_frames
    m.window_frames, m.stride_frames = 60, 36
    yield m
    m.window_frames, m.stride_frames = saved


def test_windows_join_where_they_should(short_windows, monkeypatch):
    m, calls = short_windows, []
    real = m.generate_window

    def spy(hidden, mask, prime, frames, params, rng, counter):
        out = real(hidden, mask, prime, frames, params, rng, counter)
        calls.append((prime.copy(), out))
        return out

    monkeypatch.setattr(m, "generate_window", spy)
    codes = m.generate_codes("join test", 200, seed=8)
    plan = plan_windows(200, 60, 36)
    assert len(calls) == len(plan) == 5
    for (offset, primed, length), (prime, out) in zip(plan, calls, strict=True):
        assert out.shape == (4, length) and prime.shape == (4, primed)
        np.testing.assert_array_equal(out[:, :primed], prime)          # primed = kept
        np.testing.assert_array_equal(codes[:, offset : offset + length], out)
        if offset:                                                    # = previous tail
            np.testing.assert_array_equal(prime, codes[:, offset : offset + 24])


def test_priming_reproduces_step_by_step_decoding(short_windows):
    """Teacher-forcing a greedy run's own first frames (one prefill call) must continue
    exactly as the step-by-step run did: the prime is seen as the decoder saw it."""
    m = short_windows
    full = m.generate_codes("prime test", 60, seed=0, top_k=1)
    hidden, mask = m.encode_text("prime test")
    for primed in (1, 24, 59):
        out = m.generate_window(hidden, mask, full[:, :primed], 60, SamplingParams(1),
                                np.random.default_rng(0), StepCounter(0, None))
        np.testing.assert_array_equal(out, full)


# --------------------------------------------------------------------- errors
def copy_model(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(MODEL, dst)
    return dst


def test_missing_files_model_not_found(tmp_path):
    root = copy_model(tmp_path)
    (root / "small_fp16" / "decoder_with_past_model.onnx").unlink()
    (root / "small" / "tokenizer.json").unlink()
    with pytest.raises(LofiError) as err:
        MusicGen.load(root, "fp16")
    assert err.value.code == errors.MODEL_NOT_FOUND
    assert err.value.data["missing"] == ["small/tokenizer.json",
                                         "small_fp16/decoder_with_past_model.onnx"]
    assert "small_fp16/decoder_with_past_model.onnx" in err.value.message
    with pytest.raises(LofiError) as err:        # int8 needs no fp16 file, only the rest
        MusicGen.load(root, "int8")
    assert err.value.data["missing"] == ["small/tokenizer.json"]

def test_truncated_file_model_load_failed(tmp_path):
    root = copy_model(tmp_path)
    path = root / "small_i8" / "decoder_model_merged.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LofiError) as err:
        MusicGen.load(root, "int8")
    assert err.value.code == errors.MODEL_LOAD_FAILED
    assert "small_i8/decoder_model_merged.onnx" in err.value.message
    assert "lofictl models download --force" in err.value.message


@pytest.mark.parametrize("rel, content", [
    ("small/config.json", b"{not json"),
    ("small/tokenizer.json", b"{}"),
    ("small_fp32/encodec_decode.onnx", b"\x00" * 100),
])
def test_corrupt_files_model_load_failed(tmp_path, rel, content):
    root = copy_model(tmp_path)
    (root / rel).write_bytes(content)
    with pytest.raises(LofiError) as err:
        MusicGen.load(root, "fp32")
    assert err.value.code == errors.MODEL_LOAD_FAILED
    assert "lofictl models download --force" in err.value.message


def test_wrong_graph_model_load_failed(tmp_path):
    root = copy_model(tmp_path)
    shutil.copyfile(root / "small_fp32" / "text_encoder.onnx",
                    root / "small_fp32" / "decoder_model_merged.onnx")
    with pytest.raises(LofiError) as err:
        MusicGen.load(root, "fp32")
    assert err.value.code == errors.MODEL_LOAD_FAILED


def test_nan_logits_model_inference_failed(engines, monkeypatch):
    m = engines["merged"]
    real = m.decoder.step
    monkeypatch.setattr(m.decoder, "step", lambda ids: real(ids) * np.float32("nan"))
    with pytest.raises(LofiError) as err:
        m.generate("x", 0.2, seed=0)
    assert err.value.code == errors.MODEL_INFERENCE_FAILED
    assert "NaN" in err.value.message


def test_explicit_cuda_unavailable_model_load_failed():
    with pytest.raises(LofiError) as err:
        MusicGen.load(MODEL, "fp32", device="cuda")
    assert err.value.code == errors.MODEL_LOAD_FAILED
    assert "onnxruntime-gpu" in err.value.message


@pytest.mark.parametrize("kwargs, code", [
    ({"top_k": 0}, errors.INVALID_PARAMS),
    ({"temperature": -1.0}, errors.INVALID_PARAMS),
    ({"prompt": "  "}, errors.INVALID_PARAMS),
    ({"duration_sec": 0.001}, errors.INVALID_DURATION),
])
def test_bad_requests(engines, kwargs, code):
    args = {"prompt": "x", "duration_sec": 0.2, "seed": 0, **kwargs}
    with pytest.raises(LofiError) as err:
        engines["merged"].generate(**args)
    assert err.value.code == code


def test_unknown_variant():
    with pytest.raises(LofiError) as err:
        MusicGen.load(MODEL, "fp8")
    assert err.value.code == errors.INVALID_PARAMS


def test_text_encoder_and_encodec_mapped_per_request_and_kv_buffers_freed(tmp_path,
                                                                          monkeypatch):
    """On the CPU the text encoder and EnCodec are opened from their cached mapped copies
    for each request (no resident sessions), and a generation leaves no KV buffers
    behind; codes and audio are those of resident sessions. A copy removed after the
    load costs its request a whole load of the file, not the request."""
    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path))
    mapped = MusicGen.load(MODEL, "fp32", threads=1)
    assert mapped.text_encoder is None and mapped.encodec is None
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".mapped.onnx")]) == 2
    with monkeypatch.context() as m:
        m.setattr(cache, "mapped_session", lambda *a: None)
        resident = MusicGen.load(MODEL, "fp32", threads=1)
    assert resident.text_encoder is not None and resident.encodec is not None
    want = resident.generate_codes("rainy night jazz", 40, 3)
    np.testing.assert_array_equal(mapped.generate_codes("rainy night jazz", 40, 3), want)
    assert mapped.decoder.cache == {} and mapped.decoder.length == 0
    np.testing.assert_array_equal(mapped.decode_audio(want), resident.decode_audio(want))
    for p in tmp_path.iterdir():
        if ".mapped.onnx" in p.name:
            p.unlink()
    np.testing.assert_array_equal(mapped.generate("rainy night jazz", 0.8, 3),
                                  resident.generate("rainy night jazz", 0.8, 3))


def _length_arithmetic_graph():
    """EnCodec's padding arithmetic as the fp16 export has it: an int64 length cast to
    float16, divided, rounded up, cast back."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["length"], ["f"], to=TensorProto.FLOAT16),
             helper.make_node("Constant", [], ["two"], value=onnx.numpy_helper.from_array(
                 np.array(2.0, np.float16), "two")),
             helper.make_node("Div", ["f", "two"], ["half"]),
             helper.make_node("Ceil", ["half"], ["up"]),
             helper.make_node("Cast", ["up"], ["frames"], to=TensorProto.INT64)]
    graph = helper.make_graph(
        nodes, "length", [helper.make_tensor_value_info("length", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("frames", TensorProto.INT64, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_upcast_fixes_fp16_length_arithmetic():
    """float16 ends at 65504: 5 s of 32 kHz audio (160 000 samples) overflows it, which
    broke the fp16 EnCodec on CUDA. The upcast graph computes the length exactly."""
    from onnx.reference import ReferenceEvaluator

    from lofid.worker.graphs.upcast import upcast_fp16

    model = _length_arithmetic_graph()
    length = np.array(160_001, np.int64)
    with np.errstate(all="ignore"):
        (wrong,) = ReferenceEvaluator(model).run(None, {"length": length})
    assert wrong != 80_001                                   # fp16: inf, cast to garbage
    assert upcast_fp16(model) == 2                           # the Cast and the constant
    (right,) = ReferenceEvaluator(model).run(None, {"length": length})
    assert right == 80_001
    sess = __import__("onnxruntime").InferenceSession(model.SerializeToString(),
                                                      providers=["CPUExecutionProvider"])
    assert sess.run(None, {"length": length})[0] == 80_001


def test_fp16_variant_runs_encodec_upcast_to_fp32(engines):
    import onnx

    m = engines["fp16"]
    assert m.encodec.get_outputs()[0].type == "tensor(float)"
    from lofid.worker.graphs.upcast import upcast_fp16

    model = onnx.load(str(MODEL / "small_fp16" / "encodec_decode.onnx"))
    assert upcast_fp16(model) > 0 and upcast_fp16(model) == 0   # nothing left to upcast
    g = model.graph
    assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in g.initializer)
    assert all(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16
               for v in (*g.input, *g.output, *g.value_info))
    codes = np.random.default_rng(0).integers(0, 2048, (4, 250))
    fp32 = MusicGen.load(MODEL, "fp32", threads=1)
    np.testing.assert_allclose(m.decode_audio(codes), fp32.decode_audio(codes), rtol=0, atol=1e-3)
    audio = m.generate("warm lofi piano", 5.0, seed=5)
    assert audio.shape == (250 * 640,) and np.isfinite(audio).all()


def test_int4_variant_is_the_int8_files_on_4bit_blocks(tmp_path, monkeypatch):
    """int4 loads the int8 files, rewrites their MatMuls onto MatMulNBits (nbits.py) and
    its attention onto shared int8 KV buffers, calibrated on its first load
    (kvquant.py), caches that once, and runs on the CPU only."""
    import onnx

    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path))
    m = MusicGen.load(MODEL, "int4", threads=1)
    assert (m.variant, m.device) == ("int4", "cpu") and m.decoder.shared
    assert {m.decoder.past_dtype[n] for n in m.decoder.dec_names} == {np.int8}
    graphs = [p for p in tmp_path.iterdir() if p.name.endswith(".int4b256-kvshare-kv8.onnx")]
    assert len(graphs) == 1
    # the float-cache rewrite used for the calibration is gone from the cache
    assert not [p for p in tmp_path.iterdir() if ".int4b256-kvshare.onnx" in p.name]
    ops = {n.op_type for g in (onnx.load(str(graphs[0]), load_external_data=False).graph,)
           for n in g.node}
    ops |= {x.op_type for n in onnx.load(str(graphs[0]), load_external_data=False).graph.node
            for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for x in a.g.node}
    assert "MatMulNBits" in ops and "DynamicQuantizeMatMul" not in ops
    before = sorted(tmp_path.iterdir())
    again = MusicGen.load(MODEL, "int4", threads=1)
    assert sorted(tmp_path.iterdir()) == before                     # read from the cache
    a = m.generate("warm lofi piano", 2.0, seed=5)
    assert np.array_equal(a, again.generate("warm lofi piano", 2.0, seed=5))
    assert a.shape == (100 * 640,) and np.isfinite(a).all() and a.std() > 0
    with pytest.raises(LofiError) as err:
        MusicGen.load(MODEL, "int4", device="cuda")
    assert err.value.code == errors.MODEL_LOAD_FAILED and "CPU only" in err.value.message


def test_cached_graphs_of_a_removed_model_are_pruned(tmp_path, monkeypatch):
    """A model folder that is gone (a deleted --model-dir, an old hub revision) leaves no
    cached graphs behind: the next load removes them, and only them."""
    opt = tmp_path / "optimized"
    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(opt))
    copy = tmp_path / "copy"
    shutil.copytree(MODEL, copy)
    MusicGen.load(copy, "int8", threads=1)
    theirs = set(opt.iterdir())
    MusicGen.load(MODEL, "int8", threads=1)
    ours = set(opt.iterdir()) - theirs
    assert len(theirs) >= 3 and len(ours) >= 3          # graphs, weights, a .source each
    assert {p.read_text() for p in theirs if p.suffix == ".source"} == {
        str((copy / "small_i8" / "decoder_model_merged.onnx").resolve()),
        str((copy / "small_fp32" / "text_encoder.onnx").resolve()),
        str((copy / "small_fp32" / "encodec_decode.onnx").resolve())}
    MusicGen.load(MODEL, "int8", threads=1)
    assert set(opt.iterdir()) == theirs | ours           # nothing removed while it exists
    graph = next(p for p in theirs if p.name.endswith(".kvshare.onnx"))
    stage = graph.with_name(graph.name + ".stage")       # as a crashed first load leaves it
    stage.mkdir()
    (stage / "graph.data").write_bytes(b"\0" * 4096)
    theirs.add(stage)
    shutil.rmtree(copy)
    MusicGen.load(MODEL, "int8", threads=1)              # prunes as it loads
    assert set(opt.iterdir()) == ours
    assert cache.prune_optimized() == 0


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_needs_preparing_until_the_first_load_has_cached_the_rewrite(tmp_path, monkeypatch, variant):
    """The worker says "preparing" (not "loading") for a load that makes the rewrite."""
    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path))
    assert MusicGen.needs_preparing(MODEL, variant, device="cpu")
    MusicGen.load(MODEL, variant, threads=1)
    assert not MusicGen.needs_preparing(MODEL, variant, device="cpu")
