"""The model variants: the one table of what each variant is made of.

Per variant: the hub folder of each of the engine's three graphs (text encoder, decoder,
EnCodec), the decoder's form, what lofid makes of the files on this machine (MatMuls on
``nbits``-bit blocks, an int8 self-attention cache), the label its ``model_version``
carries, its approximate download size and the memory it needs. From the table: the files a variant needs
from the hub, the file the engine opens for each role, and the default variant of a
device. Files are named relative to the hub repository ``REPO`` (the layout of
``gabotechs/music_gen``: CONTRACT.md "Model files").

No numpy or onnxruntime here: the broker, lofictl and the worker all import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lofid.devices import likely_auto_device
from lofid.errors import INVALID_PARAMS, LofiError

REPO = "gabotechs/music_gen"
REVISION = "main"
CONFIG = "small/config.json"
TOKENIZER = "small/tokenizer.json"
# int4's MatMuls: blocks of this many weights along K, each with a searched scale (nbits.py)
NBITS_BLOCK = 256
DECODER_FORMS = ("merged", "split")


@dataclass(frozen=True)
class Variant:
    name: str
    text_encoder: str      # hub folder of text_encoder.onnx
    decoder: str           # hub folder of the decoder graphs
    encodec: str           # hub folder of encodec_decode.onnx
    decoder_form: str      # "merged" (one graph, ``use_cache_branch``) or "split" (two)
    download_bytes: int    # about what the hub download weighs, for the consent question
    nbits: int | None = None   # made here: the decoder's MatMuls on nbits-bit blocks (nbits.py)
    kv_int8: bool = False      # made here: an int8 self-attention cache (kvquant.py)
    upcast_encodec: bool = False   # made here: its fp16 EnCodec runs upcast to fp32 (upcast.py)
    # the worker's peak resident memory for a 30 s track on the CPU, rounded up from
    # bench/RESULTS.md: what an out-of-memory load says it needs (memory.py)
    memory_mb: int | None = None

    @property
    def cpu_only(self) -> bool:
        """A variant made here of MatMulNBits blocks runs on onnxruntime's CPU provider."""
        return self.nbits is not None

    @property
    def label(self) -> str:
        """The variant as its ``model_version`` names it. A variant made on this machine is
        named by what it is made into: the same files rewritten another way make other
        audio, so other track ids."""
        if self.nbits is None:
            return self.name
        return f"int{self.nbits}b{NBITS_BLOCK}" + ("-kv8" if self.kv_int8 else "")


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32", "small_fp32", "small_fp32", "small_fp32", "merged", 2_250_000_000, memory_mb=3300),
    # the hub's small_fp16/ has no merged decoder
    Variant("fp16", "small_fp16", "small_fp16", "small_fp16", "split", 1_870_000_000,
            upcast_encodec=True, memory_mb=4500),
    # the fp32 text encoder and EnCodec, as MusicGPT's "small-quant" does
    Variant("int8", "small_fp32", "small_i8", "small_fp32", "merged", 1_000_000_000, memory_mb=1300),
    # the int8 files, made into 4-bit blocks with an int8 KV cache on the first load: the
    # speed-first variant
    Variant("int4", "small_fp32", "small_i8", "small_fp32", "merged", 1_000_000_000,
            nbits=4, kv_int8=True, memory_mb=1100),
)}
NAMES = tuple(VARIANTS)


def get(name: str) -> Variant:
    """The variant called ``name``; INVALID_PARAMS for any other name."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise LofiError(INVALID_PARAMS, f"unknown model variant {name!r}; choose one of "
                        f"{', '.join(NAMES)}", variant=str(name)) from None


def file_roles(name: str, decoder_form: str | None = None) -> dict[str, str]:
    """role -> hub path of each ONNX file the engine opens for variant ``name``:
    ``text_encoder``, ``decoder`` (and ``decoder_with_past`` for the split form),
    ``encodec``. ``decoder_form`` overrides the variant's own."""
    v = get(name)
    form = decoder_form or v.decoder_form
    if form not in DECODER_FORMS:
        raise LofiError(INVALID_PARAMS, f"decoder_form must be merged or split, not {form!r}")
    roles = {"text_encoder": f"{v.text_encoder}/text_encoder.onnx"}
    if form == "merged":
        roles["decoder"] = f"{v.decoder}/decoder_model_merged.onnx"
    else:
        roles["decoder"] = f"{v.decoder}/decoder_model.onnx"
        roles["decoder_with_past"] = f"{v.decoder}/decoder_with_past_model.onnx"
    roles["encodec"] = f"{v.encodec}/encodec_decode.onnx"
    return roles


def hub_files(name: str) -> list[str]:
    """The hub paths of every file variant ``name`` needs: config and tokenizer, then
    the graphs of its own decoder folder, then those it takes from other folders. The
    order is part of a ``--model-dir``'s version (its hash runs over the files in this
    order), so it must not change."""
    graphs = list(file_roles(name).values())
    own = get(name).decoder + "/"
    return [CONFIG, TOKENIZER, *sorted(graphs, key=lambda path: not path.startswith(own))]


def default_variant(device: str) -> str:
    """int8 on the CPU, fp16 on a GPU (bench/RESULTS.md "CPU default variant": onnxruntime
    has no fp16 CPU kernels, and its CUDA provider runs int8's quantized MatMuls on the
    CPU). ``auto`` takes the variant of the device it will most likely resolve to."""
    if device == "auto":
        device = likely_auto_device()
    return "fp16" if device in ("cuda", "metal") else "int8"
