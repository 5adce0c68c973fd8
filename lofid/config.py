"""Settings: one frozen object built from defaults < config.toml < environment < flags.

Every setting has a config key (the field name), an environment variable
(``LOFID_`` + the upper-cased key) and a command-line flag (``--`` + the key with
dashes). An invalid value anywhere is a ``ConfigError`` naming the key and where it
came from; lofid never runs with a silent default in its place.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lofid import paths, variants
from lofid.devices import DEVICES

VARIANTS = variants.NAMES
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A setting has an invalid value; the message names the key and its source."""


def _path(v: Any) -> Path:
    if not isinstance(v, (str, os.PathLike)) or not str(v):
        raise ValueError("expected a path")
    return Path(os.path.abspath(os.path.expanduser(str(v))))  # the daemon and its clients may run elsewhere


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _int(lo: int | None = None, hi: int | None = None):
    def conv(v: Any) -> int:
        if isinstance(v, bool) or isinstance(v, float):
            raise ValueError("expected an integer")
        n = int(v)
        if lo is not None and n < lo or hi is not None and n > hi:
            raise ValueError(f"expected an integer in {lo}..{hi if hi is not None else '∞'}")
        return n

    return conv


def _float(lo: float, hi: float):
    def conv(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError("expected a number")
        x = float(v)
        if not (lo <= x <= hi):  # also rejects NaN
            raise ValueError(f"expected a number in {lo}..{hi}")
        return x

    return conv


def _choice(options: tuple[str, ...]):
    def conv(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return s

    return conv


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("expected a non-empty string")
    return v.strip()


def _opt(conv):
    """A setting whose empty value means 'unset'."""

    def wrapped(v: Any):
        if v is None or (isinstance(v, str) and v.strip() in ("", "auto", "none")):
            return None
        return conv(v)

    return wrapped


def _setting(default: Any, conv, help: str, *, flag: bool = True, in_file: bool = True):
    return field(default=default, metadata={"conv": conv, "help": help, "flag": flag, "in_file": in_file})


@dataclass(frozen=True)
class Settings:
    socket: Path = _setting(None, _path, "Unix socket path")
    config: Path = _setting(None, _path, "config file (TOML)")
    cache_dir: Path = _setting(None, _path, "track cache directory")
    state_dir: Path = _setting(None, _path, "state directory (lock file, consent)")
    model_dir: Path | None = _setting(None, _opt(_path), "local model folder in the hub layout; never downloaded to")
    variant: str = _setting(None, _choice(VARIANTS), "model variant: fp32, fp16, int8 or int4 (default: int8 on the "
                            "CPU, fp16 on a GPU)")
    device: str = _setting("auto", _choice(DEVICES), "device: auto, cpu, cuda or metal")
    threads: int | None = _setting(None, _opt(_int(1, 256)), "CPU threads for inference (default: auto)")
    allow_download: bool = _setting(False, _bool, "download missing model files without asking")
    top_k: int = _setting(250, _int(1, 2048), "sampling: top-k (1 = greedy)")
    temperature: float = _setting(1.0, _float(1e-3, 100.0), "sampling: temperature")
    guidance_scale: float = _setting(3.0, _float(0.0, 100.0), "classifier-free guidance scale")
    log_level: str = _setting("info", _choice(LOG_LEVELS), "log level")
    cache_max_mb: int | None = _setting(None, _opt(_int(1)), "track cache size cap in MB (LRU eviction)")
    idle_exit_sec: float | None = _setting(None, _opt(_float(1.0, 1e9)), "exit after this many idle seconds")
    worker_memory_mb: int | None = _setting(None, _opt(_int(64)), "address-space limit of the worker in MB")
    worker_stall_sec: float = _setting(300.0, _float(0.1, 1e6), "kill a worker silent for this long mid-job")
    max_frame_bytes: int = _setting(1 << 20, _int(1024, 1 << 30), "largest accepted msgpack-rpc frame", flag=False)
    frame_timeout_sec: float = _setting(10.0, _float(0.05, 3600.0), "a started frame must finish within this",
                                        flag=False)
    idle_close_sec: float = _setting(30.0, _float(0.1, 1e6), "near the connection limit, close connections "
                                     "without a request for this long", flag=False)
    # for tests only (a scripted engine): from the environment, never from config.toml or a flag,
    # since it names a module to import
    engine: str = _setting("lofid.worker.musicgen:MusicGen", _str, "engine class (module:Class), tests only: "
                           "LOFID_ENGINE", flag=False, in_file=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def env_name(key: str) -> str:
    return "LOFID_" + key.upper()


def _convert(key: str, value: Any, source: str) -> Any:
    if key not in FIELDS:
        raise ConfigError(f"{source}: unknown setting {key!r}")
    try:
        return FIELDS[key].metadata["conv"](value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid value {value!r} for {key!r}: {e}") from None


def _defaults_for_paths(values: dict[str, Any]) -> None:
    values["variant"] = values["variant"] or variants.default_variant(values["device"])
    values["socket"] = values["socket"] or paths.default_socket()
    values["cache_dir"] = values["cache_dir"] or paths.default_cache_dir()
    values["state_dir"] = values["state_dir"] or paths.default_state_dir()


def load(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build the effective settings. ``flags`` holds only the flags given (None = not given)."""
    return load_with_sources(flags, environ)[0]


def load_with_sources(flags: Mapping[str, Any] | None = None,
                      environ: Mapping[str, str] | None = None) -> tuple[Settings, dict[str, str]]:
    """The effective settings and, per key, where its value came from: "default", the
    config file's path, ``env LOFID_…`` or ``flag --…``."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {k: f.default for k, f in FIELDS.items()}
    sources = {k: "default" for k in FIELDS}

    config_path: Path | None = None
    explicit = False
    if "config" in flags:
        config_path, explicit = _convert("config", flags["config"], "--config"), True
        sources["config"] = "flag --config"
    elif env_name("config") in environ:
        config_path, explicit = _convert("config", environ[env_name("config")], env_name("config")), True
        sources["config"] = "env " + env_name("config")
    else:
        config_path = paths.default_config_file()
    values["config"] = config_path

    if config_path.exists():
        try:
            data = tomllib.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{config_path}: cannot read config file: {e}") from None
        for key, value in data.items():
            if key == "config":
                raise ConfigError(f"{config_path}: 'config' cannot be set inside the config file")
            if key in FIELDS and not FIELDS[key].metadata["in_file"]:
                raise ConfigError(f"{config_path}: {key!r} cannot be set in the config file; it is for tests "
                                  f"only ({env_name(key)})")
            values[key] = _convert(key, value, str(config_path))
            sources[key] = str(config_path)
    elif explicit:
        raise ConfigError(f"config file {config_path} does not exist")

    for key in FIELDS:
        if key != "config" and env_name(key) in environ:
            values[key] = _convert(key, environ[env_name(key)], env_name(key))
            sources[key] = "env " + env_name(key)
    for key, value in flags.items():
        if key != "config":
            flag = "--" + key.replace("_", "-")
            values[key] = _convert(key, value, flag)
            sources[key] = "flag " + flag
    _defaults_for_paths(values)
    if variants.get(values["variant"]).cpu_only and values["device"] in ("cuda", "metal"):
        raise ConfigError(f"variant {values['variant']!r} ({sources['variant']}) runs on the CPU only, not "
                          f"on device {values['device']!r} ({sources['device']}); use fp16 there")
    return Settings(**values), sources


def add_arguments(parser) -> None:
    """Add one flag per setting to an argparse parser (all default to None = not given)."""
    for key, f in FIELDS.items():
        if not f.metadata["flag"]:
            continue
        opt = "--" + key.replace("_", "-")
        help_text = f"{f.metadata['help']} (env {env_name(key)})"
        if f.metadata["conv"] is _bool:
            parser.add_argument(opt, dest=key, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(opt, dest=key, default=None, metavar=key.upper(), help=help_text)


def flags_from(namespace) -> dict[str, Any]:
    return {k: getattr(namespace, k, None) for k in FIELDS}


def from_dict(values: Mapping[str, Any], source: str) -> Settings:
    """Settings from a map such as ``Settings.to_dict()`` gives (a running daemon's, from its
    status): each value converted as a config key's is; keys this version lacks are ignored."""
    return Settings(**{k: None if v is None else _convert(k, v, source) for k, v in values.items() if k in FIELDS})
