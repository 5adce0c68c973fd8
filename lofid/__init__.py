"""lofid: local AI music generation (MusicGen-small on ONNX Runtime) for your editor."""

__version__ = "0.1.0"
