#!/usr/bin/env python3
"""Build a FULL-SIZE random-weight musicgen-small in the hub layout (for benchmarks).

Same export path as tools/make_test_model.py (whose helpers it reuses), but with the real
dimensions: decoder 24 layers, 16 heads, hidden 1024, ffn 4096, 4 codebooks, vocab 2048;
a T5-base text encoder (d_model 768, 12 layers, vocab 32128); the 32 kHz EnCodec of
facebook/encodec_32khz. Weights are random (seeded): speed and memory are those of the
real model, the music is not. The tokenizer is the tiny test model's T5-like tokenizer
(its ids all fall inside the 32128-entry vocabulary).

Writes (a few GB, never committed):
  OUT/music_gen/small/{config.json,tokenizer.json}
  OUT/music_gen/small_fp32/  merged + split decoder, text encoder, EnCodec
  OUT/music_gen/small_fp16/  split decoder, text encoder, EnCodec
  OUT/music_gen/small_i8/    quantize_dynamic of the split pair, then merged
  OUT/hf/                    the transformers checkpoint (for the PyTorch baseline)

Needs ~12 GB of RAM and a few minutes. Usage:
  /tmp/toolsvenv/bin/python tools/make_full_model.py [--out /tmp/lofid-full]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import (
    EncodecConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    T5Config,
)


def build_model(seed: int, guidance: float) -> MusicgenForConditionalGeneration:
    """The random full-size model (also built on the GPU machine by bench/gpu_check.py,
    which has torch and transformers but not optimum)."""
    text = T5Config(  # t5-base
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    audio = EncodecConfig(  # facebook/encodec_32khz
        target_bandwidths=[2.2], sampling_rate=32000, audio_channels=1, normalize=False,
        chunk_length_s=None, overlap=None, hidden_size=128, num_filters=64,
        num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], codebook_size=2048,
        codebook_dim=128, num_lstm_layers=2, kernel_size=7, last_kernel_size=7,
        residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False,
        pad_mode="reflect", compress=2, trim_right_ratio=1.0, norm_type="weight_norm",
    )
    decoder = MusicgenDecoderConfig(  # musicgen-small
        vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=24, ffn_dim=4096,
        num_attention_heads=16, hidden_size=1024, num_codebooks=4, audio_channels=1,
        pad_token_id=2048, bos_token_id=2048, dropout=0.0, scale_embedding=False,
        activation_function="gelu",
    )
    # the constructor form works on transformers 4.x and 5.x (5.x dropped from_sub_models_config)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                            decoder=decoder.to_dict())
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers zero-initialises EnCodec's codebooks: give them values so the
        # audio depends on the codes.
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_(0.0, 1.0)
    gen = model.generation_config
    gen.guidance_scale = guidance
    gen.top_k = 250
    gen.do_sample = True
    gen.max_length = 1500
    return model


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/lofid-full"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_test_model import GUIDANCE, SEED, build_tokenizer, export

    t0 = time.time()
    model_dir = args.out / "music_gen"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "small").mkdir(parents=True)
    tok = build_tokenizer()
    tok.save(str(model_dir / "small" / "tokenizer.json"))
    model = build_model(SEED, GUIDANCE)
    n = sum(p.numel() for p in model.decoder.parameters())
    print(f"decoder parameters: {n / 1e6:.1f} M", flush=True)
    model.config.to_json_file(str(model_dir / "small" / "config.json"), use_diff=False)
    model.save_pretrained(args.out / "hf")
    tok.save(str(args.out / "hf" / "tokenizer.json"))
    export(model, model_dir)
    for p in sorted(model_dir.rglob("*.onnx*")):
        print(f"{p.relative_to(model_dir)}  {p.stat().st_size / 1e6:.0f} MB")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
