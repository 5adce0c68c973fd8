"""Device selection as a pure function of the available providers, plus this machine."""

from __future__ import annotations

import os

import onnxruntime as ort
import pytest

from lofid import config, devices, errors, variants
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


def test_session_providers_carry_the_cuda_options():
    """fp32 stays fp32 on CUDA (no TF32); the CPU provider takes no options."""
    assert select("cuda", [CUDA, CPU]).session_providers == [(CUDA, {"use_tf32": "0"}), CPU]
    assert select("cpu", [CUDA, CPU]).session_providers == [CPU]
    assert select("metal", [COREML, CPU]).session_providers == [COREML, CPU]


def _install_fake_distribution(path, name: str) -> None:
    info = path / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")


def test_auto_guesses_cuda_where_the_gpu_build_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.platform", "linux")
    assert devices.likely_auto_device() == "cpu"
    assert variants.default_variant("auto") == "int8"
    _install_fake_distribution(tmp_path, "onnxruntime-gpu")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert devices.likely_auto_device() == "cuda"
    assert variants.default_variant("auto") == "fp16"
    assert config.load({}, environ={}).variant == "fp16"
    assert config.load({"device": "cpu"}, environ={}).variant == "int8"


def test_auto_guesses_metal_on_apple_silicon(monkeypatch):
    monkeypatch.setattr("sys.platform", "darwin")
    monkeypatch.setattr("os.uname", lambda: os.uname_result(("Darwin", "mac", "23.0", "", "arm64")))
    assert devices.likely_auto_device() == "metal"
    assert variants.default_variant("auto") == "fp16"
