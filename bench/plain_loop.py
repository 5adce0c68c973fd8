"""The plain, no-tricks numpy + onnxruntime MusicGen loop (the baseline of issue 9).

What anyone would write first from the optimum export: split decoder pair, numpy in and
numpy out on every ``session.run`` (the whole KV cache goes out to numpy and back in each
step, and the graph concatenates past and new keys/values every step), CFG batch of 2,
top-k sampling in numpy, transformers' delay pattern, EnCodec at the end. Default
session options apart from the thread count. Not used by lofid.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

DIRS = {"fp32": "small_fp32", "int8": "small_i8"}


class PlainLoop:
    def __init__(self, root: Path, variant: str, threads: int) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1

        def sess(path: Path) -> ort.InferenceSession:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        self.tok = Tokenizer.from_file(str(root / "small" / "tokenizer.json"))
        cfg = json.loads((root / "small" / "config.json").read_text())
        self.pad = cfg["decoder"]["pad_token_id"]
        self.k = cfg["decoder"]["num_codebooks"]
        self.text = sess(root / "small_fp32" / "text_encoder.onnx")
        self.first = sess(root / DIRS[variant] / "decoder_model.onnx")
        self.step = sess(root / DIRS[variant] / "decoder_with_past_model.onnx")
        self.codec = sess(root / "small_fp32" / "encodec_decode.onnx")
        self.step_inputs = [i.name for i in self.step.get_inputs()]

    def generate(self, prompt: str, frames: int, seed: int, top_k: int = 250,
                 guidance: float = 3.0) -> tuple[np.ndarray, list[float]]:
        rng = np.random.default_rng(seed)
        ids = np.array([self.tok.encode(prompt).ids], dtype=np.int64)
        (hidden,) = self.text.run(["last_hidden_state"], {"input_ids": ids,
                                                          "attention_mask": np.ones_like(ids)})
        hidden = np.concatenate([hidden, np.zeros_like(hidden)])
        mask = np.concatenate([np.ones_like(ids), np.zeros_like(ids)])
        k, total = self.k, frames + self.k
        seq = np.full((k, total), -1, dtype=np.int64)
        seq[:, 0] = self.pad
        for c in range(k):
            seq[c, 1 : 1 + c] = self.pad
            seq[c, 1 + c + frames :] = self.pad
        names = [o.name for o in self.first.get_outputs()]
        out = dict(zip(names, self.first.run(None, {
            "input_ids": np.concatenate([seq[:, :1]] * 2), "encoder_hidden_states": hidden,
            "encoder_attention_mask": mask}), strict=True))
        stamps = []
        for t in range(1, total):
            logits = out["logits"][:, -1].astype(np.float32)
            cond, uncond = logits[:k], logits[k:]
            guided = uncond + (cond - uncond) * guidance
            top = np.argpartition(-guided, top_k - 1, axis=-1)[:, :top_k]
            vals = np.take_along_axis(guided, top, axis=-1)
            p = np.exp(vals - vals.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            token = np.array([top[c, rng.choice(top_k, p=p[c])] for c in range(k)])
            unknown = seq[:, t] == -1
            seq[unknown, t] = token[unknown]
            stamps.append(time.perf_counter())
            if t + 1 < total:
                feeds = {"input_ids": np.concatenate([seq[:, t : t + 1]] * 2),
                         "encoder_attention_mask": mask}
                if "encoder_hidden_states" in self.step_inputs:
                    feeds["encoder_hidden_states"] = hidden
                for name in self.step_inputs:
                    if name.startswith("past_key_values."):
                        feeds[name] = out[name.replace("past_key_values.", "present.")]
                prev = out
                out = dict(zip([o.name for o in self.step.get_outputs()],
                               self.step.run(None, feeds), strict=True))
                for name in prev:   # the encoder K/V come from the first step only
                    if ".encoder." in name and name not in out:
                        out[name] = prev[name]
        codes = np.stack([seq[c, 1 + c : 1 + c + frames] for c in range(k)])
        (audio,) = self.codec.run(["audio_values"], {"audio_codes": codes[None, None]})
        return audio.reshape(-1), stamps
