"""What lofid needs installed: the tested floor of each runtime dependency, and the
checks that say so where the installed packages fall short of it.

setup.cfg's ``install_requires`` and ``constraints/floors.txt`` state the same floors
(tests/test_dependencies.py holds the three together), and CI runs the engine tests in
a venv at exactly these versions. pip still installs an older one when the user forces
it (``--no-deps``, or another package's pin it only warns about); ``require`` names
the package, the version found and the one needed instead of letting it fail later
in a way that blames something else.

Installed versions are read from the distributions' metadata folders on ``sys.path``
(``<name>-<version>.dist-info``), the first one found winning as for an import. Without
importlib.metadata, and without importing the packages themselves: the broker uses
this module, and it imports neither numpy nor onnxruntime.
"""

from __future__ import annotations

import os
import re
import sys

from lofid.errors import MODEL_LOAD_FAILED, LofiError

# distribution -> the lowest version lofid is tested with (CI's floors venv)
FLOORS = {
    "msgpack": "1.0.5",          # the first release with CPython 3.11 wheels
    "onnxruntime": "1.32.0",     # 1.31 gives the int4 variant NaN logits
    "onnx": "1.14.0",            # 1.13 needs protobuf < 4, onnxruntime 1.32 >= 4.25
    "numpy": "1.23.2",           # the first release with CPython 3.11 wheels
    "tokenizers": "0.19.0",      # 0.15 cannot read MusicGen's tokenizer.json
    "huggingface_hub": "0.25.0",  # 0.24 lacks the error classes of huggingface_hub.errors
    "scipy": "1.9.2",            # the first release with CPython 3.11 wheels
    "platformdirs": "3.0.0",
}
# the packages that install onnxruntime's one import folder, ``onnxruntime/``
ONNXRUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu")
GPU_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"


def normalize(name: str) -> str:
    """A distribution name as its metadata folder spells it (PEP 503, ``_`` for runs)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def installed(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """name -> installed version of each of ``names`` found on ``sys.path``."""
    wanted = {normalize(n): n for n in names}
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            folders = os.listdir(entry or ".")
        except OSError:   # a zip file, a missing folder
            continue
        for folder in folders:
            stem, dot, kind = folder.rpartition(".")
            if not dot or kind not in ("dist-info", "egg-info"):
                continue
            name, _, version = stem.partition("-")
            n = wanted.get(normalize(name))
            if n is not None and n not in found and version:
                found[n] = version.split("-")[0]   # an egg-info's "-py3.11" goes
    return found


def release(version: str) -> tuple[int, ...]:
    """The release numbers of ``version`` ("1.32.0rc1" -> (1, 32, 0))."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(x) for x in m.group().split(".")) if m else ()


def onnxruntime_conflict() -> str | None:
    """Where more than one onnxruntime build is installed (``pip install onnxruntime-gpu``
    next to the ``onnxruntime`` that lofid pulled): a sentence saying so, with the fix.
    Their files share one folder, so whichever was installed last wins file by file, and
    uninstalling one breaks the other."""
    builds = installed(ONNXRUNTIME_BUILDS)
    if len(builds) < 2:
        return None
    both = " and ".join(f"{n} {builds[n]}" for n in ONNXRUNTIME_BUILDS if n in builds)
    return (f"{both} are both installed, in one folder: neither works reliably. For the GPU: "
            f"`{GPU_FIX}`; for the CPU only: `pip uninstall -y onnxruntime onnxruntime-gpu && "
            f"pip install onnxruntime`")


def shortfalls(names: tuple[str, ...] | list[str]) -> list[str]:
    """One sentence per package of ``names`` that is missing or older than its floor
    (onnxruntime counts in any of its builds)."""
    found = installed([*names, *ONNXRUNTIME_BUILDS])
    out = []
    for name in names:
        floor = FLOORS[name]
        version = found.get(name)
        if name == "onnxruntime":
            version = next((found[b] for b in ONNXRUNTIME_BUILDS if b in found), None)
        if version is None:
            out.append(f"{name} is not installed; lofid needs {name} >= {floor}: "
                       f"pip install '{name}>={floor}'")
        elif release(version) < release(floor):
            out.append(f"{name} {version} is installed; lofid needs {name} >= {floor}: "
                       f"pip install -U '{name}>={floor}'")
    return out


def require(*names: str) -> None:
    """Raise MODEL_LOAD_FAILED naming each of ``names`` that is missing or older than
    its floor."""
    problems = shortfalls(names)
    if problems:
        raise LofiError(MODEL_LOAD_FAILED, "; ".join(problems), packages=list(names))
