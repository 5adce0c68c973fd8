"""The ONNX MusicGen pipeline: text -> T5 encoder -> decoder with KV cache -> EnCodec.

Files come in the ``gabotechs/music_gen`` hub layout (docs: CONTRACT.md "Model files";
which file each variant opens: lofid/variants.py). Every dimension (codebooks, layers,
heads, hidden sizes, pad token, sample rate, hop) comes from ``small/config.json`` and
the graphs, so the tiny test model in ``tests/fixtures/music_gen`` runs through exactly
the same code as musicgen-small.

One request: tokenize -> text encoder ``[1, L, D]`` -> classifier-free guidance batch
[conditional, unconditional (zero states, zero mask)] -> per window: delayed template
(delay.py) -> prefill the known positions -> one decoder step per position with the KV
cache (decoder.py), guided logits, top-k sampling (sampling.py) -> undo the delay ->
EnCodec. Requests longer than one window continue the way audiocraft's
``_generate_tokens`` does: the next window is primed with the last ``window - stride``
frames and the same text.

This file in three parts: loading (``MusicGen.load``: sessions.py opens the graphs,
graphs/ rewrites and caches them), the generation loop (``generate_codes`` over
``plan_windows``, one ``generate_window`` each, ``StepCounter`` for progress), and the
EnCodec decode (``decode_audio``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from lofid import dependencies, variants
from lofid.errors import (
    INVALID_DURATION,
    INVALID_PARAMS,
    MODEL_INFERENCE_FAILED,
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    LofiError,
)
from lofid.variants import CONFIG, TOKENIZER
from lofid.worker import delay, sessions
from lofid.worker.decoder import Decoder, present_name
from lofid.worker.device import INSTALL_HINT, PROVIDER, DeviceChoice, resolve_threads, select
from lofid.worker.graphs import cache, kvquant
from lofid.worker.model_config import ModelConfig
from lofid.worker.pacing import Pace
from lofid.worker.sampling import SamplingParams, guide, sample
from lofid.worker.sessions import REPAIR
from lofid.worker.spans import SpanDecoder
from lofid.worker.stream import AudioStream, OnChunk, StepHook

Progress = Callable[[int, int], None]
log = logging.getLogger("lofid.worker.musicgen")

WINDOW_SEC = 30.0    # MusicGen was trained on 30 s
STRIDE_SEC = 18.0    # audiocraft's extend_stride: the next window keeps the last 12 s
MIN_DECODE_FRAMES = 8


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


class StepCounter:
    """Steps done across windows, reported as ``progress(done, estimated)``."""

    def __init__(self, estimated: int, progress: Progress | None) -> None:
        self.done, self.estimated, self.progress = 0, estimated, progress

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.estimated)


class MusicGen:
    """A loaded MusicGen variant. Build with ``MusicGen.load``; call ``generate``."""

    def __init__(self, *, root: Path, variant: str, config: ModelConfig,
                 tokenizer: Tokenizer,
                 text_encoder: ort.InferenceSession | Callable[[], ort.InferenceSession],
                 decoder: Decoder,
                 encodec: ort.InferenceSession | Callable[[], ort.InferenceSession], device: str,
                 threads: int, load_time_sec: float) -> None:
        self.root, self.variant, self.config = root, variant, config
        self.tokenizer = tokenizer
        # the text encoder: a resident session, or (CPU) a function that maps the cached
        # graph for the one run a request needs, so it holds no memory in between
        self.text_encoder = text_encoder if isinstance(text_encoder,
                                                       ort.InferenceSession) else None
        self._open_text_encoder = None if self.text_encoder is not None else text_encoder
        self.decoder = decoder
        # EnCodec likewise (CPU): mapped for a request's decode_audio only, so its weights
        # are not held beside the KV cache while the decoder runs
        self.encodec = encodec if isinstance(encodec, ort.InferenceSession) else None
        self._open_encodec = None if self.encodec is not None else encodec
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
        self._pace: Pace | None = None   # what the last request measured, for the next stream

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, root: Path | str, variant: str, *, device: str = "auto",
             threads: int | None = None, decoder_form: str | None = None,
             share_kv: bool = True) -> MusicGen:
        """Open ``variant`` (fp32 / fp16 / int8 / int4) from a folder in the hub layout.

        ``decoder_form`` overrides the variant's decoder files ("merged" or "split").
        ``share_kv`` (CPU only) runs the with-past decoder rewritten by
        ``graphs.kvshare.share_kv_graph`` (cached under ``graphs.cache.optimized_dir()``);
        False runs the files as exported.

        Raises LofiError MODEL_NOT_FOUND (files missing, named in ``missing``) or
        MODEL_LOAD_FAILED (unreadable/corrupt files, unavailable device).
        """
        start = time.perf_counter()
        dependencies.require("onnxruntime", "onnx", "numpy", "tokenizers")
        if conflict := dependencies.onnxruntime_conflict():
            log.warning("%s", conflict)
        root = Path(root)
        freed = cache.prune_optimized()
        if freed:
            log.info("removed %.0f MB of cached graphs whose model files are gone", freed / 1e6)
        spec = variants.file_roles(variant, decoder_form)
        files = [CONFIG, TOKENIZER, *spec.values()]
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise LofiError(MODEL_NOT_FOUND, f"model files missing under {root}: "
                            f"{', '.join(missing)}", missing=missing, variant=variant,
                            root=str(root))
        if variants.get(variant).cpu_only:   # auto means the CPU, a GPU is refused
            if (device or "auto").lower() not in ("auto", "cpu"):
                raise LofiError(MODEL_LOAD_FAILED, f"the {variant} variant runs on the CPU "
                                f"only; use fp16 on {device}, or --device cpu",
                                variant=variant, device=device)
            device = "cpu"
        choice = select(device, ort.get_available_providers())
        n_threads = resolve_threads(threads)
        config = ModelConfig.from_file(root / CONFIG)
        tokenizer = sessions.open_tokenizer(root, TOKENIZER)
        opened, calibrate = _open_sessions(root, variant, spec, choice, n_threads, config,
                                           share_kv)
        device_used = _device_used(opened["decoder"], device, choice)
        engine = cls(root=root, variant=variant, config=config, tokenizer=tokenizer,
                     text_encoder=opened["text_encoder"],
                     decoder=_checked_decoder(root, variant, opened, config),
                     encodec=opened["encodec"], device=device_used, threads=n_threads,
                     load_time_sec=0.0)
        # only the engine holds the sessions now: its float-cache decoder can be freed
        # before the int8-cache rewrite comes in
        del opened
        if calibrate and engine.decoder.shared:
            engine._quantize_kv_cache(spec["decoder"], variants.get(variant).nbits,
                                      choice.session_providers)
        engine.load_time_sec = time.perf_counter() - start
        return engine

    @classmethod
    def needs_preparing(cls, root: Path | str, variant: str, *, device: str = "auto",
                        threads: int | None = None) -> bool:
        """Whether loading ``variant`` here first makes and caches its rewritten decoder:
        the one-time preparation of a variant for this machine (bench/RESULTS.md)."""
        v = variants.get(variant)
        if select("cpu" if v.cpu_only else device, ort.get_available_providers()).device != "cpu":
            return False
        spec = variants.file_roles(variant)
        step = "decoder_with_past" if "decoder_with_past" in spec else "decoder"
        kind = cache.rewrite_kind(v.nbits, True, kv_int8=v.kv_int8 and step == "decoder")
        try:
            cached, _ = cache.cache_file(Path(root), spec[step], kind)
        except OSError:
            return True
        return not cached.is_file()

    def _quantize_kv_cache(self, rel: str, nbits: int | None, providers: list) -> None:
        """The first load of a ``kv_int8`` variant: calibrate the cache's scales on this
        engine (float cache, kvquant.py), then swap in ``rel`` rewritten onto an int8
        cache, which is cached: later loads open it directly, and the float-cache
        rewrite it supersedes is removed. Where that fails the float cache stays (logged)."""
        start = time.perf_counter()
        calibration = kvquant.Calibration()
        try:
            for prompt in kvquant.PROMPTS:
                self.calibration_run(prompt, calibration)
        except LofiError as e:
            log.warning("cannot calibrate the int8 KV cache (%s): keeping the float cache", e)
            return
        self.decoder = None   # its session: out of memory before the rewrite comes in
        sessions.release_heap()
        try:
            session = cache.rewritten_session(self.root, rel, self.threads, providers,
                                              self.config, nbits=nbits,
                                              kv_scales=calibration.scales())
        except LofiError as e:   # an nbits rewrite raises where the int8 cache fails
            log.warning("cannot rewrite %s onto an int8 KV cache (%s): keeping the float "
                        "cache", rel, e)
            session = None
        if session is None:   # logged above or by rewritten_session
            session = cache.rewritten_session(self.root, rel, self.threads, providers,
                                              self.config, nbits=nbits)
        else:
            cache.remove(self.root, rel, cache.rewrite_kind(nbits, True))
            log.info("%s: int8 KV cache calibrated in %.1f s", rel, time.perf_counter() - start)
        self.decoder = Decoder(session, session, self.config)

    def calibration_run(self, prompt: str, calibration: kvquant.Calibration) -> None:
        """One window of ``kvquant.FRAMES`` frames of ``prompt``, sampled as a request is;
        then every layer's decoder keys/values go to ``calibration``."""
        k, frames = self.num_codebooks, min(kvquant.FRAMES, self.window_frames)
        hidden, mask = self.encode_text(prompt)
        counter = StepCounter(delay.generated_positions(frames, k), None)
        dec = self.decoder
        try:
            self.generate_window(hidden, mask, np.zeros((k, 0), np.int64), frames,
                                 SamplingParams(250, 1.0, 3.0),
                                 np.random.default_rng(kvquant.SEED), counter)
            for name in dec.dec_names:
                calibration.observe(present_name(name), dec.cache[name].numpy()[:, :, :dec.length])
        finally:
            dec.release()

    # ------------------------------------------------------------- generation
    def frames_for(self, duration_sec: float) -> int:
        return round(duration_sec * self.frame_rate)

    def generate(self, prompt: str, duration_sec: float, seed: int, *, top_k: int = 250,
                 temperature: float = 1.0, guidance_scale: float = 3.0,
                 progress: Progress | None = None, on_chunk: OnChunk | None = None) -> np.ndarray:
        """float32 mono audio in [-1, 1]: exactly ``round(duration_sec * frame_rate)``
        frames of ``hop_length`` samples. ``progress(tokens_generated, tokens_estimated)``
        is called after every decoder step, across all windows; ``on_chunk`` gets each
        span of final audio as soon as it is decoded (stream.py): the returned audio is
        exactly those chunks joined.

        A request ends here, so the memory it freed goes back to the OS here
        (``sessions.release_heap``): the KV buffers came partly from the heap, and a
        worker that rewrote the decoder on its first load would keep them between
        requests."""
        frames = self.frames_for(duration_sec)
        if frames < 1:
            raise LofiError(INVALID_DURATION, "duration is shorter than one frame")
        encodec = [self.encodec or self._open_encodec()]   # opened before the clock starts
        stream = AudioStream(frames, self.hop_length, self.sample_rate, self.num_codebooks,
                             plan_windows(frames, self.window_frames, self.stride_frames),
                             lambda codes: self.encodec_run(codes, encodec[0]), on_chunk,
                             pace=self._pace)
        try:
            codes = self.generate_codes(prompt, frames, seed, top_k=top_k, temperature=temperature,
                                        guidance_scale=guidance_scale, progress=progress, stream=stream)
            audio = stream.finish(codes)
            self._pace = stream.pacer.learned()
            return audio
        finally:
            encodec.clear()   # a mapped session is closed before the heap is trimmed
            sessions.release_heap()

    def generate_codes(self, prompt: str, frames: int, seed: int, *, top_k: int = 250,
                       temperature: float = 1.0, guidance_scale: float = 3.0,
                       progress: Progress | None = None, stream: AudioStream | None = None) -> np.ndarray:
        """The audio codes ``[K, frames]`` for ``prompt`` (windowed past one window);
        ``stream`` hears of every step and every frame as it completes."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise LofiError(INVALID_PARAMS, "prompt must be a non-empty string")
        if frames < 1:
            raise LofiError(INVALID_DURATION, "duration is shorter than one frame")
        try:
            params = SamplingParams(top_k, temperature, guidance_scale)
            rng = np.random.default_rng(seed)
        except (ValueError, TypeError) as e:
            raise LofiError(INVALID_PARAMS, str(e)) from e
        hidden, mask = self.encode_text(prompt)
        k = self.num_codebooks
        plans = plan_windows(frames, self.window_frames, self.stride_frames)
        estimated = sum(delay.generated_positions(n, k) - p for _, p, n in plans)
        counter = StepCounter(estimated, progress)
        codes = np.full((k, frames), delay.UNKNOWN, dtype=np.int64)      # [K, T]
        try:
            for index, (offset, primed, length) in enumerate(plans):
                prime = codes[:, offset : offset + primed]
                heard = {} if stream is None else {"on_step": stream.window_hook(codes, index, offset)}
                window = self.generate_window(hidden, mask, prime, length, params, rng, counter, **heard)
                codes[:, offset + primed : offset + length] = window[:, primed:]
        finally:
            self.decoder.release()
        if (codes < 0).any() or counter.done != estimated:
            raise LofiError(MODEL_INFERENCE_FAILED, "generation left frames unfilled")
        return codes

    def encode_text(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """-> CFG batch: hidden ``[2, L, D]`` (row 1 zeros), mask ``[2, L]`` (row 1 zeros)."""
        ids = np.array([self.tokenizer.encode(prompt).ids], dtype=np.int64)   # [1, L]
        ones = np.ones_like(ids)
        encoder = self.text_encoder or self._open_text_encoder()
        (hidden,) = sessions.run(encoder, ["last_hidden_state"],
                                 {"input_ids": ids, "attention_mask": ones})
        del encoder
        hidden = hidden.astype(self.decoder.dtype, copy=False)
        hidden = np.concatenate([hidden, np.zeros_like(hidden)])
        mask = np.concatenate([ones, np.zeros_like(ones)])
        return hidden, mask

    def generate_window(self, hidden, mask, prime, frames, params, rng, counter: StepCounter,
                        on_step: StepHook | None = None) -> np.ndarray:
        """Decode one window of ``frames`` frames whose first ``prime`` frames are known.
        ``on_step(position, frame, column)`` after each step: ``frame`` is the window's
        frame that this step completed (its codes ``column`` ``[K]``), or None."""
        seq = delay.build_template(prime, frames, self.config.pad_token_id)   # [K, T+K]
        total, k, primed = seq.shape[1], self.num_codebooks, prime.shape[1]
        rows = np.arange(k)
        start = delay.prefill_length(seq)
        logits = self.decoder.begin(np.concatenate([seq[:, :start]] * 2), hidden, mask, total)
        for t in range(start, total):
            if not np.isfinite(logits).all():
                raise LofiError(MODEL_INFERENCE_FAILED,
                                f"the decoder produced NaN/inf logits at step {t}")
            unknown = seq[:, t] == delay.UNKNOWN
            if unknown.any():
                token = sample(guide(logits, params.guidance_scale), params, rng)
                seq[unknown, t] = token[unknown]
            counter.tick()
            if on_step is not None:
                frame = t - k      # every codebook of this frame is known now
                if primed <= frame < frames:
                    on_step(t, frame, seq[rows, 1 + rows + frame])
                else:
                    on_step(t, None, None)
            if t + 1 < total:
                logits = self.decoder.step(np.concatenate([seq[:, t : t + 1]] * 2))
        return delay.undo(seq)

    # ------------------------------------------------------------ EnCodec decode
    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        """``[K, T]`` complete codes -> float32 mono ``[T * hop]`` through EnCodec, span
        by span exactly as ``generate`` decodes them (spans.py)."""
        encodec = [self.encodec or self._open_encodec()]
        try:
            spans = SpanDecoder(codes.shape[-1], self.hop_length, lambda c: self.encodec_run(c, encodec[0]))
            return spans.finish(codes)
        finally:
            encodec.clear()   # a mapped session is closed before the heap is trimmed
            sessions.release_heap()

    def encodec_run(self, codes: np.ndarray, encodec: ort.InferenceSession) -> np.ndarray:
        """One EnCodec run: ``[K, T]`` codes -> ``[T * hop]`` samples. Its reflect padding
        needs a few frames: a shorter sequence is extended by repeating its last frame,
        and the extra samples are cut off."""
        short = MIN_DECODE_FRAMES - codes.shape[-1]
        padded = np.pad(codes, ((0, 0), (0, short)), mode="edge") if short > 0 else codes
        (audio,) = sessions.run(encodec, ["audio_values"], {"audio_codes": padded[None, None]},
                                sessions.SHRINK_ARENA)
        audio = audio.astype(np.float32).reshape(-1)
        if not np.isfinite(audio).all():
            raise LofiError(MODEL_INFERENCE_FAILED, "EnCodec produced NaN/inf samples")
        expected = codes.shape[-1] * self.hop_length
        if audio.shape[0] < expected:
            raise LofiError(MODEL_INFERENCE_FAILED, f"EnCodec returned {audio.shape[0]} "
                            f"samples for {codes.shape[-1]} frames ({expected} expected)")
        return np.clip(audio[:expected], -1.0, 1.0)


# ------------------------------------------------------------------ load steps
def _open_sessions(root: Path, variant: str, spec: dict[str, str], choice: DeviceChoice,
                   threads: int, config: ModelConfig, share_kv: bool) -> tuple[dict, bool]:
    """Open every role's graph of ``spec`` (variants.file_roles) the way this variant and
    device run it. -> (role -> session, or for a mapped graph a function opening it;
    whether the int8 KV cache still has to be calibrated)."""
    v = variants.get(variant)
    providers = choice.session_providers
    opened: dict = {}
    kv_int8 = (v.kv_int8 and share_kv and choice.device == "cpu"
               and "decoder_with_past" not in spec)
    calibrate = False
    step_role = "decoder_with_past" if "decoder_with_past" in spec else "decoder"
    # The decoder first: its load has the largest transient (the file read while
    # the weights are packed), best passed while nothing else is in memory.
    for role in sorted(spec, key=lambda r: not r.startswith("decoder")):
        rel = spec[role]
        if role == step_role and (share_kv or v.nbits) and choice.device == "cpu":
            if kv_int8:   # calibrated before: the int8-cache graph is cached
                opened[role] = cache.cached_session(
                    root, rel, cache.rewrite_kind(v.nbits, share_kv, kv_int8=True),
                    sessions.options("decoder", threads), providers)
                calibrate = opened[role] is None
            if opened.get(role) is None:
                opened[role] = cache.rewritten_session(root, rel, threads, providers, config,
                                                       share_kv=share_kv, nbits=v.nbits)
        if role == "encodec" and v.upcast_encodec:
            opened[role] = sessions.upcast_session(root, rel, sessions.options(role, threads),
                                                   providers)
        elif role in ("text_encoder", "encodec") and choice.device == "cpu":
            opened[role] = cache.mapped_session(root, rel, sessions.options(role, threads),
                                                providers)
        if opened.get(role) is None:
            opened[role] = sessions.open_session(root, rel, sessions.options(role, threads),
                                                 providers)
    return opened, calibrate


def _device_used(first: ort.InferenceSession, device: str, choice: DeviceChoice) -> str:
    """The device the decoder really runs on. onnxruntime falls back to the CPU when a
    provider's libraries fail to load: fine for ``auto`` (logged), an error where the
    device was asked for."""
    used = first.get_providers()[0]
    device_used = next((d for d, p in PROVIDER.items() if p == used), "cpu")
    if (device or "auto").lower() == "auto" and device_used != choice.device:
        log.warning("onnxruntime could not start %s (%s): running on the CPU",
                    PROVIDER[choice.device], INSTALL_HINT.get(choice.device, ""))
    elif device_used != choice.device:
        raise LofiError(MODEL_LOAD_FAILED, f"onnxruntime could not start {used!r} for "
                        f"device {choice.device!r} (it fell back to {used}); "
                        f"{INSTALL_HINT.get(choice.device, '')}, or use --device cpu",
                        device=choice.device)
    return device_used


def _checked_decoder(root: Path, variant: str, opened: dict, config: ModelConfig) -> Decoder:
    """The decoder of the opened sessions, once the graphs are seen to be MusicGen's
    (a mapped EnCodec is opened once here to check it); MODEL_LOAD_FAILED otherwise."""
    try:
        first = opened["decoder"]
        decoder = Decoder(first, opened.get("decoder_with_past", first), config)
        encodec = opened["encodec"]
        if not isinstance(encodec, ort.InferenceSession):
            encodec = encodec()
        if "audio_codes" not in {i.name for i in encodec.get_inputs()}:
            raise ValueError("EnCodec graph has no audio_codes input")
        del encodec
    except (ValueError, KeyError) as e:
        raise LofiError(MODEL_LOAD_FAILED, f"unexpected model graph in {root}: {e}; "
                        f"{REPAIR}", variant=variant) from e
    return decoder
