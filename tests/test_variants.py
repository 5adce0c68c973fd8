"""lofid/variants.py, the one variant table, and the engine it feeds: the files a
variant downloads are the files the engine opens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lofid import variants
from lofid.errors import INVALID_PARAMS, MODEL_NOT_FOUND, LofiError

MODEL = Path(__file__).resolve().parent / "fixtures" / "music_gen"


def test_variant_files():
    assert variants.NAMES == ("fp32", "fp16", "int8", "int4")
    assert variants.hub_files("int4") == variants.hub_files("int8")   # made from int8
    for v in variants.NAMES:
        files = variants.hub_files(v)
        assert files[:2] == ["small/config.json", "small/tokenizer.json"]
    assert "small_fp16/decoder_with_past_model.onnx" in variants.hub_files("fp16")
    assert variants.hub_files("int8")[2:] == [
        "small_i8/decoder_model_merged.onnx",
        "small_fp32/text_encoder.onnx",
        "small_fp32/encodec_decode.onnx",
    ]
    with pytest.raises(LofiError) as ei:
        variants.hub_files("fp64")
    assert ei.value.code == INVALID_PARAMS


def test_labels_and_what_is_made_here():
    """A variant made on this machine is named by what it is made into (its model_version,
    so its track ids), and only a variant of MatMulNBits blocks is CPU-only."""
    assert [variants.get(v).label for v in variants.NAMES] == ["fp32", "fp16", "int8", "int4b256-kv8"]
    assert [v for v in variants.NAMES if variants.get(v).cpu_only] == ["int4"]
    assert variants.file_roles("int8", "split") == {
        "text_encoder": "small_fp32/text_encoder.onnx",
        "decoder": "small_i8/decoder_model.onnx",
        "decoder_with_past": "small_i8/decoder_with_past_model.onnx",
        "encodec": "small_fp32/encodec_decode.onnx"}
    with pytest.raises(LofiError) as ei:
        variants.file_roles("fp32", "stacked")
    assert ei.value.code == INVALID_PARAMS


def test_hub_files_are_the_graphs_the_engine_opens():
    """For every variant the download list is the config, the tokenizer and exactly the
    graphs the engine opens for the variant's own decoder form, each once."""
    for v in variants.NAMES:
        files = variants.hub_files(v)
        assert len(files) == len(set(files))
        assert set(files) == {variants.CONFIG, variants.TOKENIZER, *variants.file_roles(v).values()}


@pytest.mark.parametrize("variant", variants.NAMES)
def test_the_engine_loads_from_exactly_the_hub_files(variant, tmp_path, monkeypatch):
    """A folder holding only the variant's hub files (copied from the tiny model) loads,
    and without any one of them the engine names that file in MODEL_NOT_FOUND."""
    from lofid.worker.musicgen import MusicGen

    monkeypatch.setenv("LOFID_OPTIMIZED_DIR", str(tmp_path / "optimized"))
    root = tmp_path / "model"
    for f in variants.hub_files(variant):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODEL / f, root / f)
    assert MusicGen.load(root, variant, threads=1).variant == variant
    for f in variants.hub_files(variant):
        aside = (root / f).rename(tmp_path / "aside")
        with pytest.raises(LofiError) as ei:
            MusicGen.load(root, variant, threads=1)
        assert ei.value.code == MODEL_NOT_FOUND and ei.value.data["missing"] == [f]
        aside.rename(root / f)
