-- :checkhealth lofi — the socket, the daemon (version, model, provider), a player, the log.
local M = {}

-- vim.health (0.8+; start/ok/... from 0.10) or require("health") (0.7)
local function reporter()
  local h = vim.health
  if h and h.start then
    return h
  end
  h = h or require("health")
  return { start = h.report_start, ok = h.report_ok, info = h.report_info, warn = h.report_warn,
    error = h.report_error }
end

local WAIT_MS = 3000

--- Wait (at most WAIT_MS, the editor keeps processing events) for a daemon request.
local function request_sync(method, arg)
  local done, err, result = false, nil, nil
  require("lofi.daemon").request(method, arg, function(e, r)
    done, err, result = true, e, r
  end, { timeout_ms = WAIT_MS, start = false })
  vim.wait(WAIT_MS + 500, function()
    return done
  end, 20)
  if not done then
    err = require("lofi.errors").new("TIMEOUT", "lofid did not answer " .. method .. " in time")
  end
  return err, result
end

local PROBE_SEC, PROBE_WAIT_MS = 0.2, 3000

--- Open the players with a short silent sample, in order, until one plays.
local function check_players(h, players)
  local player = require("lofi.player")
  local candidates = player.find_all(players)
  if #candidates == 0 then
    return h.warn("no audio player found (tried " .. player.names(players) .. ")",
      { "install pipewire (pw-play), pulseaudio-utils (paplay), alsa-utils (aplay), ffmpeg (ffplay) or mpv" })
  end
  local sample = vim.fn.tempname() .. ".wav"
  player.write_silence(sample, PROBE_SEC)
  local failed = {}
  for _, argv in ipairs(candidates) do
    local ok, why = player.probe(argv, sample, PROBE_WAIT_MS)
    local how = argv.loop and " (loops by itself)" or " (restarted at each end)"
    if ok then
      os.remove(sample)
      for _, failure in ipairs(failed) do
        h.warn("cannot play here: " .. failure)
      end
      return h.ok("player: " .. vim.fn.exepath(argv[1]) .. how .. ", played a silent sample")
    end
    table.insert(failed, why)
  end
  os.remove(sample)
  h.error("no player could play a silent sample: " .. table.concat(failed, "; "),
    { "check the sound setup (is a sound server running?), or set players in setup()" })
end

M.check = function()
  local h = reporter()
  local daemon = require("lofi.daemon")
  local errors = require("lofi.errors")
  local cfg = require("lofi.config").options

  h.start("lofi: Neovim")
  if vim.fn.has("nvim-0.7") == 1 then
    local v = vim.version()
    h.ok(string.format("Neovim %d.%d.%d", v.major, v.minor, v.patch))
  else
    h.error("Neovim 0.7 or later is required")
  end
  if not (vim.mpack and vim.mpack.Unpacker) then
    h.error("vim.mpack.Unpacker is missing: this Neovim cannot decode the daemon's stream")
  end

  h.start("lofi: daemon")
  local socket, source = daemon.socket_path()
  h.info(string.format("socket: %s (%s)", socket, source))
  local lofid = type(cfg.lofid_cmd) == "string" and cfg.lofid_cmd or cfg.lofid_cmd[1]
  local has_lofid = vim.fn.executable(lofid) == 1
  -- never start the daemon from a health check: ask only if something answers
  local err, s = request_sync("status", nil)
  if err then
    local advice = {}
    if err.code == errors.CODE.NOT_RUNNING then
      table.insert(advice, "start it: :LofiDaemon start, `lofid`, or `systemctl --user start lofid`")
      if not cfg.auto_start then
        table.insert(advice, "or let the plugin start it: require('lofi').setup({ auto_start = true })")
      end
      table.insert(advice, "check the socket path: set `socket` in setup() or $LOFID_SOCKET like the daemon's --socket")
    end
    h.error("lofid is not reachable: " .. errors.format(err), advice)
  else
    h.ok(string.format("lofid %s is running (pid %s, protocol %s, up %ds)", s.version or "?", s.pid or "?",
      s.protocol or "?", math.floor(s.uptime_sec or 0)))
    local m = s.model or {}
    local model = string.format("model %s: %s (version %s)", m.variant or "?", m.state or "?",
      m.model_version or "unknown")
    if m.state == "missing" then
      h.warn(model, { "it is downloaded on the first :LofiGenerate (after asking), or with `lofictl models download`" })
    elseif m.state == "failed" or m.state == "error" then
      h.error(model)
    else
      h.ok(model)
    end
    if m.provider then
      h.ok(string.format("device %s, provider %s", m.device or "?", m.provider))
    else
      h.info("device and provider are known once the model is loaded (first generation)")
    end
    if s.worker and s.worker.restarts and s.worker.restarts > 0 then
      h.warn(string.format("the worker was restarted %d time(s)", s.worker.restarts))
    end
  end
  if has_lofid then
    h.ok("`" .. lofid .. "` found: " .. vim.fn.exepath(lofid))
  elseif cfg.auto_start then
    h.error("auto_start is on but `" .. lofid .. "` is not executable", { "install lofid or set lofid_cmd in setup()" })
  else
    h.info("`" .. lofid .. "` is not on PATH (needed only for auto_start)")
  end
  h.info("auto_start: " .. tostring(cfg.auto_start) .. "; log of an auto-started lofid: " .. daemon.log_path())
  local last = daemon.last_start
  if last then
    h.info(string.format("last auto-start: pid %s%s", last.pid, last.exit and (", exited with " .. last.exit) or ""))
  end

  local util = require("lofi.util")
  if util.last_error then
    h.info(string.format("last error (%s): %s", os.date("%H:%M:%S", util.last_error.at), util.last_error.text))
  end

  h.start("lofi: playback")
  check_players(h, cfg.players)
  local stream_player = require("lofi.stream").find_all(cfg.stream_players, 32000)[1]
  if not cfg.stream then
    h.info("stream = false: tracks play once they are finished")
  elseif stream_player then
    h.ok("stream player (tracks play as they are made): " .. vim.fn.exepath(stream_player[1]))
  else
    h.warn("no player that reads raw audio found (tried " .. require("lofi.stream").names(cfg.stream_players)
      .. "): tracks play once they are finished",
      { "install pipewire (pw-play), pulseaudio-utils (paplay), alsa-utils (aplay), ffmpeg, mpv or sox" })
  end
end

return M
