"""One clear MODEL_DOWNLOAD_FAILED sentence for any failure of a hub download.

huggingface_hub raises its own errors for the hub's HTTP answers (gated, 404, 5xx) and
lets its HTTP library's errors through for the network: ``requests`` under
huggingface_hub 0.x, ``httpx`` under 1.x, ``httpx2`` under 2.x. None of them is lofid's
dependency, so the library is the one huggingface_hub's own session comes from
(``transport_errors``), whichever release is installed.
"""

from __future__ import annotations

import errno
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lofid.errors import MODEL_DOWNLOAD_FAILED, LofiError
from lofid.variants import REPO, REVISION

if TYPE_CHECKING:
    from lofid.worker.download import Remote


@dataclass(frozen=True)
class TransportErrors:
    """The exception classes of the HTTP library huggingface_hub uses."""

    network: tuple[type[BaseException], ...]   # the connection failed, timed out or broke
    connect: tuple[type[BaseException], ...]   # of those: nothing could be reached at all
    base: type[BaseException]                  # any error of the library


def transport_errors() -> TransportErrors:
    """The classes of the library behind ``huggingface_hub.utils.get_session()``:
    requests (a ``Session``) or httpx/httpx2 (a ``Client``)."""
    from huggingface_hub.utils import get_session

    lib = importlib.import_module(type(get_session()).__module__.split(".")[0])
    if lib.__name__ == "requests":
        return TransportErrors((lib.ConnectionError, lib.Timeout, lib.exceptions.ChunkedEncodingError),
                               (lib.ConnectionError,), lib.RequestException)
    return TransportErrors((lib.TransportError,), (lib.ConnectError, lib.ConnectTimeout), lib.HTTPError)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def _chain(e: BaseException) -> Iterable[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def download_error(
    e: BaseException,
    variant: str,
    r: Remote | None,
    file_done: int = 0,
    cache: Path | None = None,
) -> LofiError:
    """One clear sentence for any failure of a download (MODEL_DOWNLOAD_FAILED): ``e``
    while fetching ``r`` (None: the file list) of ``variant`` into the hub cache ``cache``,
    ``file_done`` bytes of it kept for the next call to resume from."""
    if isinstance(e, LofiError):
        return e
    what = r.path if r is not None else f"the file list of {variant}"
    data = {"repo": REPO, "variant": variant}
    if r is not None:
        data["file"] = r.path
    from huggingface_hub import constants
    from huggingface_hub.errors import FileMetadataError, GatedRepoError, OfflineModeIsEnabled

    endpoint = constants.ENDPOINT
    chain = list(_chain(e))
    if any(isinstance(x, OfflineModeIsEnabled) for x in chain) or constants.HF_HUB_OFFLINE:
        return LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"HF_HUB_OFFLINE is set, so {what} cannot be downloaded from {REPO}; "
            "unset HF_HUB_OFFLINE or use --model-dir",
            offline=True,
            **data,
        )
    # The HTTP answer, if any, comes first. (LocalEntryNotFoundError subclasses
    # EntryNotFoundError but means "could not ask the hub": its cause tells why.)
    http = next((x for x in chain if getattr(getattr(x, "response", None), "status_code", None)), None)
    status = http.response.status_code if http is not None else None
    if status is not None or any(isinstance(x, GatedRepoError) for x in chain):
        return _http_error(chain, status, what, endpoint, data)
    transport = transport_errors()
    net = next((x for x in chain if isinstance(x, transport.network)), None)
    if net is not None:
        return _network_error(net, isinstance(net, transport.connect), r, file_done, what, endpoint, data)
    if any(isinstance(x, FileMetadataError) for x in chain):
        return LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"{endpoint} answered for {what} without the file's hub metadata: it is not a Hugging Face "
            "hub (or a proxy strips its headers); check HF_ENDPOINT",
            **data,
        )
    osr = next((x for x in chain if isinstance(x, OSError) and not isinstance(x, transport.base)), None)
    if osr is not None:
        return _storage_error(osr, r, what, cache, data)
    return LofiError(
        MODEL_DOWNLOAD_FAILED,
        f"downloading {what} from {endpoint} failed: {type(e).__name__}: {e}",
        **data,
    )


def _http_error(chain: list[BaseException], status: int | None, what: str, endpoint: str,
                data: dict) -> LofiError:
    """The hub refused: gated, or an HTTP error ``status``."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    def seen(kind) -> bool:
        return any(isinstance(x, kind) for x in chain)

    if seen(GatedRepoError):
        return LofiError(
            MODEL_DOWNLOAD_FAILED, f"{REPO} on {endpoint} is gated: access to {what} was refused", status=status, **data
        )
    if status == 404:
        if seen(RepositoryNotFoundError):
            msg = f"the repository {REPO} was not found on {endpoint} (HTTP 404)"
        elif seen(RevisionNotFoundError):
            msg = f"{REPO} on {endpoint} has no branch {REVISION} (HTTP 404)"
        else:
            msg = f"{REPO} on {endpoint} has no file {what} (HTTP 404)"
        return LofiError(MODEL_DOWNLOAD_FAILED, msg, status=404, **data)
    hint = "try again later" if status >= 500 else "check HF_ENDPOINT and your token"
    return LofiError(
        MODEL_DOWNLOAD_FAILED,
        f"the hub at {endpoint} answered HTTP {status} for {what} of {REPO}; {hint}",
        status=status,
        **data,
    )


def _network_error(net: BaseException, unreachable: bool, r: Remote | None, file_done: int, what: str,
                   endpoint: str, data: dict) -> LofiError:
    """The connection failed (``net``; ``unreachable``: it was never made): before
    anything came, or in the middle of a file."""
    if r is None or (not file_done and unreachable):
        return LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"could not reach the hub at {endpoint} for {what} ({type(net).__name__}); "
            "check the network (or HF_ENDPOINT) and try again",
            **data,
        )
    if file_done:
        again = f" ({_mb(file_done)} of {_mb(r.size)} kept); run the download again to resume"
    else:
        again = "; run the download again"
    return LofiError(
        MODEL_DOWNLOAD_FAILED, f"the connection to {endpoint} broke while downloading {what}{again}", **data,
    )


def _storage_error(osr: OSError, r: Remote | None, what: str, cache: Path | None, data: dict) -> LofiError:
    """Writing into the cache failed (``osr``): a full disk, a cut transfer, anything else."""
    place = str(cache) if cache is not None else "the Hugging Face cache"
    if osr.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f" ({_mb(r.size)} needed)" if r is not None else ""
        return LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"no space left to write {what} in {place}{need}: {osr.strerror or osr}",
            **data,
        )
    if "Consistency check failed" in str(osr):
        return LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"{what} arrived with the wrong size (the connection was probably cut); run the download again",
            **data,
        )
    return LofiError(MODEL_DOWNLOAD_FAILED, f"could not write {what} in {place}: {osr.strerror or osr}", **data)
