-- lofi.nvim: generate lofi tracks with the local lofid daemon, watch the progress, and
-- loop them in the background. Every call is asynchronous: nothing here waits for lofid.
-- This module is the public API; each concept lives in the module named after it.
local uv = vim.uv or vim.loop
local config = require("lofi.config")
local daemon = require("lofi.daemon")
local download = require("lofi.download")
local errors = require("lofi.errors")
local jobs = require("lofi.jobs")
local util = require("lofi.util")

local M = {}

M.defaults = config.defaults
M.config = config.options
M.state = require("lofi.state")

--- Show an error (code + sentence), at the level its code deserves, once.
M.report = util.report

-- one augroup, created again (cleared) by setup; also without setup, the music stops
-- with the editor
local function create_autocmds()
  local aug = vim.api.nvim_create_augroup("Lofi", { clear = true })
  vim.api.nvim_create_autocmd("VimLeavePre", {
    desc = "lofi: stop the player",
    group = aug,
    callback = function()
      require("lofi.stream").stop()
      require("lofi.player").stop()
    end,
  })
end
create_autocmds()

---@param opts? table see lofi.config.defaults and :help lofi-setup
M.setup = function(opts)
  if vim.fn.has("nvim-0.7") == 0 then
    vim.notify("lofi: Neovim 0.7 or later is required", vim.log.levels.ERROR)
    return
  end
  M.config = config.set(opts)
  create_autocmds()
end

local play_stream -- below

--- Download the model (giving consent). cb(err) when it is complete or failed.
M.download_model = download.start

--- Generate a track. Returns at once; cb(err, record) when the track is finished.
---@param prompt string
---@param opts? {duration_sec?: number, duration?: number, seed?: integer, priority?: string, play?: boolean}
---@param cb? fun(err: table|nil, record: table|nil)
M.generate = function(prompt, opts, cb)
  opts = opts or {}
  local callbacks = {}
  if cb then
    table.insert(callbacks, cb)
  end
  local submit = { duration_sec = opts.duration_sec or opts.duration, seed = opts.seed, priority = opts.priority,
    allow_download = opts.allow_download }
  -- stream only where a player can read it (the rate is the model's, 32 kHz); else the file
  local streamable = opts.play and config.options.stream
    and #require("lofi.stream").find_all(config.options.stream_players, 32000) > 0
  if streamable then
    submit.stream = true
    submit.on_accepted = function(res)
      if res.status ~= "complete" then
        play_stream(res.track_id, prompt)
      end
    end
    table.insert(callbacks, function(err, record)
      if err then
        return require("lofi.stream").stop()
      end
      if record.cached or not require("lofi.stream").complete(record.track_id, record) then
        M.play(record) -- a cache hit, or nothing came from the stream: the file
      end
    end)
  elseif opts.play then
    table.insert(callbacks, function(err, record)
      if not err then
        M.play(record)
      end
    end)
  end
  jobs.submit(prompt, submit, callbacks)
end

--- The daemon's status map; cb(err, status).
M.status = function(cb)
  daemon.request("status", nil, cb)
end

--- Track records, newest first; cb(err, records).
M.tracks = function(cb, limit)
  daemon.request("tracks", limit and { limit = limit } or nil, cb)
end

--- One track record by id; cb(err, record).
M.track = function(track_id, cb)
  daemon.request("track", { track_id = track_id }, cb)
end

--- What a user calls a track: its prompt, else its file name.
local function title(track)
  if track.prompt then
    return "“" .. util.short(track.prompt) .. "”"
  end
  return vim.fn.fnamemodify(track.path, ":t")
end

local function play_track(track, quiet)
  local player = require("lofi.player")
  require("lofi.stream").stop()
  local err = player.play(track.path, config.options.players, function(play_err)
    util.report(play_err)
    util.fire("LofiError")
  end, function(failure)
    util.notify(string.format("%s playing %s with %s (%s)", config.options.icon, title(track),
      player.name(player.current.argv), failure), vim.log.levels.WARN)
  end)
  if err then
    return util.report(err)
  end
  player.current.title = title(track)
  if not quiet then
    util.notify(string.format("%s playing %s (%s)", config.options.icon, title(track),
      player.name(player.current.argv)))
  end
  util.fire("LofiPlay")
end

--- Play a track from lofid's stream as it is made; once it has played, its file loops.
play_stream = function(track_id, prompt)
  local stream = require("lofi.stream")
  require("lofi.player").stop()
  local track = { track_id = track_id, prompt = prompt }
  stream.follow(track_id, config.options.stream_players, {
    on_start = function(argv)
      util.notify(string.format("%s playing %s as it is made (%s)", config.options.icon, title(track),
        require("lofi.player").name(argv)))
      util.fire("LofiPlay")
    end,
    on_end = function(record)
      play_track(vim.tbl_extend("keep", record, track), true)
    end,
    on_error = function(err)
      util.report(err)
      util.fire("LofiError")
    end,
  })
end

--- The record this session knows for a WAV path (for its prompt), else {path}.
local function track_of(path)
  for _, record in pairs(M.state.tracks) do
    if record.path == path then
      return record
    end
  end
  return { path = path }
end

--- Loop a track in the background. `track`: a record, a track id, a WAV path, or nil
--- for the last finished track (else the newest in the cache).
M.play = function(track)
  if type(track) == "table" then
    return play_track(track)
  end
  if type(track) == "string" and track ~= "" then
    if track:match("^%x+$") and not uv.fs_stat(track) then
      return M.track(track, function(err, record)
        if err then
          return util.report(err)
        end
        if not record.path or record.status ~= "complete" then
          return util.report(errors.new(errors.CODE.TRACK_NOT_FOUND, string.format("track %s is %s, not finished yet",
            track, record.status or "unknown")))
        end
        play_track(record)
      end)
    end
    local path = vim.fn.fnamemodify(vim.fn.expand(track), ":p")
    if not uv.fs_stat(path) then
      return util.report(errors.new(errors.CODE.TRACK_NOT_FOUND, "no track or file " .. track))
    end
    return play_track(track_of(path))
  end
  if M.state.last_track then
    return play_track(M.state.last_track)
  end
  M.tracks(function(err, records)
    if err then
      return util.report(err)
    end
    if not records or #records == 0 then
      return util.report(errors.new(errors.CODE.TRACK_NOT_FOUND, "no tracks yet; make one with :LofiGenerate"))
    end
    play_track(records[1])
  end, 1)
end

--- Stop the music.
M.stop = function()
  local streamed = require("lofi.stream").stop()
  if require("lofi.player").stop() or streamed then
    util.notify("stopped")
  else
    util.notify("nothing is playing")
  end
  util.fire("LofiStop")
end

--- A statusline component (see lofi.statusline).
M.statusline = function()
  return require("lofi.statusline")()
end

return M
