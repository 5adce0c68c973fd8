"""The ONNX MusicGen pipeline: text -> T5 encoder -> decoder with KV cache -> EnCodec.

Files come in the ``gabotechs/music_gen`` hub layout (docs: CONTRACT.md "Model files").
Every dimension (codebooks, layers, heads, hidden sizes, pad token, sample rate, hop)
comes from ``small/config.json`` and the graphs, so the tiny test model in
``tests/fixtures/music_gen`` runs through exactly the same code as musicgen-small.

One request: tokenize -> text encoder ``[1, L, D]`` -> classifier-free guidance batch
[conditional, unconditional (zero states, zero mask)] -> per window: delayed template
(delay.py) -> prefill the known positions -> one decoder step per position with the KV
cache, guided logits, top-k sampling (sampling.py) -> undo the delay -> EnCodec.
Requests longer than one window continue the way audiocraft's ``_generate_tokens`` does:
the next window is primed with the last ``window - stride`` frames and the same text.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from lofid.errors import (
    INVALID_DURATION,
    INVALID_PARAMS,
    MODEL_INFERENCE_FAILED,
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    LofiError,
)
from lofid.worker import delay
from lofid.worker.device import INSTALL_HINT, PROVIDER, resolve_threads, select, session_options
from lofid.worker.sampling import SamplingParams, guide, sample

Progress = Callable[[int, int], None]

CONFIG = "small/config.json"
TOKENIZER = "small/tokenizer.json"
# The folders the engine reads per variant: (text encoder, decoder, EnCodec). int8 takes
# the fp32 text encoder and EnCodec, as MusicGPT's "small-quant" does.
VARIANT_DIRS: dict[str, tuple[str, str, str]] = {
    "fp32": ("small_fp32", "small_fp32", "small_fp32"),
    "fp16": ("small_fp16", "small_fp16", "small_fp16"),
    "int8": ("small_fp32", "small_i8", "small_fp32"),
}
# The hub's small_fp16/ has no merged decoder, so fp16 uses the split pair.
DEFAULT_DECODER_FORM = {"fp32": "merged", "fp16": "split", "int8": "merged"}
REPAIR = "run `lofictl models download --force` to fetch it again"
WINDOW_SEC = 30.0    # MusicGen was trained on 30 s
STRIDE_SEC = 18.0    # audiocraft's extend_stride: the next window keeps the last 12 s
MIN_DECODE_FRAMES = 8
_PAST = re.compile(r"past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")
_NP_TYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def engine_file_roles(variant: str, decoder_form: str | None = None) -> dict[str, str]:
    """role -> hub-relative path of each ONNX file the engine opens for ``variant``.

    ``decoder_form`` "merged" (one graph with ``use_cache_branch``) or "split"
    (``decoder_model`` + ``decoder_with_past_model``); None takes the variant's default.
    """
    if variant not in VARIANT_DIRS:
        raise LofiError(INVALID_PARAMS, f"unknown variant {variant!r}; choose one of "
                        f"{', '.join(VARIANT_DIRS)}", variant=variant)
    form = decoder_form or DEFAULT_DECODER_FORM[variant]
    if form not in ("merged", "split"):
        raise LofiError(INVALID_PARAMS, f"decoder_form must be merged or split, not {form!r}")
    text, dec, codec = VARIANT_DIRS[variant]
    roles = {"text_encoder": f"{text}/text_encoder.onnx"}
    if form == "merged":
        roles["decoder"] = f"{dec}/decoder_model_merged.onnx"
    else:
        roles["decoder"] = f"{dec}/decoder_model.onnx"
        roles["decoder_with_past"] = f"{dec}/decoder_with_past_model.onnx"
    roles["encodec"] = f"{codec}/encodec_decode.onnx"
    return roles


def engine_files(variant: str, decoder_form: str | None = None) -> list[str]:
    """Hub-relative paths the engine needs for ``variant`` (config and tokenizer too)."""
    return [CONFIG, TOKENIZER, *engine_file_roles(variant, decoder_form).values()]


def plan_windows(frames: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(offset, primed, length)`` per window, as audiocraft's ``_generate_tokens``.

    Window i covers frames ``[offset, offset + length)``; its first ``primed`` frames are
    the previous window's last frames, fed as a prompt; the rest are new.
    """
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride ({stride}) < window ({window})")
    plans, offset, primed = [], 0, 0
    while offset + primed < frames:
        length = min(frames - offset, window)
        plans.append((offset, primed, length))
        primed, offset = length - stride, offset + stride
    return plans


@dataclass(frozen=True)
class ModelConfig:
    """What the engine reads from ``small/config.json``."""

    num_codebooks: int
    pad_token_id: int
    max_positions: int
    num_heads: int
    head_dim: int
    sample_rate: int
    hop_length: int

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            cfg = json.loads(path.read_text())
            dec, audio = cfg["decoder"], cfg["audio_encoder"]
            heads = int(dec["num_attention_heads"])
            return cls(
                num_codebooks=int(dec["num_codebooks"]),
                pad_token_id=int(dec["pad_token_id"]),
                max_positions=int(dec["max_position_embeddings"]),
                num_heads=heads,
                head_dim=int(dec["hidden_size"]) // heads,
                sample_rate=int(audio["sampling_rate"]),
                hop_length=int(np.prod(audio["upsampling_ratios"])),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"cannot read {path}: {e}; {REPAIR}",
                            file=str(path)) from e


def _run(sess: ort.InferenceSession, outputs: list[str] | None, feeds: dict) -> list:
    return _guard(lambda: sess.run(outputs, feeds))


def _guard(call: Callable[[], object]):
    """Run an onnxruntime call, turning its failures into MODEL_INFERENCE_FAILED."""
    try:
        return call()
    except MemoryError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types
        text = str(e)
        if "alloc" in text.lower() or "out of memory" in text.lower():
            raise LofiError(MODEL_INFERENCE_FAILED, f"out of memory: {text}") from e
        raise LofiError(MODEL_INFERENCE_FAILED, f"inference failed: {text}") from e


class _Decoder:
    """The MusicGen decoder with its KV cache: merged (one session) or split (two).

    ``begin`` runs the positions known up front with no cache and keeps the encoder
    (cross-attention) keys/values, computed once per request; ``step`` feeds one
    position and grows the decoder cache.
    """

    def __init__(self, first: ort.InferenceSession, with_past: ort.InferenceSession,
                 config: ModelConfig) -> None:
        self.first, self.with_past = first, with_past
        self.merged = first is with_past
        past_inputs = {i.name: i for i in with_past.get_inputs() if _PAST.match(i.name)}
        self.past_names = sorted(past_inputs)
        inputs = {i.name: i for i in first.get_inputs()}
        missing = {"input_ids", "encoder_hidden_states", "encoder_attention_mask"} - set(inputs)
        if missing or not self.past_names or (self.merged and "use_cache_branch" not in inputs):
            raise ValueError(f"not a MusicGen decoder graph (missing {sorted(missing)})")
        self.dtype = _NP_TYPE[inputs["encoder_hidden_states"].type]
        shape = past_inputs[self.past_names[0]].shape   # [batch, heads, len, head_dim]
        self.heads = shape[1] if isinstance(shape[1], int) else config.num_heads
        self.head_dim = shape[3] if isinstance(shape[3], int) else config.head_dim
        self.step_inputs = {i.name for i in with_past.get_inputs()}
        self.dec_names = [n for n in self.past_names if ".decoder." in n]
        self.step_outputs = ["logits"] + [self._present(n) for n in self.dec_names]
        self.device_type = "cuda" if first.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.cache: dict[str, ort.OrtValue] = {}

    @staticmethod
    def _present(past_name: str) -> str:
        return past_name.replace("past_key_values.", "present.", 1)

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def _bound_run(self, sess: ort.InferenceSession, inputs: dict, outputs: list[str]) -> list:
        """Run through IOBinding: the KV cache stays in onnxruntime's OrtValues (on the
        device for CUDA) and is bound straight back as the next step's past, with no
        copy into numpy and back. Only the logits are read out."""
        binding = sess.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.device_type)
        _guard(lambda: sess.run_with_iobinding(binding))
        return binding.get_outputs()

    def begin(self, ids: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids ``[2K, L]`` -> logits of the last position ``[2K, V]``; fills the cache."""
        self.hidden, self.mask = self._value(hidden), self._value(mask)
        inputs = {"input_ids": ids, "encoder_hidden_states": self.hidden,
                  "encoder_attention_mask": self.mask}
        if self.merged:
            empty = np.zeros((hidden.shape[0], self.heads, 0, self.head_dim), self.dtype)
            inputs.update({n: empty for n in self.past_names})
            inputs["use_cache_branch"] = np.array([False])
        names = ["logits"] + [self._present(n) for n in self.past_names]
        out = self._bound_run(self.first, inputs, names)
        self.cache = dict(zip(self.past_names, out[1:]))   # encoder K/V: computed once
        return out[0].numpy()[:, -1]

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids ``[2K, 1]`` -> logits ``[2K, V]``; appends to the decoder cache."""
        inputs = {"input_ids": ids, "encoder_attention_mask": self.mask, **self.cache}
        if "encoder_hidden_states" in self.step_inputs:
            inputs["encoder_hidden_states"] = self.hidden
        if self.merged:
            inputs["use_cache_branch"] = np.array([True])
        out = self._bound_run(self.with_past, inputs, self.step_outputs)
        self.cache.update(zip(self.dec_names, out[1:]))
        return out[0].numpy()[:, -1]


class MusicGen:
    """A loaded MusicGen variant. Build with ``MusicGen.load``; call ``generate``."""

    def __init__(self, *, root: Path, variant: str, config: ModelConfig,
                 tokenizer: Tokenizer, text_encoder: ort.InferenceSession,
                 decoder: _Decoder, encodec: ort.InferenceSession, device: str,
                 threads: int, load_time_sec: float) -> None:
        self.root, self.variant, self.config = root, variant, config
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.decoder, self.encodec = decoder, encodec
        self.device, self.threads, self.load_time_sec = device, threads, load_time_sec
        self.provider = decoder.first.get_providers()[0]
        self.sample_rate = config.sample_rate
        self.frame_rate = config.frame_rate
        self.hop_length = config.hop_length
        self.num_codebooks = config.num_codebooks
        # Long-form windows, in frames; settable (tests use short ones on the tiny model).
        self.window_frames = min(round(WINDOW_SEC * self.frame_rate),
                                 config.max_positions - config.num_codebooks)
        self.stride_frames = min(round(STRIDE_SEC * self.frame_rate), self.window_frames - 1)
        self._text_float = _NP_TYPE[text_encoder.get_outputs()[0].type]

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, root: Path | str, variant: str, *, device: str = "auto",
             threads: int | None = None, decoder_form: str | None = None) -> MusicGen:
        """Open ``variant`` (fp32 / fp16 / int8) from a folder in the hub layout.

        ``decoder_form`` overrides the variant's decoder files ("merged" or "split").

        Raises LofiError MODEL_NOT_FOUND (files missing, named in ``missing``) or
        MODEL_LOAD_FAILED (unreadable/corrupt files, unavailable device).
        """
        start = time.perf_counter()
        root = Path(root)
        spec = engine_file_roles(variant, decoder_form)
        files = [CONFIG, TOKENIZER, *spec.values()]
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise LofiError(MODEL_NOT_FOUND, f"model files missing under {root}: "
                            f"{', '.join(missing)}", missing=missing, variant=variant,
                            root=str(root))
        choice = select(device, ort.get_available_providers())
        n_threads = resolve_threads(threads)
        config = ModelConfig.from_file(root / CONFIG)
        try:
            tokenizer = Tokenizer.from_file(str(root / TOKENIZER))
        except Exception as e:
            raise LofiError(MODEL_LOAD_FAILED, f"cannot load {root / TOKENIZER}: {e}; "
                            f"{REPAIR}", file=TOKENIZER) from e
        opts = session_options(n_threads)
        sessions = {role: cls._session(root, rel, opts, choice.providers)
                    for role, rel in spec.items()}
        first = sessions["decoder"]
        used = first.get_providers()[0]
        device_used = next((d for d, p in PROVIDER.items() if p == used), "cpu")
        if (device or "auto").lower() != "auto" and device_used != choice.device:
            # onnxruntime falls back to the CPU when a provider's libraries fail to load
            raise LofiError(MODEL_LOAD_FAILED, f"onnxruntime could not start {used!r} for "
                            f"device {choice.device!r} (it fell back to {used}); "
                            f"{INSTALL_HINT.get(choice.device, '')}, or use --device cpu",
                            device=choice.device)
        try:
            decoder = _Decoder(first, sessions.get("decoder_with_past", first), config)
            if "audio_codes" not in {i.name for i in sessions["encodec"].get_inputs()}:
                raise ValueError("EnCodec graph has no audio_codes input")
        except (ValueError, KeyError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"unexpected model graph in {root}: {e}; "
                            f"{REPAIR}", variant=variant) from e
        return cls(root=root, variant=variant, config=config, tokenizer=tokenizer,
                   text_encoder=sessions["text_encoder"], decoder=decoder,
                   encodec=sessions["encodec"], device=device_used, threads=n_threads,
                   load_time_sec=time.perf_counter() - start)

    @staticmethod
    def _session(root: Path, rel: str, opts, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(root / rel), sess_options=opts,
                                        providers=providers)
        except MemoryError:
            raise
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LofiError(MODEL_LOAD_FAILED, f"onnxruntime cannot load {rel} "
                            f"({first_line}); the file may be truncated or corrupt: "
                            f"{REPAIR}", file=rel) from e

    # ------------------------------------------------------------- generation
    def frames_for(self, duration_sec: float) -> int:
        return round(duration_sec * self.frame_rate)

    def generate(self, prompt: str, duration_sec: float, seed: int, *, top_k: int = 250,
                 temperature: float = 1.0, guidance_scale: float = 3.0,
                 progress: Progress | None = None) -> np.ndarray:
        """float32 mono audio in [-1, 1]: exactly ``round(duration_sec * frame_rate)``
        frames of ``hop_length`` samples. ``progress(tokens_generated, tokens_estimated)``
        is called after every decoder step, across all windows."""
        codes = self.generate_codes(prompt, self.frames_for(duration_sec), seed,
                                    top_k=top_k, temperature=temperature,
                                    guidance_scale=guidance_scale, progress=progress)
        return self.decode_audio(codes)

    def generate_codes(self, prompt: str, frames: int, seed: int, *, top_k: int = 250,
                       temperature: float = 1.0, guidance_scale: float = 3.0,
                       progress: Progress | None = None) -> np.ndarray:
        """The audio codes ``[K, frames]`` for ``prompt`` (windowed past one window)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise LofiError(INVALID_PARAMS, "prompt must be a non-empty string")
        if frames < 1:
            raise LofiError(INVALID_DURATION, "duration is shorter than one frame")
        try:
            params = SamplingParams(top_k, temperature, guidance_scale)
            rng = np.random.default_rng(seed)
        except (ValueError, TypeError) as e:
            raise LofiError(INVALID_PARAMS, str(e)) from e
        hidden, mask = self._encode_text(prompt)
        k = self.num_codebooks
        plans = plan_windows(frames, self.window_frames, self.stride_frames)
        estimated = sum(delay.generated_positions(n, k) - p for _, p, n in plans)
        counter = _Counter(estimated, progress)
        codes = np.full((k, frames), delay.UNKNOWN, dtype=np.int64)      # [K, T]
        for offset, primed, length in plans:
            prime = codes[:, offset : offset + primed]
            window = self._window(hidden, mask, prime, length, params, rng, counter)
            codes[:, offset + primed : offset + length] = window[:, primed:]
        if (codes < 0).any() or counter.done != estimated:
            raise LofiError(MODEL_INFERENCE_FAILED, "generation left frames unfilled")
        return codes

    def _encode_text(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """-> CFG batch: hidden ``[2, L, D]`` (row 1 zeros), mask ``[2, L]`` (row 1 zeros)."""
        ids = np.array([self.tokenizer.encode(prompt).ids], dtype=np.int64)   # [1, L]
        ones = np.ones_like(ids)
        (hidden,) = _run(self.text_encoder, ["last_hidden_state"],
                         {"input_ids": ids, "attention_mask": ones})
        hidden = hidden.astype(self.decoder.dtype, copy=False)
        hidden = np.concatenate([hidden, np.zeros_like(hidden)])
        mask = np.concatenate([ones, np.zeros_like(ones)])
        return hidden, mask

    def _window(self, hidden, mask, prime, frames, params, rng, counter) -> np.ndarray:
        """Decode one window of ``frames`` frames whose first ``prime`` frames are known."""
        seq = delay.build_template(prime, frames, self.config.pad_token_id)   # [K, T+K]
        total = seq.shape[1]
        start = delay.prefill_length(seq)
        logits = self.decoder.begin(np.concatenate([seq[:, :start]] * 2), hidden, mask)
        for t in range(start, total):
            if not np.isfinite(logits).all():
                raise LofiError(MODEL_INFERENCE_FAILED,
                                f"the decoder produced NaN/inf logits at step {t}")
            unknown = seq[:, t] == delay.UNKNOWN
            if unknown.any():
                token = sample(guide(logits, params.guidance_scale), params, rng)
                seq[unknown, t] = token[unknown]
            counter.tick()
            if t + 1 < total:
                logits = self.decoder.step(np.concatenate([seq[:, t : t + 1]] * 2))
        return delay.undo(seq)

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        """``[K, T]`` codes -> float32 mono ``[T * hop]`` through EnCodec.

        EnCodec's reflect padding needs a few frames: a shorter sequence is extended by
        repeating its last frame, and the extra samples are cut off again.
        """
        short = MIN_DECODE_FRAMES - codes.shape[-1]
        padded = np.pad(codes, ((0, 0), (0, short)), mode="edge") if short > 0 else codes
        (audio,) = _run(self.encodec, ["audio_values"], {"audio_codes": padded[None, None]})
        audio = audio.astype(np.float32).reshape(-1)
        if not np.isfinite(audio).all():
            raise LofiError(MODEL_INFERENCE_FAILED, "EnCodec produced NaN/inf samples")
        expected = codes.shape[-1] * self.hop_length
        if audio.shape[0] < expected:
            raise LofiError(MODEL_INFERENCE_FAILED, f"EnCodec returned {audio.shape[0]} "
                            f"samples for {codes.shape[-1]} frames ({expected} expected)")
        return np.clip(audio[:expected], -1.0, 1.0)


class _Counter:
    """Steps done across windows, reported as ``progress(done, estimated)``."""

    def __init__(self, estimated: int, progress: Progress | None) -> None:
        self.done, self.estimated, self.progress = 0, estimated, progress

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.estimated)
