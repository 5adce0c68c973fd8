"""The int8 self-attention cache: per-channel scales, calibrated once per model file.

A decoder step reads the whole self-attention cache: 24 layers x key and value x the
CFG batch of 2 x 16 heads x 64 values per position, 393 KB per position in float32 and
590 MB at 1500 positions (30 s of audio): reading it is why the step time grows with
the track. onnxruntime's
GroupQueryAttention can keep that cache in int8 with one static scale per channel
(head x dim), quantizing each new key/value as ``rint(x * (1 / scale))`` saturated to
[-128, 127]: a quarter of the bytes to read.

The scales come from the model itself: at the first load of a variant that uses it,
``MusicGen._quantize_kv_cache`` (musicgen.py) generates ``FRAMES`` frames of each of
``PROMPTS`` with the float32 cache, and ``Calibration`` takes every channel's largest
magnitude, times ``HEADROOM`` for what other prompts and later positions reach
(bench/RESULTS.md measures the share that saturates). The rewritten decoder keeps the
scales as initializers and is cached like the other rewrites, so later loads do not
calibrate again.

Only the int4 variant uses it (``kv_int8`` in lofid/variants.py): it is for users who put speed
first, and a calibrated cache is one more approximation. int8 and fp32 keep the exact
float32 cache. What it costs and saves: bench/RESULTS.md.
"""

from __future__ import annotations

import numpy as np

HEADROOM = 1.25
PROMPTS = ("lofi hip hop, jazzy piano", "ambient drone with rain and soft synth pads")
FRAMES = 200
SEED = 7


class Calibration:
    """The largest magnitude seen per channel of every layer's decoder key and value."""

    def __init__(self) -> None:
        self.absmax: dict[str, np.ndarray] = {}

    def observe(self, present: str, cache: np.ndarray) -> None:
        """``cache``: the filled part of one present buffer, ``[batch, heads, length, dim]``."""
        peak = np.abs(cache).max(axis=(0, 2)).reshape(-1).astype(np.float32)
        self.absmax[present] = np.maximum(self.absmax.get(present, peak), peak)

    def scales(self) -> dict[str, np.ndarray]:
        """present name -> per-channel scale ``[heads * dim]`` (a channel never seen
        above zero gets the smallest normal float: it quantizes to 0 as it was)."""
        tiny = np.finfo(np.float32).tiny
        return {name: np.maximum(peak * HEADROOM / 127, tiny).astype(np.float32)
                for name, peak in self.absmax.items()}


def channel_scale(kv_scales: dict[str, np.ndarray], present: str, channels: int) -> np.ndarray:
    """``present``'s scale ``[channels]``; ValueError where it is missing or not positive."""
    scale = np.asarray(kv_scales.get(present, ()), np.float32).reshape(-1)
    if scale.size != channels or not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{present}: need {channels} positive finite scales")
    return scale


def quantize_prefill(prefill, kv_scales: dict[str, np.ndarray], heads: int,
                     head_dim: int) -> None:
    """Make the merged decoder's prefill branch hand over its decoder keys/values in int8,
    exactly as GroupQueryAttention quantizes them (an ``If``'s branches must output the
    same types; the step branch then reads the prefill's positions like its own)."""
    from onnx import TensorProto, helper, numpy_helper

    for o in prefill.output:   # an If's outputs are positional: rename the branch's
        if not (o.name.startswith("present.") and ".decoder." in o.name):
            continue
        pre = f"/lofid/kvquant/{o.name}"
        scale = channel_scale(kv_scales, o.name, heads * head_dim)
        inverse = (np.float32(1) / scale).reshape(1, heads, 1, head_dim)
        prefill.initializer.extend([
            numpy_helper.from_array(inverse, pre + "/inverse_scale"),
            numpy_helper.from_array(np.array(1, np.float32), pre + "/one"),
            numpy_helper.from_array(np.array(0, np.int8), pre + "/zero")])
        prefill.node.extend([
            helper.make_node("Mul", [o.name, pre + "/inverse_scale"], [pre + "/scaled"]),
            helper.make_node("QuantizeLinear", [pre + "/scaled", pre + "/one", pre + "/zero"],
                             [pre + "/int8"])])
        o.name = pre + "/int8"
        o.type.tensor_type.elem_type = TensorProto.INT8
