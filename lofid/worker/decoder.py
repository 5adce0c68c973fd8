"""The MusicGen decoder with its KV cache: merged (one session) or split (two).

``begin`` runs the positions known up front with no cache and keeps the encoder
(cross-attention) keys/values, computed once per request; ``step`` feeds one position
and grows the decoder cache. A decoder rewritten by graphs/kvshare.py keeps its
self-attention cache in preallocated buffers, bound as both past and present and
written in place; its steps run through one IOBinding made per sequence.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from lofid.errors import MODEL_INFERENCE_FAILED, LofiError
from lofid.worker.graphs.kvshare import KV_SEQLENS, KV_TOTAL, PAST
from lofid.worker.model_config import ModelConfig
from lofid.worker.sessions import guard

NP_TYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def present_name(past_name: str) -> str:
    """The output that holds the next value of the past input ``past_name``."""
    return past_name.replace("past_key_values.", "present.", 1)


class Decoder:
    """One decoder (``first`` for the prefill, ``with_past`` for the steps: the same
    session when merged) and the KV cache of the sequence it is decoding."""

    def __init__(self, first: ort.InferenceSession, with_past: ort.InferenceSession,
                 config: ModelConfig) -> None:
        self.first, self.with_past = first, with_past
        self.merged = first is with_past
        past_inputs = {i.name: i for i in with_past.get_inputs() if PAST.match(i.name)}
        self.past_names = sorted(past_inputs)
        inputs = {i.name: i for i in first.get_inputs()}
        missing = {"input_ids", "encoder_hidden_states", "encoder_attention_mask"} - set(inputs)
        if missing or not self.past_names or (self.merged and "use_cache_branch" not in inputs):
            raise ValueError(f"not a MusicGen decoder graph (missing {sorted(missing)})")
        self.dtype = NP_TYPE[inputs["encoder_hidden_states"].type]
        shape = past_inputs[self.past_names[0]].shape   # [batch, heads, len, head_dim]
        self.heads = shape[1] if isinstance(shape[1], int) else config.num_heads
        self.head_dim = shape[3] if isinstance(shape[3], int) else config.head_dim
        self.step_inputs = {i.name for i in with_past.get_inputs()}
        self.dec_names = [n for n in self.past_names if ".decoder." in n]
        # each past's element type: the decoder's is int8 where its cache is quantized
        self.past_dtype = {n: NP_TYPE[past_inputs[n].type] for n in self.past_names}
        self.step_outputs = ["logits"] + [present_name(n) for n in self.dec_names]
        self.device_type = "cuda" if first.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.cache: dict[str, ort.OrtValue] = {}
        # share_kv_graph'd decoder: the self-attention cache lives in preallocated
        # buffers, bound as both past and present, written in place.
        self.shared = KV_SEQLENS in self.step_inputs
        self.length = 0
        self.binding, self.bound = None, {}   # the shared decoder's step (``_bind_steps``)

    def release(self) -> None:
        """Drop the KV buffers and the encoder states between requests (the KV buffers
        are the largest allocation of a long generation; EnCodec runs after them)."""
        self.cache, self.hidden, self.mask, self.length = {}, None, None, 0
        self.binding, self.bound = None, {}

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def _bound_run(self, sess: ort.InferenceSession, inputs: dict, outputs: list[str]) -> list:
        """Run through IOBinding: the KV cache stays in onnxruntime's OrtValues (on the
        device for CUDA) and is bound straight back as the next step's past, with no
        copy into numpy and back. Only the logits are read out. (The shared decoder's
        steps keep one binding instead: ``_bind_steps``.)"""
        binding = sess.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.device_type)
        guard(lambda: sess.run_with_iobinding(binding))
        return binding.get_outputs()

    def begin(self, ids: np.ndarray, hidden: np.ndarray, mask: np.ndarray,
              capacity: int = 0) -> np.ndarray:
        """ids ``[2K, L]`` -> logits of the last position ``[2K, V]``; fills the cache.

        ``capacity``: the most positions this sequence will reach (the size of the
        shared KV buffers; ignored by the unshared graphs)."""
        self.hidden, self.mask = self._value(hidden), self._value(mask)
        batch, length = hidden.shape[0], ids.shape[1]
        inputs = {"input_ids": ids, "encoder_hidden_states": self.hidden,
                  "encoder_attention_mask": self.mask}
        if self.merged:
            inputs.update({n: np.zeros((batch, self.heads, 0, self.head_dim),
                                       self.past_dtype[n]) for n in self.past_names})
            inputs["use_cache_branch"] = np.array([False])
            if self.shared:
                inputs[KV_SEQLENS] = np.full(batch, length - 1, np.int32)
                inputs[KV_TOTAL] = np.array(length, np.int32)
        names = ["logits"] + [present_name(n) for n in self.past_names]
        out = self._bound_run(self.first, inputs, names)
        self.cache = dict(zip(self.past_names, out[1:], strict=True))   # encoder K/V: computed once
        if self.shared:
            # one zeroed buffer per layer's key and value, the prefill copied in once
            capacity = max(capacity, length + 1)
            for name in self.dec_names:
                buf = np.zeros((batch, self.heads, capacity, self.head_dim),
                               self.past_dtype[name])
                buf[:, :, :length] = self.cache[name].numpy()
                self.cache[name] = self._value(buf)
            self.length = length
        logits = out[0].numpy()
        if self.shared:
            self._bind_steps(logits.shape[0], logits.shape[-1], logits.dtype)
        return logits[:, -1]

    def _bind_steps(self, rows: int, vocab: int, dtype) -> None:
        """Bind the shared decoder's step once per sequence: every step runs on the same
        buffers (the KV cache in place, the encoder states, the logits), so only the
        step's ids and the two lengths change, written into their bound values: binding
        the ~150 names anew would cost every step (bench/RESULTS.md)."""
        batch = self.mask.shape()[0]
        self.step_ids = self._value(np.zeros((rows, 1), np.int64))
        self.seqlens = self._value(np.zeros(batch, np.int32))
        self.total = self._value(np.zeros((), np.int32))
        self.logits = np.zeros((rows, 1, vocab), dtype)
        b = self.binding = self.with_past.io_binding()
        inputs = {"input_ids": self.step_ids, "encoder_attention_mask": self.mask,
                  KV_SEQLENS: self.seqlens, KV_TOTAL: self.total, **self.cache}
        if "encoder_hidden_states" in self.step_inputs:
            inputs["encoder_hidden_states"] = self.hidden
        if self.merged:
            inputs["use_cache_branch"] = self._value(np.array([True]))
        # OrtValues made from numpy wrap its memory and keep it alive: held here with
        # the binding (the logits' one: each run writes the logits into self.logits)
        self.bound = {**inputs, "logits": ort.OrtValue.ortvalue_from_numpy(self.logits)}
        for name, value in inputs.items():
            b.bind_ortvalue_input(name, value)
        b.bind_ortvalue_output("logits", self.bound["logits"])
        for name in self.dec_names:
            b.bind_ortvalue_output(present_name(name), self.cache[name])

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids ``[2K, 1]`` -> logits ``[2K, V]``; appends to the decoder cache."""
        if not self.shared:
            inputs = {"input_ids": ids, "encoder_attention_mask": self.mask, **self.cache}
            if "encoder_hidden_states" in self.step_inputs:
                inputs["encoder_hidden_states"] = self.hidden
            if self.merged:
                inputs["use_cache_branch"] = np.array([True])
            out = self._bound_run(self.with_past, inputs, self.step_outputs)
            self.cache.update(zip(self.dec_names, out[1:], strict=True))
            return out[0].numpy()[:, -1]
        capacity = self.cache[self.dec_names[0]].shape()[2]
        if self.length + 1 > capacity or ids.shape[1] != 1:
            raise LofiError(MODEL_INFERENCE_FAILED, f"a step of {ids.shape[1]} positions at "
                            f"position {self.length} of a {capacity}-position KV buffer")
        self.step_ids.update_inplace(np.ascontiguousarray(ids, np.int64))
        self.seqlens.update_inplace(np.full(self.seqlens.shape(), self.length, np.int32))
        self.total.update_inplace(np.array(self.length + 1, np.int32))
        guard(lambda: self.with_past.run_with_iobinding(self.binding))
        self.length += 1
        return self.logits[:, -1].copy()
