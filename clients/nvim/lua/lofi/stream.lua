-- Playing a track while lofid makes it: the PCM of its audio_chunk notifications (s16le
-- mono) goes to the standard input of a player that reads raw PCM, through a libuv pipe
-- (writes are queued, never waited for). The player starts start_after_sec after chunk 0,
-- so that no chunk arrives after its play time; the last chunk closes its input. When it
-- has played the track to the end, the finished file loops (lofi.player) as any track.
local uv = vim.uv or vim.loop
local daemon = require("lofi.daemon")
local errors = require("lofi.errors")
local player = require("lofi.player")

local M = {}

-- name -> argv of a player reading raw PCM on stdin; "{rate}" becomes the sample rate
M.KNOWN = {
  ["pw-play"] = { "pw-play", "--rate", "{rate}", "--channels", "1", "--format", "s16", "-" },
  ["pw-cat"] = { "pw-cat", "--playback", "--rate", "{rate}", "--channels", "1", "--format", "s16", "-" },
  paplay = { "paplay", "--raw", "--format=s16le", "--rate={rate}", "--channels=1" },
  aplay = { "aplay", "-q", "-t", "raw", "-f", "S16_LE", "-r", "{rate}", "-c", "1", "-" },
  ffplay = { "ffplay", "-nodisp", "-autoexit", "-loglevel", "error", "-f", "s16le", "-ar", "{rate}", "-i", "-" },
  mpv = { "mpv", "--no-video", "--really-quiet", "--demuxer=rawaudio", "--demuxer-rawaudio-format=s16le",
    "--demuxer-rawaudio-rate={rate}", "--demuxer-rawaudio-channels=1", "-" },
  play = { "play", "-q", "-t", "raw", "-e", "signed-integer", "-b", "16", "-L", "-r", "{rate}", "-c", "1", "-" },
}

local EARLY_MAX = 64 -- chunks kept for a track not followed yet (they can come before its id)

M.current = nil -- the track that plays from the stream (see follow)
local early = {} -- track_id -> chunks that came before follow()

--- A stream_players entry (a name, or an argv table with "{rate}") as an argv for `rate`.
local function entry_argv(entry, rate)
  local argv = type(entry) == "string" and vim.deepcopy(M.KNOWN[entry] or { entry }) or vim.deepcopy(entry)
  for i, arg in ipairs(argv) do
    argv[i] = (arg:gsub("{rate}", tostring(rate)))
  end
  return argv
end

--- The available players of `players` for `rate`, in order.
M.find_all = function(players, rate)
  local found = {}
  for _, entry in ipairs(players) do
    local argv = entry_argv(entry, rate)
    if argv[1] and vim.fn.executable(argv[1]) == 1 then
      table.insert(found, argv)
    end
  end
  return found
end

--- The players' names, for messages.
M.names = function(players)
  return table.concat(vim.tbl_map(function(e)
    return type(e) == "string" and e or tostring(e[1])
  end, players), ", ")
end

M.is_playing = function()
  return M.current ~= nil and M.current.handle ~= nil
end

local function close_stdin(cur)
  local stdin = cur.stdin
  cur.stdin = nil
  if stdin and not stdin:is_closing() then
    stdin:shutdown(function()
      stdin:close()
    end)
  end
end

local function feed(cur, pcm)
  if cur.stdin then
    cur.stdin:write(pcm) -- queued by libuv; a player that died shows in its exit
  end
end

local start_player

local function on_player_exit(cur, argv, code, signal, stderr)
  cur.handle = nil
  if cur.stdin then
    close_stdin(cur)
  end
  if M.current ~= cur or cur.stopping then
    return
  end
  local failed = code ~= 0 or signal ~= 0
  if failed and cur.index < #cur.candidates and uv.now() - cur.started < player.QUICK_MS then
    table.insert(cur.failures, player.failure(argv, stderr, "code " .. code))
    cur.index = cur.index + 1
    return start_player(cur) -- it cannot play here: the next one, from the start
  end
  if failed or not cur.ended then
    M.current = nil
    table.insert(cur.failures, player.failure(argv, stderr, signal ~= 0 and ("signal " .. signal) or ("code " .. code)))
    return cur.on_error(errors.new(errors.CODE.PLAYER_FAILED, "cannot play the stream: "
      .. table.concat(cur.failures, "; ")))
  end
  cur.played = true -- to the end: the file loops from now on, once lofid has written it
  if cur.record then
    M.current = nil
    cur.on_end(cur.record)
  end
end

start_player = function(cur)
  local argv = cur.candidates[cur.index]
  local stdin = uv.new_pipe(false)
  cur.started = uv.now()
  local handle, pid = player.spawn(argv, nil, function(code, signal, stderr)
    on_player_exit(cur, argv, code, signal, stderr)
  end, stdin)
  if not handle then
    stdin:close()
    table.insert(cur.failures, player.name(argv) .. ": cannot start it (" .. tostring(pid) .. ")")
    if cur.index < #cur.candidates then
      cur.index = cur.index + 1
      return start_player(cur)
    end
    M.current = nil
    return cur.on_error(errors.new(errors.CODE.PLAYER_FAILED, "cannot play the stream: "
      .. table.concat(cur.failures, "; ")))
  end
  cur.handle, cur.pid, cur.stdin, cur.argv = handle, pid, stdin, argv
  for _, pcm in ipairs(cur.chunks) do
    feed(cur, pcm)
  end
  if cur.ended then
    close_stdin(cur)
  end
  cur.on_start(argv)
end

--- Start the player now (chunk 0's wait is over, or the whole track is here already).
local function start_now(cur)
  if cur.timer then
    cur.timer:stop()
    cur.timer:close()
    cur.timer = nil
  end
  if cur.handle or M.current ~= cur then
    return
  end
  cur.candidates = M.find_all(cur.players, cur.rate)
  if #cur.candidates == 0 then
    M.current = nil
    return cur.on_error(errors.new(errors.CODE.NO_PLAYER, string.format(
      "no player that reads raw audio found (tried %s); set stream_players in setup()", M.names(cur.players))))
  end
  cur.index, cur.failures = 1, {}
  start_player(cur)
end

--- One chunk of the followed track. Chunks that come again (the generation sent again
--- after lofid came back starts from chunk 0) are cut to what is new.
local function add(cur, chunk)
  local have = cur.bytes
  local start = (chunk.offset or 0) * 2
  local pcm = chunk.pcm or ""
  if start + #pcm <= have then
    pcm = ""
  elseif start < have then
    pcm = pcm:sub(have - start + 1)
  end
  if #pcm > 0 then
    table.insert(cur.chunks, pcm)
    cur.bytes = cur.bytes + #pcm
    feed(cur, pcm)
  end
  cur.rate = chunk.sample_rate or cur.rate
  if chunk.last then
    cur.ended = true
    if cur.handle then
      close_stdin(cur)
    else
      start_now(cur)
    end
  elseif chunk.seq == 0 and not cur.handle and not cur.timer then
    local wait = math.max(0, tonumber(chunk.start_after_sec) or 0)
    cur.timer = uv.new_timer()
    cur.timer:start(math.floor(wait * 1000), 0, vim.schedule_wrap(function()
      start_now(cur)
    end))
  end
end

--- Play `track_id` from lofid's stream as it comes. handlers: on_start(argv) when the
--- player starts, on_end(record) once it played the track to the end and the track is
--- complete, on_error(err).
M.follow = function(track_id, players, handlers)
  M.stop()
  local cur = { track_id = track_id, players = players, chunks = {}, bytes = 0, rate = 32000,
    on_start = handlers.on_start, on_end = handlers.on_end, on_error = handlers.on_error }
  M.current = cur
  for _, chunk in ipairs(early[track_id] or {}) do
    add(cur, chunk)
  end
  early = {}
end

--- The followed track is finished: `record` (its WAV) is what loops once the stream has
--- played. False when it never played from the stream (no chunk came): play the file.
M.complete = function(track_id, record)
  local cur = M.current
  if not cur or cur.track_id ~= track_id then
    return true -- stopped meanwhile
  end
  cur.record = record
  if cur.bytes == 0 then
    M.stop()
    return false
  end
  if cur.played then
    M.current = nil
    cur.on_end(record)
  end
  return true
end

--- Stop what plays from the stream; true if something did.
M.stop = function()
  local cur = M.current
  M.current = nil
  if not cur then
    return false
  end
  cur.stopping = true
  if cur.timer then
    cur.timer:stop()
    cur.timer:close()
    cur.timer = nil
  end
  close_stdin(cur)
  if cur.handle and not cur.handle:is_closing() then
    pcall(cur.handle.kill, cur.handle, "sigterm")
  end
  return true
end

daemon.on("notification", function(method, chunk)
  if method ~= "audio_chunk" then
    return
  end
  local cur = M.current
  if cur and cur.track_id == chunk.track_id then
    return add(cur, chunk)
  end
  local list = early[chunk.track_id] or {}
  if #list < EARLY_MAX then
    table.insert(list, chunk)
  end
  early = { [chunk.track_id] = list } -- only the newest track's
end)

return M
