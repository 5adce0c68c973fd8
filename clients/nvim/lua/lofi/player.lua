-- Background playback: loop one WAV through a system player, spawned without a shell.
-- The players of the `players` option are tried in order: one that fails at once (no
-- sound device, say) gives way to the next, and when all fail their stderr tells why.
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
  ffplay = { "ffplay", "-nodisp", "-loglevel", "error", "-loop", "0", "--", loop = true },
  mpv = { "mpv", "--no-video", "--really-quiet", "--loop-file=inf", "--", loop = true },
}

M.QUICK_MS = 1000 -- a player that exits with an error sooner than this failed to start
local STDERR_MAX = 2000 -- bytes of a player's stderr kept for the error message

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

M.current = nil -- {path, argv, handle, pid, started, quick_exits, spawns, ...}

--- A players entry (a name, or a table {cmd, args..., loop = bool}) as an argv table.
local function entry_argv(entry)
  if type(entry) == "string" then
    return vim.deepcopy(M.KNOWN[entry] or { entry })
  end
  return vim.deepcopy(entry)
end

--- Every available player of `players`, in order: their argv (file not yet appended).
M.find_all = function(players)
  local found = {}
  for _, entry in ipairs(players) do
    local argv = entry_argv(entry)
    if argv[1] and vim.fn.executable(argv[1]) == 1 then
      table.insert(found, argv)
    end
  end
  return found
end

--- The first available player of `players`: its argv, or nil.
M.find = function(players)
  return M.find_all(players)[1]
end

M.names = function(players)
  local names = {}
  for _, entry in ipairs(players) do
    table.insert(names, entry_argv(entry)[1] or "?")
  end
  return table.concat(names, ", ")
end

--- A player's name (its command without the directory).
M.name = function(argv)
  return vim.fn.fnamemodify(argv[1], ":t")
end

M.is_playing = function()
  return M.current ~= nil
end

--- The last non-empty line of a player's stderr, or how it exited.
local function why(stderr, how)
  local last = nil
  for line in (stderr or ""):gmatch("[^\r\n]+") do
    if vim.trim(line) ~= "" then
      last = vim.trim(line)
    end
  end
  return last or ("exited with " .. how)
end

--- "name: why" for a player that failed (its stderr often names it already).
M.failure = function(argv, stderr, how)
  local name, reason = M.name(argv), why(stderr, how)
  return reason:sub(1, #name + 1) == name .. ":" and reason or (name .. ": " .. reason)
end

--- Spawn argv (+ {path} when given) with stderr kept (the last STDERR_MAX bytes) and
--- `stdin` (a uv pipe) as its standard input when given; on_exit(code, signal, stderr).
--- Returns the handle and pid, or nil and an error.
M.spawn = function(argv, path, on_exit, stdin)
  local args = vim.list_slice(argv, 2)
  if path then
    table.insert(args, path)
  end
  local stderr_pipe = uv.new_pipe(false)
  local stderr = ""
  local handle, pid
  handle, pid = uv.spawn(argv[1], { args = args, stdio = { stdin, nil, stderr_pipe } },
    vim.schedule_wrap(function(code, signal)
      if handle and not handle:is_closing() then
        handle:close()
      end
      -- what the pipe still holds is read before it closes
      vim.defer_fn(function()
        if not stderr_pipe:is_closing() then
          stderr_pipe:close()
        end
        on_exit(code, signal, stderr)
      end, 20)
    end))
  if not handle then
    stderr_pipe:close()
    return nil, pid
  end
  stderr_pipe:read_start(function(_, data)
    if data then
      stderr = (stderr .. data):sub(-STDERR_MAX)
    end
  end)
  return handle, pid
end

local function run(cur, on_error, on_switch)
  cur.started = uv.now()
  local argv = cur.candidates[cur.index]
  cur.argv = argv
  local handle, pid = M.spawn(argv, cur.path, function(code, signal, stderr)
    if M.current ~= cur or cur.stopping then
      return
    end
    local how = signal ~= 0 and ("signal " .. signal) or ("code " .. code)
    local quick = uv.now() - cur.started < M.QUICK_MS
    if (code ~= 0 or signal ~= 0) and quick and cur.spawns == 1 and cur.index < #cur.candidates then
      table.insert(cur.failures, M.failure(argv, stderr, how))
      cur.index, cur.spawns = cur.index + 1, 0
      run(cur, on_error, on_switch) -- it cannot play here: the next player
      if M.current == cur then
        on_switch(cur.failures[#cur.failures])
      end
      return
    end
    cur.quick_exits = quick and cur.quick_exits + 1 or 0
    if (code ~= 0 and quick) or signal ~= 0 or cur.quick_exits >= 3 then
      M.current = nil
      table.insert(cur.failures, M.failure(argv, stderr, how))
      return on_error(errors.new(errors.CODE.PLAYER_FAILED, "cannot play it: "
        .. table.concat(cur.failures, "; ")))
    end
    run(cur, on_error, on_switch) -- the track ended: play it again
  end)
  if not handle then
    M.current = nil
    return on_error(errors.new(errors.CODE.PLAYER_FAILED, string.format("cannot start %s: %s", argv[1], pid)))
  end
  cur.handle, cur.pid, cur.spawns = handle, pid, cur.spawns + 1
end

--- Loop `path` until stop(); replaces what plays. on_error(err) if no player can play it;
--- on_switch(why) when a player failed and the next one plays.
---@return table|nil err
M.play = function(path, players, on_error, on_switch)
  local bad = M.check_path(path)
  if bad then
    return bad
  end
  M.stop()
  local candidates = M.find_all(players)
  if #candidates == 0 then
    return errors.new(errors.CODE.NO_PLAYER, string.format(
      "no audio player found (tried %s); install one or set players in setup()", M.names(players)))
  end
  M.current = { path = path, candidates = candidates, index = 1, failures = {}, quick_exits = 0, spawns = 0 }
  run(M.current, on_error or function() end, on_switch or function() end)
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

-- ------------------------------------------------------------------ :checkhealth

--- Write `sec` seconds of silence as a WAV (mono, 16-bit, 32 kHz) to `path`.
M.write_silence = function(path, sec)
  local rate = 32000
  local data = math.floor(rate * sec) * 2
  local function u32(n)
    return string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256)
  end
  local function u16(n)
    return string.char(n % 256, math.floor(n / 256) % 256)
  end
  local header = "RIFF" .. u32(36 + data) .. "WAVE" .. "fmt " .. u32(16) .. u16(1) .. u16(1) .. u32(rate)
    .. u32(rate * 2) .. u16(2) .. u16(16) .. "data" .. u32(data)
  local f = assert(io.open(path, "wb"))
  f:write(header, string.rep("\0", data))
  f:close()
end

--- Play `path` once with argv and wait (the editor keeps processing events) at most
--- `wait_ms`: true when it played (exited 0, or still plays then), else false and
--- "name: why".
M.probe = function(argv, path, wait_ms)
  local done, result = false, nil
  local handle = M.spawn(argv, path, function(code, signal, stderr)
    done = true
    result = { ok = code == 0 and signal == 0, why = M.failure(argv, stderr, signal ~= 0 and ("signal " .. signal)
      or ("code " .. code)) }
  end)
  if not handle then
    return false, M.name(argv) .. ": cannot start it"
  end
  vim.wait(wait_ms, function()
    return done
  end, 20)
  if not done then
    pcall(handle.kill, handle, "sigterm")
    return true, nil
  end
  return result.ok, result.why
end

return M
