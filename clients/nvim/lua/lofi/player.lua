-- Background playback: loop one WAV through a system player, spawned without a shell.
-- Players with a loop flag of their own (ffplay, mpv) loop themselves; the others are
-- started again each time they finish.
local uv = vim.uv or vim.loop
local errors = require("lofi.errors")

local M = {}

-- name -> argv before the file ("--" ends the options of those that take it); loop = the
-- player loops by itself
M.KNOWN = {
  ["pw-play"] = { "pw-play", "--" },
  paplay = { "paplay", "--" },
  aplay = { "aplay", "-q", "--" },
  afplay = { "afplay" },
  ffplay = { "ffplay", "-nodisp", "-loglevel", "quiet", "-loop", "0", "--", loop = true },
  mpv = { "mpv", "--no-video", "--really-quiet", "--loop-file=inf", "--", loop = true },
}

--- nil if `path` is a normalized absolute path to a .wav, else an UNTRUSTED_DAEMON error: a
--- path from lofid is never anything a player could take for an option, a URL or a playlist.
M.check_path = function(path)
  local ok = type(path) == "string"
    and path:sub(1, 1) == "/"
    and path:lower():sub(-4) == ".wav"
    and not path:find("[%z\n\r]")
    and not path:find("/%.%.?/")
    and not path:find("//", 1, true)
  if ok then
    return nil
  end
  return errors.new(errors.CODE.UNTRUSTED_DAEMON, string.format(
    "%s is not an absolute path to a .wav; refusing to play it", vim.inspect(path):sub(1, 200)))
end

M.current = nil -- {path, argv, handle, pid, started, quick_exits}

--- A players entry (a name, or a table {cmd, args..., loop = bool}) as an argv table.
local function entry_argv(entry)
  if type(entry) == "string" then
    return vim.deepcopy(M.KNOWN[entry] or { entry })
  end
  return vim.deepcopy(entry)
end

--- The first available player of `players`: its argv (file not yet appended), or nil.
M.find = function(players)
  for _, entry in ipairs(players) do
    local argv = entry_argv(entry)
    if argv[1] and vim.fn.executable(argv[1]) == 1 then
      return argv
    end
  end
  return nil
end

M.names = function(players)
  local names = {}
  for _, entry in ipairs(players) do
    table.insert(names, entry_argv(entry)[1] or "?")
  end
  return table.concat(names, ", ")
end

M.is_playing = function()
  return M.current ~= nil
end

local function spawn(cur, on_error)
  local args = vim.list_slice(cur.argv, 2)
  table.insert(args, cur.path)
  cur.started = uv.now()
  local handle, pid
  handle, pid = uv.spawn(cur.argv[1], { args = args, stdio = { nil, nil, nil } }, vim.schedule_wrap(function(code, signal)
    if handle and not handle:is_closing() then
      handle:close()
    end
    if M.current ~= cur or cur.stopping then
      return
    end
    local quick = uv.now() - cur.started < 300
    cur.quick_exits = quick and cur.quick_exits + 1 or 0
    if (code ~= 0 and quick) or signal ~= 0 or cur.quick_exits >= 3 then
      M.current = nil
      local how = signal ~= 0 and ("signal " .. signal) or ("code " .. code)
      return on_error(errors.new(errors.CODE.PLAYER_FAILED, string.format("%s exited with %s playing %s",
        cur.argv[1], how, cur.path)))
    end
    spawn(cur, on_error) -- the track ended: play it again
  end))
  if not handle then
    M.current = nil
    return on_error(errors.new(errors.CODE.PLAYER_FAILED, string.format("cannot start %s: %s", cur.argv[1], pid)))
  end
  cur.handle, cur.pid, cur.spawns = handle, pid, cur.spawns + 1
end

--- Loop `path` until stop(); replaces what plays. on_error(err) if the player fails.
---@return table|nil err
M.play = function(path, players, on_error)
  local bad = M.check_path(path)
  if bad then
    return bad
  end
  M.stop()
  local argv = M.find(players)
  if not argv then
    return errors.new(errors.CODE.NO_PLAYER, string.format(
      "no audio player found (tried %s); install one or set players in setup()", M.names(players)))
  end
  M.current = { path = path, argv = argv, quick_exits = 0, spawns = 0 }
  spawn(M.current, on_error or function() end)
  return nil
end

M.stop = function()
  local cur = M.current
  M.current = nil
  if not cur then
    return false
  end
  cur.stopping = true
  if cur.handle and not cur.handle:is_closing() then
    pcall(cur.handle.kill, cur.handle, "sigterm")
  end
  return true
end

return M
