"""Device names, and the broker's guess of what ``auto`` resolves to.

No onnxruntime here (the broker imports it to pick the default variant); the worker's
worker/device.py maps the names onto onnxruntime's execution providers.
"""

from __future__ import annotations

import os
import sys

from lofid import dependencies

DEVICES = ("auto", "cpu", "cuda", "metal")


def likely_auto_device() -> str:
    """What the worker's ``select("auto", ...)`` will pick on this machine, told without
    importing onnxruntime: ``cuda`` where the onnxruntime-gpu build is installed
    (``dependencies.installed``), ``metal`` on Apple silicon (the standard macOS wheel has
    CoreML), else ``cpu``. Where the guess is wrong (a GPU build with no usable CUDA),
    the worker runs the guessed variant on the CPU."""
    if dependencies.installed(("onnxruntime-gpu",)):
        return "cuda"
    if sys.platform == "darwin" and os.uname().machine == "arm64":
        return "metal"
    return "cpu"
