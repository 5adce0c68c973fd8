"""Device selection as a pure function of the available providers, plus this machine."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from lofid import errors
from lofid.errors import LofiError
from lofid.worker import device
from lofid.worker.device import select

CPU, CUDA, COREML = "CPUExecutionProvider", "CUDAExecutionProvider", "CoreMLExecutionProvider"
TRT = "TensorrtExecutionProvider"


@pytest.mark.parametrize("available, expected", [
    ([CPU], ("cpu", [CPU])),
    ([CUDA, CPU], ("cuda", [CUDA, CPU])),
    ([TRT, CUDA, CPU], ("cuda", [CUDA, CPU])),
    ([COREML, CPU], ("metal", [COREML, CPU])),
    ([COREML, CUDA, CPU], ("cuda", [CUDA, CPU])),
    (["AzureExecutionProvider", CPU], ("cpu", [CPU])),
    ([], ("cpu", [CPU])),
])
def test_auto_prefers_cuda_then_metal_then_cpu(available, expected):
    choice = select("auto", available)
    assert (choice.device, choice.providers) == expected


@pytest.mark.parametrize("requested, available, expected", [
    ("cpu", [CUDA, CPU], ("cpu", [CPU])),
    ("cuda", [CUDA, CPU], ("cuda", [CUDA, CPU])),
    ("metal", [COREML, CPU], ("metal", [COREML, CPU])),
    ("CUDA", [CUDA, CPU], ("cuda", [CUDA, CPU])),
])
def test_explicit_device(requested, available, expected):
    choice = select(requested, available)
    assert (choice.device, choice.providers) == expected


@pytest.mark.parametrize("requested, available, hint", [
    ("cuda", [CPU], "onnxruntime-gpu"),
    ("cuda", [COREML, CPU], "onnxruntime-gpu"),
    ("metal", [CUDA, CPU], "CoreML"),
])
def test_explicit_device_unavailable_says_what_to_install(requested, available, hint):
    with pytest.raises(LofiError) as err:
        select(requested, available)
    assert err.value.code == errors.MODEL_LOAD_FAILED
    assert hint in err.value.message and "--device cpu" in err.value.message


def test_unknown_device():
    with pytest.raises(LofiError) as err:
        select("tpu", [CPU])
    assert err.value.code == errors.MODEL_LOAD_FAILED


def test_explicit_cuda_on_this_machine():
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(LofiError) as err:
        select("cuda", ort.get_available_providers())
    assert err.value.code == errors.MODEL_LOAD_FAILED


def test_threads():
    assert device.resolve_threads(3) == 3
    assert device.resolve_threads(None) >= 1
    with pytest.raises(ValueError):
        device.resolve_threads(0)
    assert device.session_options(2).intra_op_num_threads == 2
