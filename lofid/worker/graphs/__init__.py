"""Load-time rewrites of the exported graphs, and the on-disk cache of their results.

rewrite.py   the decoder recipe: nbits.py, then kvshare.py (with kvquant.py's int8 cache)
nbits.py     the int8 decoder's MatMuls on 4-bit MatMulNBits blocks (the int4 variant)
kvshare.py   the self-attention on preallocated KV buffers (GroupQueryAttention)
kvquant.py   the int8 self-attention cache: calibrated per-channel scales
upcast.py    an fp16 graph upcast to fp32 (the fp16 variant's EnCodec)
cache.py     onnxruntime-optimized graphs cached on disk, staging, pruning
"""
