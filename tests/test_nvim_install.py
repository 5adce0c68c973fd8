"""Installing the plugin as its README says, and its help.

Every install snippet of clients/nvim/README.md (marked `<!-- test: NAME -->`) runs as
pasted in a headless Neovim whose $HOME holds a copy of the plugin at the README's path
(~/src/lofid/clients/nvim). lazy.nvim and packer.nvim are not installed here: their
spec is evaluated and then loaded the way that manager loads a local plugin (runtimepath,
plugin/ files, then `config`, or lazy's `require(name).setup(opts)`). Each route must end
with the commands defined, the options applied, and `:help lofi` opening the help.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from nvim.editor import NVIM, PLUGIN, needs_nvim

pytestmark = needs_nvim

README = PLUGIN / "README.md"
HELP = PLUGIN / "doc" / "lofi.txt"


def snippets() -> dict[str, str]:
    found = re.findall(r"<!-- test: ([\w-]+) -->\s*```\w*\n(.*?)```", README.read_text(), re.S)
    return dict(found)


def copy_plugin(dest: Path) -> Path:
    shutil.copytree(PLUGIN, dest, ignore=shutil.ignore_patterns("tags"))
    return dest


# Loads a spec the way each manager loads a local plugin; `spec` is the snippet's value.
LOAD = {
    "lazy": """
local spec = SPEC
assert(spec.name == "lofi", "lazy would call the plugin " .. tostring(spec.name))
local dir = vim.fn.expand(spec.dir)
vim.opt.rtp:append(dir)
for _, file in ipairs(vim.fn.glob(dir .. "/plugin/**/*.lua", false, true)) do vim.cmd("source " .. file) end
if type(spec.build) == "function" then spec.build({ dir = dir, name = spec.name }) end
if type(spec.config) == "function" then spec.config({ dir = dir, name = spec.name }, spec.opts or {})
elseif spec.opts ~= nil or spec.config == true then require(spec.main or spec.name).setup(spec.opts or {}) end
""",
    "packer": """
local spec
local function use(s) spec = s end
SPEC
assert(spec.as == "lofi", "packer would call the plugin " .. tostring(spec.as))
local dir = vim.fn.expand(spec[1])
vim.opt.rtp:append(dir)
for _, file in ipairs(vim.fn.glob(dir .. "/plugin/**/*.lua", false, true)) do vim.cmd("source " .. file) end
if spec.run then (type(spec.run) == "function" and spec.run or function() vim.cmd(spec.run) end)() end
if spec.config then spec.config() end
""",
}

CHECK = """
local r = { commands = vim.fn.exists(":LofiGenerate") == 2 and vim.fn.exists(":LofiDaemon") == 2,
            auto_start = require("lofi").config.auto_start }
r.help = pcall(vim.cmd, "help lofi")
r.help_file = vim.fn.expand("%:t")
r.help_line = vim.fn.getline(".")
vim.fn.writefile({ vim.json.encode(r) }, OUT)
"""


def run_route(home: Path, init: str) -> dict:
    out = home / "result.json"
    (home / "init.lua").write_text(init)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_DATA_HOME": str(home / ".local" / "share"), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_STATE_HOME": str(home / ".local" / "state")}
    check = CHECK.replace("OUT", json.dumps(str(out)))
    proc = subprocess.run([NVIM, "--headless", "-n", "-i", "NONE", "-u", str(home / "init.lua"),
                           "-c", "lua " + check.replace("\n", " "), "-c", "qa!"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=home)
    assert out.exists(), proc.stderr
    assert "Error" not in proc.stderr and "E5" not in proc.stderr, proc.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("route", ["lazy", "packer", "package", "rtp"])
def test_install_route_works_as_pasted(route, short_tmp):
    code = snippets()
    home = short_tmp / "home"
    copy_plugin(home / "src" / "lofid" / "clients" / "nvim")
    if route == "package":
        subprocess.run(["sh", "-ec", code["package"]], env={**os.environ, "HOME": str(home)}, check=True)
        init = code["package-init"]
    elif route == "rtp":
        init = code["rtp"]
    else:
        init = LOAD[route].replace("SPEC", code[route].strip())
    result = run_route(home, init)
    assert result == {"commands": True, "auto_start": True, "help": True, "help_file": "lofi.txt",
                      "help_line": result["help_line"]}, result
    assert "*lofi*" in result["help_line"], result
    assert (home / "src" / "lofid" / "clients" / "nvim" / "doc" / "tags").is_file()  # made by the plugin


def test_help_matches_the_readme_snippets():
    help_text = " ".join(HELP.read_text().split())
    for name, code in snippets().items():
        assert " ".join(code.split()) in help_text, f"the README's {name} snippet is not in lofi.txt"


def test_help_tags_for_every_command_and_option(short_tmp):
    plugin = copy_plugin(short_tmp / "plugin")
    out = short_tmp / "tags.json"
    # the options: lofi.config's defaults, and those the README lists (socket defaults to nil)
    setup_section = README.read_text().split("## Setup options")[1].split("\n## ")[0]
    readme_options = re.findall(r"^  (\w+) = ", setup_section, re.M)
    lua = f"""
local options = vim.tbl_keys(require("lofi.config").defaults)
vim.list_extend(options, vim.fn.json_decode({json.dumps(json.dumps(readme_options))}))
local tags = {{ "lofi", "lofi-install", "lofi-messages", "lofi-setup", "lofi-commands" }}
for _, opt in ipairs(options) do table.insert(tags, "lofi-opt-" .. opt) end
for name in pairs(vim.api.nvim_get_commands({{}})) do
  if name:match("^Lofi") then table.insert(tags, ":" .. name) end
end
local result = {{}}
for _, tag in ipairs(tags) do
  local ok = pcall(vim.cmd, "help " .. tag)
  local line = vim.fn.getline(".")
  result[tag] = ok and vim.fn.expand("%:t") == "lofi.txt" and line:find("*" .. tag .. "*", 1, true) ~= nil
  pcall(vim.cmd, "helpclose")
end
vim.fn.writefile({{ vim.json.encode(result) }}, {json.dumps(str(out))})
"""
    script = short_tmp / "check.lua"
    script.write_text(lua)
    proc = subprocess.run([NVIM, "--headless", "--clean", "-n", "--cmd", f"set rtp^={plugin}",
                           "-c", f"luafile {script}", "-c", "qa!"], capture_output=True, text=True, timeout=60)
    assert out.exists(), proc.stderr
    result = json.loads(out.read_text())
    assert {":LofiGenerate", ":LofiStatus", ":LofiTracks", ":LofiPlay", ":LofiStop", ":LofiDaemon"} <= set(result)
    assert len([t for t in result if t.startswith("lofi-opt-")]) >= 15
    assert [tag for tag, ok in result.items() if not ok] == [], result
    # :helptags on the folder is clean too (no duplicate tags)
    doc = short_tmp / "doc"
    shutil.copytree(PLUGIN / "doc", doc, ignore=shutil.ignore_patterns("tags"))
    proc = subprocess.run([NVIM, "--headless", "--clean", "-c", f"helptags {doc}", "-c", "qa!"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "E" not in proc.stderr, proc.stderr
