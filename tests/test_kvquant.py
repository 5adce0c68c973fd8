"""The int8 self-attention cache (kvquant.py), on the committed tiny model.

The int8 and float caches run the same decoder file (the int8 variant's merged graph),
rewritten twice by ``share_kv_graph``: once as it always is, once with scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lofid.worker import delay, sessions
from lofid.worker.decoder import Decoder, present_name
from lofid.worker.graphs import kvquant
from lofid.worker.graphs.kvshare import share_kv_graph
from lofid.worker.musicgen import MusicGen
from lofid.worker.sampling import guide

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "music_gen"
HEADS, HEAD_DIM = 2, 8
PROMPT = "late night lofi with vinyl crackle"


def decoder(config, kv_scales=None) -> Decoder:
    import onnx

    model = onnx.load(str(MODEL / "small_i8" / "decoder_model_merged.onnx"))
    share_kv_graph(model, HEADS, HEAD_DIM, kv_scales)
    sess = ort.InferenceSession(model.SerializeToString(), sessions.options("decoder", 1),
                                providers=["CPUExecutionProvider"])
    return Decoder(sess, sess, config)


@pytest.fixture(scope="module")
def float_engine() -> MusicGen:
    return MusicGen.load(MODEL, "int8", threads=1)


@pytest.fixture(scope="module")
def calibrated(float_engine) -> dict[str, np.ndarray]:
    calibration = kvquant.Calibration()
    for prompt in kvquant.PROMPTS:
        float_engine.calibration_run(prompt, calibration)
    return calibration.scales()


def quantized(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    inverse = (np.float32(1) / scale).reshape(1, HEADS, 1, HEAD_DIM)
    return np.clip(np.rint(x * inverse), -128, 127).astype(np.int8)


def test_int8_cache_holds_the_float_values_quantized_as_documented(float_engine, calibrated):
    """The prefill branch's int8 hand-over and GroupQueryAttention's own writes both
    equal rint(x * (1 / scale)) saturated, of the float cache's values."""
    config, hidden, mask = float_engine.config, *float_engine.encode_text(PROMPT)
    plain, int8 = decoder(config), decoder(config, calibrated)
    ids = np.random.default_rng(3).integers(0, 2048, (8, 12))
    plain.begin(ids, hidden, mask, 20)
    int8.begin(ids, hidden, mask, 20)
    plain.step(ids[:, :1])
    int8.step(ids[:, :1])
    for name in plain.dec_names:
        scale = calibrated[present_name(name)]
        got, want = int8.cache[name].numpy(), plain.cache[name].numpy()
        assert got.dtype == np.int8
        # the 12 prefilled positions, every layer (the same float values in both graphs)
        np.testing.assert_array_equal(got[:, :, :12], quantized(want[:, :, :12], scale))
        if name.startswith("past_key_values.0."):   # layer 0's new key/value: no past in it
            np.testing.assert_array_equal(got[:, :, 12], quantized(want[:, :, 12:13], scale)[:, :, 0])


def teacher_forced_kl(engine: MusicGen, dec: Decoder, tokens: np.ndarray,
                      reference: list[np.ndarray]) -> float:
    """Mean KL (nats) of ``dec``'s guided next-token distributions from ``reference``'s,
    fed the same ``tokens`` [K, T+K] (the delayed sequence)."""
    hidden, mask = engine.encode_text(PROMPT)
    logits = [dec.begin(np.concatenate([tokens[:, :1]] * 2), hidden, mask, tokens.shape[1])]
    for t in range(1, tokens.shape[1] - 1):
        logits.append(dec.step(np.concatenate([tokens[:, t:t + 1]] * 2)))
    dec.release()
    kl = []
    for got, want in zip(logits, reference, strict=True):
        p, q = (np.exp(x - x.max(-1, keepdims=True)) for x in (guide(want, 3.0), guide(got, 3.0)))
        p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
        kl.append((p * (np.log(p) - np.log(q))).sum(-1).mean())
    return float(np.mean(kl))


def test_calibrated_int8_cache_stays_close_and_bad_scales_do_not(float_engine, calibrated):
    """Teacher-forced along a float-cache sample, the calibrated int8 cache moves the
    next-token distributions by little; scales 20x too small (most values saturated)
    move them >10x further: the comparison can tell a working cache from a broken one."""
    config = float_engine.config
    codes = float_engine.generate_codes(PROMPT, 120, seed=11)
    tokens = delay.build_template(codes, 120, config.pad_token_id)
    plain = decoder(config)
    reference = []
    hidden, mask = float_engine.encode_text(PROMPT)
    reference.append(plain.begin(np.concatenate([tokens[:, :1]] * 2), hidden, mask,
                                 tokens.shape[1]))
    for t in range(1, tokens.shape[1] - 1):
        reference.append(plain.step(np.concatenate([tokens[:, t:t + 1]] * 2)))
    close = teacher_forced_kl(float_engine, decoder(config, calibrated), tokens, reference)
    broken = {k: v / 20 for k, v in calibrated.items()}
    far = teacher_forced_kl(float_engine, decoder(config, broken), tokens, reference)
    assert close < 2e-4 and far > 10 * close, (close, far)


def test_calibration_takes_each_channels_peak_with_headroom():
    c = kvquant.Calibration()
    a = np.zeros((2, HEADS, 5, HEAD_DIM), np.float32)
    a[1, 0, 3, 2], a[0, 1, 0, 7] = -4.0, 2.0
    c.observe("present.0.decoder.key", a)
    c.observe("present.0.decoder.key", a / 2)          # smaller: the peak stays
    scale = c.scales()["present.0.decoder.key"]
    assert scale.shape == (HEADS * HEAD_DIM,)
    assert scale[2] == pytest.approx(4.0 * kvquant.HEADROOM / 127)
    assert scale[8 + 7] == pytest.approx(2.0 * kvquant.HEADROOM / 127)
    assert (scale > 0).all() and scale[0] == np.finfo(np.float32).tiny   # never seen: 0 stays 0


def test_int8_cache_rewrite_refuses_what_it_cannot_do(calibrated):
    import onnx

    split = onnx.load(str(MODEL / "small_i8" / "decoder_with_past_model.onnx"))
    with pytest.raises(ValueError, match="merged"):
        share_kv_graph(split, HEADS, HEAD_DIM, calibrated)
    merged = onnx.load(str(MODEL / "small_i8" / "decoder_model_merged.onnx"))
    with pytest.raises(ValueError, match="positive"):
        share_kv_graph(merged, HEADS, HEAD_DIM, {**calibrated, "present.1.decoder.value":
                                                    np.zeros(HEADS * HEAD_DIM, np.float32)})


def optimized_step(tmp_path: Path, step_rows: int | None):
    """(the step branch after onnxruntime's optimizations, a decoder on it)."""
    import onnx

    model = onnx.load(str(MODEL / "small_i8" / "decoder_model_merged.onnx"))
    share_kv_graph(model, HEADS, HEAD_DIM, step_rows=step_rows)
    opts = sessions.options("decoder", 1)
    opts.optimized_model_filepath = str(tmp_path / f"step{step_rows}.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    saved = onnx.load(opts.optimized_model_filepath)
    step = next(a.g for n in saved.graph.node for a in n.attribute if a.name == "then_branch")
    return step, sess


def test_fixed_step_shapes_and_one_op_cross_attention(tmp_path, float_engine):
    """A step's ids reshaped to [2K, 1] let onnxruntime fold the Shape/Gather/Concat
    chains the export derives from them, and each cross-attention runs as one
    MultiHeadAttention over the cached encoder keys/values: far fewer nodes, the same
    logits to float rounding (and the exported graph's codes:
    test_engine.py's test_shared_kv_buffers_match_the_exported_graph runs this graph)."""
    (free, free_sess), (fixed, fixed_sess) = (optimized_step(tmp_path, rows) for rows in (None, 8))
    ops = [n.op_type for n in fixed.node]
    assert ops.count("MultiHeadAttention") == 2 and "Softmax" not in ops
    assert len(fixed.node) < 0.6 * len(free.node), (len(fixed.node), len(free.node))
    hidden, mask = float_engine.encode_text(PROMPT)
    ids = np.random.default_rng(4).integers(0, 2048, (8, 6))
    logits = []
    for sess in (free_sess, fixed_sess):
        dec = Decoder(sess, sess, float_engine.config)
        dec.begin(ids[:, :1], hidden, mask, 8)
        logits.append(np.stack([dec.step(ids[:, t:t + 1]) for t in range(1, 6)]))
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-5)
    assert np.abs(logits[0]).max() > 0.1


def test_a_failed_calibration_keeps_the_float_cache(tmp_path, monkeypatch):
    """int4's first load calibrates; where that fails (here: NaN logits), the engine
    still loads, on the float cache, and nothing int8 is cached."""
    from lofid.errors import MODEL_INFERENCE_FAILED, LofiError

    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path))

    def nan_run(self, prompt, calibration):
        raise LofiError(MODEL_INFERENCE_FAILED, "the decoder produced NaN/inf logits")

    monkeypatch.setattr(MusicGen, "calibration_run", nan_run)
    m = MusicGen.load(MODEL, "int4", threads=1)
    assert {m.decoder.past_dtype[n] for n in m.decoder.dec_names} == {np.float32}
    assert not [p for p in tmp_path.iterdir() if "kv8" in p.name]
    audio = m.generate("rain on the window", 2.0, seed=1)
    assert audio.shape == (2 * 50 * 640,) and np.isfinite(audio).all()
    monkeypatch.undo()                  # the next load calibrates and caches the int8 cache
    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path))
    again = MusicGen.load(MODEL, "int4", threads=1)
    assert {again.decoder.past_dtype[n] for n in again.decoder.dec_names} == {np.int8}
    assert [p for p in tmp_path.iterdir() if p.name.endswith("-kv8.onnx")]


def test_a_failed_int8_cache_rewrite_keeps_the_float_cache(tmp_path, monkeypatch):
    """Calibrated, but the int8-cache rewrite fails (here: the prefill's quantization):
    int4 loads on the float cache instead of failing."""
    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path))

    def broken(*args, **kwargs):
        raise ValueError("no such output")

    monkeypatch.setattr(kvquant, "quantize_prefill", broken)
    m = MusicGen.load(MODEL, "int4", threads=1)
    assert {m.decoder.past_dtype[n] for n in m.decoder.dec_names} == {np.float32}
    assert not [p for p in tmp_path.iterdir() if "kv8" in p.name]
    assert np.isfinite(m.generate("rain on the window", 1.0, seed=1)).all()
    with pytest.raises(ValueError, match="divisible by 8"):
        import onnx

        model = onnx.load(str(MODEL / "small_i8" / "decoder_model_merged.onnx"))
        share_kv_graph(model, 4, 4, {})
