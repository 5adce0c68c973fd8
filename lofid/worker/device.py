"""Device name -> onnxruntime execution providers, and the thread settings.

``select`` is a pure function of the requested device and the providers onnxruntime
reports, so the choice is testable with any provider list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from lofid.dependencies import GPU_FIX
from lofid.devices import DEVICES
from lofid.errors import MODEL_LOAD_FAILED, LofiError

CPU = "CPUExecutionProvider"
PROVIDER = {"cuda": "CUDAExecutionProvider", "metal": "CoreMLExecutionProvider", "cpu": CPU}
AUTO_ORDER = ("cuda", "metal", "cpu")
INSTALL_HINT = {
    "cuda": f"install the CUDA build of onnxruntime in place of the CPU one (`{GPU_FIX}`) "
            "with a CUDA 12 runtime and cuDNN 9, and an NVIDIA driver",
    "metal": "use macOS on Apple silicon with the standard `onnxruntime` wheel, which "
             "ships the CoreML execution provider",
}


# fp32 means fp32 on a GPU too: TF32 matmuls (onnxruntime's CUDA default) moved the tiny
# model's audio by 4.5e-4 and its greedy codes from frame 44 on an H200 (bench/RESULTS.md).
PROVIDER_OPTIONS = {"cuda": {"use_tf32": "0"}}


@dataclass(frozen=True)
class DeviceChoice:
    device: str               # cpu / cuda / metal
    providers: list[str]      # for InferenceSession, the CPU provider always last

    @property
    def session_providers(self) -> list:
        """``providers`` with their options, as InferenceSession takes them."""
        options = PROVIDER_OPTIONS.get(self.device)
        first = (self.providers[0], options) if options else self.providers[0]
        return [first, *self.providers[1:]]


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
    # same seed, same audio on a GPU too: deterministic kernels and cuDNN algorithms
    # (without it an H200 gave two different fp16 tracks for one seed)
    opts.use_deterministic_compute = True
    return opts
