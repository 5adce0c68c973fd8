"""Device name -> onnxruntime execution providers, and the thread settings.

``select`` is a pure function of the requested device and the providers onnxruntime
reports, so the choice is testable with any provider list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from lofid.errors import MODEL_LOAD_FAILED, LofiError

DEVICES = ("auto", "cpu", "cuda", "metal")
CPU = "CPUExecutionProvider"
PROVIDER = {"cuda": "CUDAExecutionProvider", "metal": "CoreMLExecutionProvider", "cpu": CPU}
AUTO_ORDER = ("cuda", "metal", "cpu")
INSTALL_HINT = {
    "cuda": "install the CUDA build of onnxruntime (`pip uninstall onnxruntime && "
            "pip install onnxruntime-gpu`) with a CUDA 12 runtime and cuDNN 9, and an "
            "NVIDIA driver",
    "metal": "use macOS on Apple silicon with the standard `onnxruntime` wheel, which "
             "ships the CoreML execution provider",
}


@dataclass(frozen=True)
class DeviceChoice:
    device: str               # cpu / cuda / metal
    providers: list[str]      # for InferenceSession, the CPU provider always last


def select(requested: str, available: Sequence[str]) -> DeviceChoice:
    """Pick the device for ``requested`` (auto/cpu/cuda/metal) from ``available`` providers.

    ``auto`` takes CUDA, then CoreML ("metal"), then the CPU. An explicit device whose
    provider is not available raises ``LofiError(MODEL_LOAD_FAILED)`` saying what to
    install; it never falls back silently.
    """
    requested = (requested or "auto").lower()
    if requested not in DEVICES:
        raise LofiError(MODEL_LOAD_FAILED, f"unknown device {requested!r}; "
                        f"choose one of {', '.join(DEVICES)}", device=requested)
    if requested == "auto":
        device = next(d for d in AUTO_ORDER if d == "cpu" or PROVIDER[d] in available)
    else:
        device = requested
        if device != "cpu" and PROVIDER[device] not in available:
            raise LofiError(
                MODEL_LOAD_FAILED,
                f"device {device!r} needs onnxruntime's {PROVIDER[device]}, which this "
                f"onnxruntime does not have (available: {', '.join(available) or 'none'}); "
                f"{INSTALL_HINT[device]}, or use --device cpu",
                device=device, available=list(available))
    providers = [PROVIDER[device]] if device != "cpu" else []
    return DeviceChoice(device=device, providers=[*providers, CPU])


def resolve_threads(threads: int | None) -> int:
    """Intra-op threads: the given count, or every CPU this process may run on."""
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def session_options(threads: int):
    """onnxruntime SessionOptions: ``threads`` intra-op threads, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3   # errors only; ORT warnings are noise for users
    return opts
