#!/usr/bin/env python3
"""Build the tiny random MusicGen test model in the hub layout, plus reference outputs.

Writes ``tests/fixtures/music_gen/`` exactly as ``gabotechs/music_gen`` lays out its
files (small/config.json, small/tokenizer.json, small_fp32/, small_fp16/, small_i8/) and
``tests/fixtures/reference/`` with transformers' greedy outputs (codes and audio) that the
engine tests compare against. Tooling only: needs torch, transformers, optimum,
optimum-onnx and onnx (tools/requirements.txt); the tests and the daemon never do.

The model is random but seeded, and its dimensions are deliberately unlike
musicgen-small's (2 layers, 2 heads, hidden 16, T5 d_model 24,
EnCodec hidden 8) so nothing hard-coded in
the engine survives. What stays real: vocab 2048 with pad/start token 2048, 4 codebooks,
32 kHz audio with a hop of 640 samples (frame rate 50), 2048 positions.

Usage:  python tools/make_test_model.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16
from optimum.exporters.onnx import main_export
from optimum.onnx import merge_decoders
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import (
    EncodecConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    T5Config,
)

SEED = 1234
GUIDANCE = 3.0
# (name, prompt, frames): frames of 640 samples at 50 Hz, i.e. 0.4 s, 1 s and 2 s.
REFERENCE_CASES = [
    ("lofi_20", "lofi hip hop beat with soft piano", 20),
    ("rain_50", "rainy night jazz, slow drums and warm bass", 50),
    ("chip_100", "8-bit chiptune melody", 100),
]
WORDS = [
    "lofi", "hip", "hop", "beat", "with", "soft", "piano", "rainy", "night", "jazz", "slow",
    "drums", "and", "warm", "bass", "chill", "ambient", "synth", "guitar", "melody", "chiptune",
    "8-bit", "calm", "relaxing", "study", "music", "vinyl", "crackle", "a", "the", "of", "in",
    "for", "to", "on", "slow", "fast", "upbeat", "dreamy", "mellow", "electronic", "acoustic",
]


def build_tokenizer() -> Tokenizer:
    """A tiny T5-like Unigram tokenizer: pad 0, </s> 1, <unk> 2, '</s>' appended."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in vocab}
    for i, w in enumerate(dict.fromkeys(WORDS)):
        piece = "\u2581" + w
        if piece not in seen:
            vocab.append((piece, -2.0 - 0.01 * i))
            seen.add(piece)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789-,.!?'") | {"\u2581"})
    for c in chars:
        for piece in (c, "\u2581" + c):
            if piece not in seen:
                vocab.append((piece, -8.0))
                seen.add(piece)
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(" {2,}", " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tok


def build_model(text_vocab: int) -> MusicgenForConditionalGeneration:
    text = T5Config(
        vocab_size=text_vocab, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    audio = EncodecConfig(
        target_bandwidths=[2.2], sampling_rate=32000, audio_channels=1, normalize=False,
        chunk_length_s=None, overlap=None, hidden_size=8, num_filters=4,
        num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], codebook_size=2048,
        codebook_dim=8, num_lstm_layers=1, kernel_size=7, last_kernel_size=7,
        residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False,
        pad_mode="reflect", compress=2, trim_right_ratio=1.0,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=2, ffn_dim=48,
        num_attention_heads=2, hidden_size=16, num_codebooks=4, audio_channels=1,
        pad_token_id=2048, bos_token_id=2048, dropout=0.0, scale_embedding=False,
    )
    config = MusicgenConfig.from_sub_models_config(text, audio, decoder)
    torch.manual_seed(SEED)
    model = MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        # EnCodec codebooks start at zero, which would make the audio independent of
        # the codes: give them real values. Scale the decoder's weights up so greedy
        # codes vary instead of collapsing onto one token, and its cross-attention up so
        # the text (and so classifier-free guidance) clearly changes the logits.
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_(0.0, 1.0)
        for head in model.decoder.lm_heads:
            head.weight.normal_(0.0, 0.5)
        for emb in model.decoder.model.decoder.embed_tokens:
            emb.weight.normal_(0.0, 1.0)
        for layer in model.decoder.model.decoder.layers:
            attn = layer.encoder_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                proj.weight.normal_(0.0, 0.5)
        model.enc_to_dec_proj.weight.normal_(0.0, 0.5)
    gen = model.generation_config
    gen.guidance_scale = GUIDANCE
    gen.top_k = 250
    gen.do_sample = True
    gen.max_length = 1500
    return model


def fp16(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    # ReduceL2 (EnCodec's weight norm) has no fp16 CPU kernel: keep it in fp32.
    model = convert_float_to_float16(model, keep_io_types=False, op_block_list=["ReduceL2"])
    onnx.save(model, str(dst))


def export(model: MusicgenForConditionalGeneration, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "hf")
        main_export(str(tmp / "hf"), output=str(tmp / "onnx"), task="text-to-audio",
                    device="cpu", do_validation=False)
        onnx_dir = tmp / "onnx"
        fp32, f16, i8 = out / "small_fp32", out / "small_fp16", out / "small_i8"
        for d in (fp32, f16, i8):
            d.mkdir(parents=True, exist_ok=True)
        for name in ("text_encoder", "decoder_model", "decoder_with_past_model",
                     "encodec_decode"):
            shutil.copyfile(onnx_dir / f"{name}.onnx", fp32 / f"{name}.onnx")
            fp16(onnx_dir / f"{name}.onnx", f16 / f"{name}.onnx")
        merge_decoders(fp32 / "decoder_model.onnx", fp32 / "decoder_with_past_model.onnx",
                       save_path=fp32 / "decoder_model_merged.onnx", strict=False)
        for name in ("decoder_model", "decoder_with_past_model"):
            quantize_dynamic(fp32 / f"{name}.onnx", i8 / f"{name}.onnx",
                             weight_type=QuantType.QInt8)
        merge_decoders(i8 / "decoder_model.onnx", i8 / "decoder_with_past_model.onnx",
                       save_path=i8 / "decoder_model_merged.onnx", strict=False)


def references(model, tok: Tokenizer, ref_dir: Path) -> None:
    ref_dir.mkdir(parents=True, exist_ok=True)
    captured = {}
    decode = model.audio_encoder.decode

    def capture(codes, *args, **kwargs):
        captured["codes"] = codes.clone()
        return decode(codes, *args, **kwargs)

    model.audio_encoder.decode = capture
    index = []
    for name, prompt, frames in REFERENCE_CASES:
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            audio = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                guidance_scale=GUIDANCE, max_new_tokens=frames + 3,
            )
        codes = captured["codes"][0].numpy().astype(np.int64)   # [B, K, T]
        audio = audio.numpy().astype(np.float32)                 # [B, 1, T*hop]
        assert codes.shape[-1] == frames, codes.shape
        np.savez_compressed(ref_dir / f"{name}.npz", codes=codes, audio=audio,
                            input_ids=ids.numpy())
        index.append({"name": name, "file": f"{name}.npz", "prompt": prompt,
                      "frames": frames, "guidance_scale": GUIDANCE, "do_sample": False,
                      "max_new_tokens": frames + 3, "codes_shape": list(codes.shape),
                      "audio_shape": list(audio.shape)})
    model.audio_encoder.decode = decode
    (ref_dir / "references.json").write_text(json.dumps({
        "source": "transformers MusicgenForConditionalGeneration.generate (greedy)",
        "seed": SEED, "cases": index}, indent=2) + "\n")


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        # optimum's merge_decoders names shared weights in set order, which follows the
        # string hash seed: pin it so two runs write byte-identical files.
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                    / "tests" / "fixtures")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model_dir = args.out / "music_gen"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "small").mkdir(parents=True)
    tok = build_tokenizer()
    tok.save(str(model_dir / "small" / "tokenizer.json"))
    model = build_model(tok.get_vocab_size())
    model.config.to_json_file(str(model_dir / "small" / "config.json"), use_diff=False)
    export(model, model_dir)
    references(model, tok, args.out / "reference")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
