"""Configuration (issue 7): defaults < config.toml < environment < flags, key by key;
an invalid file or value stops lofid with a message naming the key; `lofictl config`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _pythonpath

from lofid import config, daemon


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_key_by_key(tmp_path):
    toml = write(tmp_path / "config.toml", 'top_k = 10\ntemperature = 0.5\nvariant = "fp32"\ncache_max_mb = 300\n')
    environ = {"LOFID_CONFIG": str(toml), "LOFID_TEMPERATURE": "0.7", "LOFID_VARIANT": "int8"}
    s, sources = config.load_with_sources({"variant": "fp16", "threads": None}, environ)
    assert (s.top_k, sources["top_k"]) == (10, str(toml))  # file over default
    assert (s.temperature, sources["temperature"]) == (0.7, "env LOFID_TEMPERATURE")  # env over file
    assert (s.variant, sources["variant"]) == ("fp16", "flag --variant")  # flag over env over file
    assert (s.cache_max_mb, sources["cache_max_mb"]) == (300, str(toml))
    assert (s.guidance_scale, sources["guidance_scale"]) == (3.0, "default")
    assert (s.threads, sources["threads"]) == (None, "default")  # a flag not given is no flag
    assert (s.config, sources["config"]) == (toml, "env LOFID_CONFIG")
    # --config beats LOFID_CONFIG
    other = write(tmp_path / "other.toml", "top_k = 3\n")
    s, sources = config.load_with_sources({"config": str(other)}, environ)
    assert s.top_k == 3 and sources["config"] == "flag --config" and s.temperature == 0.7


def test_every_setting_has_a_file_key_an_env_var_and_a_flag(tmp_path):
    parser = daemon.build_parser()
    flags = {a.dest for a in parser._actions}
    for key, f in config.FIELDS.items():
        assert config.env_name(key) == "LOFID_" + key.upper()
        if f.metadata["flag"]:
            assert key in flags, key
    # the contract's settings and this issue's, from a file
    toml = write(tmp_path / "c.toml", 'socket = "/tmp/x.sock"\ncache_dir = "~/t"\nmodel_dir = "/m"\n'
                 'variant = "int8"\ndevice = "cpu"\nthreads = 4\nallow_download = true\ntop_k = 1\n'
                 'temperature = 0.9\nguidance_scale = 0\nlog_level = "debug"\nidle_exit_sec = 600\n'
                 'cache_max_mb = 2000\nworker_stall_sec = 60\n')
    s = config.load({"config": str(toml)}, {})
    assert (s.socket, s.cache_dir, s.model_dir) == (Path("/tmp/x.sock"), Path("~/t").expanduser(), Path("/m"))
    assert (s.variant, s.device, s.threads, s.allow_download, s.top_k) == ("int8", "cpu", 4, True, 1)
    assert (s.temperature, s.guidance_scale, s.log_level, s.idle_exit_sec, s.cache_max_mb) == \
        (0.9, 0.0, "debug", 600.0, 2000)


@pytest.mark.parametrize("text, key, words", [
    ("colour = 'blue'\n", "colour", "unknown setting"),
    ("top_k = 'many'\n", "top_k", "invalid value"),
    ("top_k = 2.5\n", "top_k", "expected an integer"),
    ("top_k = [1, 2]\n", "top_k", "invalid value"),
    ("variant = 'fp8'\n", "variant", "expected one of fp32, fp16, int8"),
    ("temperature = -1\n", "temperature", "expected a number"),
    ("allow_download = 'perhaps'\n", "allow_download", "expected true or false"),
    ("cache_max_mb = 0\n", "cache_max_mb", "expected an integer"),
    ("socket = 5\n", "socket", "expected a path"),
    ("[sampling]\ntop_k = 5\n", "sampling", "unknown setting"),
    ("engine = 'os:system'\n", "engine", "for tests only (LOFID_ENGINE)"),  # it names a module to import
])
def test_an_invalid_file_names_the_key_and_lofid_does_not_run(tmp_path, capsys, text, key, words):
    toml = write(tmp_path / "config.toml", text)
    code = daemon.main(["--config", str(toml), "--socket", str(tmp_path / "s.sock")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"lofid: invalid configuration: {toml}: ") and f"'{key}'" in err and words in err, err
    assert not (tmp_path / "s.sock").exists()


def test_unreadable_toml_missing_file_bad_env_and_bad_flag(tmp_path, capsys, monkeypatch):
    bad = write(tmp_path / "bad.toml", 'top_k = 5\nvariant = "fp16\n')
    assert daemon.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot read config file" in err and "line 2" in err, err

    assert daemon.main(["--config", str(tmp_path / "nope.toml")]) == 2  # asked for explicitly: must exist
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in capsys.readouterr().err

    assert daemon.main(["--config", str(tmp_path)]) == 2  # a directory
    assert "cannot read config file" in capsys.readouterr().err

    good = write(tmp_path / "good.toml", "")
    monkeypatch.setenv("LOFID_THREADS", "lots")
    assert daemon.main(["--config", str(good)]) == 2
    err = capsys.readouterr().err
    assert "LOFID_THREADS: invalid value 'lots' for 'threads'" in err, err
    monkeypatch.delenv("LOFID_THREADS")

    with pytest.raises(SystemExit):  # an unknown flag is argparse's to refuse
        daemon.main(["--config", str(good), "--colour", "blue"])
    capsys.readouterr()
    assert daemon.main(["--config", str(good), "--log-level", "loud"]) == 2
    err = capsys.readouterr().err
    assert "--log-level: invalid value 'loud' for 'log_level': expected one of debug, info, warning, error" in err


def test_a_real_lofid_exits_non_zero_on_a_bad_value(short_tmp):
    toml = write(short_tmp / "config.toml", "guidance_scale = 'loud'\n")
    r = subprocess.run([sys.executable, "-m", "lofid", "--config", str(toml), "--socket", str(short_tmp / "s")],
                       capture_output=True, text=True, timeout=60, env={"PYTHONPATH": _pythonpath(), "PATH": "/bin"})
    assert r.returncode == 2 and "'guidance_scale'" in r.stderr and r.stdout == ""


def test_the_daemon_uses_the_winning_value(make_daemon, short_tmp):
    """variant: file says int8, environment fp32, flag fp16 -> the daemon runs fp16."""
    (short_tmp / "config.toml").write_text('variant = "int8"\nlog_level = "debug"\n')
    d = make_daemon(env={"LOFID_VARIANT": "fp32"}, variant="fp16", log_level="warning")
    with d.client() as c:
        assert c.call("status")["model"]["variant"] == "fp16"
    d.stop()
    assert "listening on" not in d.logs()  # --log-level warning beat the file's debug


def lofictl(env, *args):
    return subprocess.run([sys.executable, "-m", "lofictl", *args], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_lofictl_config_prints_values_sources_and_paths(short_tmp):
    toml = write(short_tmp / "config.toml", "top_k = 12\ncache_max_mb = 500\n")
    env = {"PYTHONPATH": _pythonpath(), "PATH": "/usr/bin:/bin", "HOME": str(short_tmp / "home"),
           "LOFID_CONFIG": str(toml), "LOFID_TEMPERATURE": "0.8", "LOFID_CACHE_DIR": str(short_tmp / "tracks"),
           "HF_HOME": str(short_tmp / "hf")}
    r = lofictl(env, "--socket", str(short_tmp / "s.sock"), "--json", "config")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["settings"]["top_k"] == 12 and out["sources"]["top_k"] == str(toml)
    assert out["settings"]["temperature"] == 0.8 and out["sources"]["temperature"] == "env LOFID_TEMPERATURE"
    assert out["settings"]["socket"] == str(short_tmp / "s.sock") and out["sources"]["socket"] == "flag --socket"
    assert out["settings"]["variant"] == "int8" and out["sources"]["variant"] == "default"
    assert set(out["paths"]) >= {"socket", "config file", "track cache", "state", "models", "daemon log", "service"}
    assert out["paths"]["models"].startswith(f"Hugging Face cache: {short_tmp / 'hf' / 'hub'}")
    text = lofictl(env, "config").stdout
    assert "top_k" in text and f"# {toml}" in text and "# env LOFID_TEMPERATURE" in text
    assert str(short_tmp / "tracks") in text and "(does not exist yet)" in text
    bad = lofictl({**env, "LOFID_TOP_K": "x"}, "config")
    assert bad.returncode != 0 and bad.stderr.startswith("lofictl: INVALID_CONFIG: LOFID_TOP_K: ")


def test_int4_on_a_gpu_is_refused_at_start():
    with pytest.raises(config.ConfigError) as err:
        config.load({"variant": "int4", "device": "cuda"}, environ={})
    assert "CPU only" in str(err.value) and "flag --variant" in str(err.value)
    assert config.load({"variant": "int4", "device": "auto"}, environ={}).variant == "int4"
