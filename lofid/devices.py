"""Device names, and the broker's guess of what ``auto`` resolves to.

No onnxruntime here (the broker imports it to pick the default variant); the worker's
worker/device.py maps the names onto onnxruntime's execution providers.
"""

from __future__ import annotations

import os
import sys

DEVICES = ("auto", "cpu", "cuda", "metal")


def likely_auto_device() -> str:
    """What the worker's ``select("auto", ...)`` will pick on this machine, told without
    importing onnxruntime: ``cuda`` where the onnxruntime-gpu build is installed, ``metal``
    on Apple silicon (the standard macOS wheel has CoreML), else ``cpu``. Where the guess
    is wrong (a GPU build with no usable CUDA), the worker runs the guessed variant on
    the CPU.

    It looks for the distribution's metadata folder on ``sys.path`` itself: importing
    importlib.metadata would cost the broker more memory than the guess is worth."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:   # a zip file, a missing folder
            continue
        if any(n.lower().startswith("onnxruntime_gpu-") and n.endswith((".dist-info", ".egg-info"))
               for n in names):
            return "cuda"
    if sys.platform == "darwin" and os.uname().machine == "arm64":
        return "metal"
    return "cpu"
