-- lofi.nvim: generate lofi tracks with the local lofid daemon, watch the progress, and
-- loop them in the background. Every call is asynchronous: nothing here waits for lofid.
local uv = vim.uv or vim.loop
local errors = require("lofi.errors")
local daemon = require("lofi.daemon")

local M = {}

M.defaults = {
  -- the daemon's socket; nil = lofid's default ($LOFID_SOCKET, $XDG_RUNTIME_DIR/lofid/lofid.sock, ...)
  socket = nil,
  -- start lofid (detached) when nothing answers on the socket
  auto_start = false,
  -- the command that runs the daemon (`--socket <path>` is appended)
  lofid_cmd = { "lofid" },
  -- where an auto-started lofid writes its log
  log_file = vim.fn.stdpath("cache") .. "/lofi/lofid.log",
  start_timeout_ms = 30000,
  request_timeout_ms = 10000,
  -- reconnect after lofid went away, and send again the generations it lost
  reconnect = true,
  reconnect_timeout_ms = 10 * 60 * 1000,
  resume = true,
  -- generate defaults
  duration_sec = 30,
  priority = "normal",
  -- play each finished track (from :LofiGenerate) right away
  play_on_complete = false,
  -- audio players, the first one found is used: names or argv tables ({cmd, args..., loop = true})
  players = { "pw-play", "paplay", "aplay", "afplay", "ffplay", "mpv" },
  -- at most one progress message per this many ms (the statusline shows every step)
  progress_interval_ms = 2000,
  -- the statusline icon
  icon = "♪",
}

M.config = vim.deepcopy(M.defaults)

local SLOW_REQUEST_MS = 60000 -- generate / download_model: the first locate may hash the model

M.state = {
  jobs = {}, -- track_id -> job: {track_id, prompt, seed, duration_sec, priority, status, percent, eta_sec, ...}
  tracks = {}, -- track_id -> track record, for the tracks finished in this session
  last_track = nil, -- the last finished track record
  interrupted = {}, -- jobs lost when lofid went away, sent again when it comes back
  lost = false, -- lofid went away and has not come back
  download = nil, -- {percent, file, waiters} while a model download runs
}

local function notify(msg, level, opts)
  return vim.notify("lofi: " .. msg, level or vim.log.levels.INFO, vim.tbl_extend("force", { title = "lofi" }, opts or {}))
end

--- Show an error (code + sentence), at the level its code deserves.
--- Show an error (code + sentence), at the level its code deserves, once.
M.report = function(err, prefix)
  if err.reported then
    return
  end
  err.reported = true
  local hint = err.hint and ("; " .. err.hint) or ""
  return notify((prefix or "") .. errors.format(err) .. hint, err.level or errors.level_for_code(err.code))
end

local function fire(pattern)
  pcall(vim.api.nvim_exec_autocmds, "User", { pattern = pattern, modeline = false })
  pcall(vim.cmd, "redrawstatus")
end

local function short(prompt)
  prompt = prompt or ""
  return vim.fn.strchars(prompt) > 40 and (vim.fn.strcharpart(prompt, 0, 37) .. "...") or prompt
end

local function clock(sec)
  sec = math.max(0, math.floor(sec + 0.5))
  return string.format("%d:%02d", math.floor(sec / 60), sec % 60)
end

-- shared with lofi.commands
M._notify, M._short, M._clock = notify, short, clock

-- one augroup, created again (cleared) by setup; also without setup, the music stops
-- with the editor
local function create_autocmds()
  local aug = vim.api.nvim_create_augroup("Lofi", { clear = true })
  vim.api.nvim_create_autocmd("VimLeavePre", {
    desc = "lofi: stop the player",
    group = aug,
    callback = function()
      require("lofi.player").stop()
    end,
  })
end
create_autocmds()

---@param opts? table see M.defaults and :help lofi-setup
M.setup = function(opts)
  if vim.fn.has("nvim-0.7") == 0 then
    vim.notify("lofi: Neovim 0.7 or later is required", vim.log.levels.ERROR)
    return
  end
  M.config = vim.tbl_extend("force", vim.deepcopy(M.defaults), opts or {})
  create_autocmds()
end

-- ------------------------------------------------------------------ progress messages

-- One message per job, replaced in place where vim.notify supports it (nvim-notify's
-- `replace`), and otherwise throttled to one per progress_interval_ms.
local function progress_message(job, msg, level, force)
  local now = uv.now()
  if not force and job.notified_at and now - job.notified_at < M.config.progress_interval_ms then
    return
  end
  job.notified_at = now
  local ok, record = pcall(notify, msg, level, { replace = job.notify_record, hide_from_history = not force })
  if ok and type(record) == "table" then
    job.notify_record = record
  end
end

local function job_line(job)
  if job.status == "queued" then
    local pos = job.position or 0
    return string.format("queued “%s” (%s)", short(job.prompt), pos == 0 and "next" or (pos .. " ahead"))
  end
  local eta = job.eta_sec and (" ~" .. clock(job.eta_sec)) or ""
  return string.format("generating “%s” %d%%%s", short(job.prompt), job.percent or 0, eta)
end

-- ------------------------------------------------------------------ notifications

local function finish_job(job, err, record)
  M.state.jobs[job.track_id] = nil
  for _, cb in ipairs(job.callbacks) do
    require("lofi.rpc").safe_call(cb, err, record)
  end
end

local handlers = {}

-- The last notification for a track this client does not know yet (a notification can
-- come before the generate response); replayed when the job is created.
local orphans, orphan_count = {}, 0
local function keep_orphan(method, p)
  if type(p.track_id) ~= "string" then
    return
  end
  local old = orphans[p.track_id]
  if old and old.method ~= "generation_progress" and method == "generation_progress" then
    return -- an end beats a progress step
  end
  if orphan_count > 100 then
    orphans, orphan_count = {}, 0
  end
  orphan_count = orphan_count + (old and 0 or 1)
  orphans[p.track_id] = { method = method, payload = p }
end

handlers.generation_progress = function(p)
  local job = M.state.jobs[p.track_id]
  if not job then
    return keep_orphan("generation_progress", p)
  end
  job.status, job.percent, job.eta_sec = "running", p.percent, p.eta_sec
  progress_message(job, job_line(job))
  fire("LofiProgress")
end

handlers.generation_complete = function(record)
  local job = M.state.jobs[record.track_id]
  if not job then
    return keep_orphan("generation_complete", record)
  end
  M.state.tracks[record.track_id] = record
  M.state.last_track = record
  progress_message(job, string.format("%s ready: %s", M.config.icon, record.path), vim.log.levels.INFO, true)
  finish_job(job, nil, record)
  fire("LofiComplete")
end

handlers.generation_error = function(p)
  local job = M.state.jobs[p.track_id]
  if not job then
    return keep_orphan("generation_error", p)
  end
  local err = errors.normalize(p)
  job.notify_record = nil -- an error is a message of its own, kept in the history
  M.report(err, string.format("“%s” failed: ", short(job.prompt)))
  finish_job(job, err, nil)
  fire("LofiError")
end

handlers.download_progress = function(p)
  local dl = M.state.download
  if not dl then
    return
  end
  dl.percent, dl.file = p.percent or 0, p.file
  progress_message(dl, string.format("downloading the model: %d%% (%s)", dl.percent, p.file or "?"))
  fire("LofiProgress")
end

local function download_done(err)
  local dl = M.state.download
  if not dl then
    return
  end
  M.state.download = nil
  if err then
    M.report(err, "model download failed: ")
  else
    progress_message(dl, "model downloaded", vim.log.levels.INFO, true)
  end
  for _, cb in ipairs(dl.waiters) do
    require("lofi.rpc").safe_call(cb, err)
  end
  fire(err and "LofiError" or "LofiProgress")
end

handlers.download_complete = function()
  download_done(nil)
end

handlers.download_error = function(p)
  download_done(errors.normalize(vim.tbl_extend("keep", p, { code = errors.CODE.MODEL_DOWNLOAD_FAILED })))
end

local function on_disconnect(err)
  local lost = {}
  for id, job in pairs(M.state.jobs) do
    table.insert(lost, job)
    M.state.jobs[id] = nil
  end
  if #lost == 0 and not M.state.download then
    return -- nothing in flight: an idle lofid may exit; the next request connects again
  end
  M.state.lost = true
  local what = ""
  if #lost > 0 then
    local names = {}
    for _, job in ipairs(lost) do
      table.insert(names, string.format("“%s” (%d%%)", short(job.prompt), job.percent or 0))
    end
    what = " while generating " .. table.concat(names, ", ")
  end
  local resume = (#lost > 0 and M.config.resume and M.config.reconnect) and "; it will be sent again when lofid is back"
    or ""
  M.report(errors.new(errors.CODE.DISCONNECTED, "lofid went away" .. what .. resume .. " (" .. err.message .. ")"))
  if M.config.resume and M.config.reconnect then
    vim.list_extend(M.state.interrupted, lost)
  else
    for _, job in ipairs(lost) do
      finish_job(job, errors.new(errors.CODE.DISCONNECTED, "lofid went away before the track was finished"), nil)
    end
  end
  if M.state.download then
    download_done(errors.new(errors.CODE.DISCONNECTED, "lofid went away during the model download"))
  end
  daemon.reconnect()
  fire("LofiError")
end

local function on_connect()
  if not M.state.lost then
    return
  end
  M.state.lost = false
  local again = M.state.interrupted
  M.state.interrupted = {}
  if #again == 0 then
    notify("reconnected to lofid")
  else
    notify(string.format("reconnected to lofid; sending %d interrupted generation(s) again", #again))
  end
  for _, job in ipairs(again) do
    M.generate(job.prompt, {
      duration_sec = job.duration_sec,
      seed = job.seed,
      priority = job.priority,
      _callbacks = job.callbacks,
    })
  end
  fire("LofiProgress")
end

daemon.on("notification", function(method, payload)
  local handler = handlers[method]
  if handler then
    handler(payload)
  end
end)
daemon.on("disconnect", on_disconnect)
daemon.on("connect", on_connect)

-- ------------------------------------------------------------------ consent

--- Ask once whether to download the model; then download it with progress. cb(err).
local function ask_consent(err, cb)
  if M.state.download then -- a download is running already: wait for it
    return table.insert(M.state.download.waiters, cb)
  end
  local size = errors.download_size(err)
  local question = string.format("lofid needs the %s model (%s from %s). Download it now?",
    err.variant or "MusicGen", size, err.repo or "Hugging Face")
  local yes = "Download " .. size
  vim.ui.select({ yes, "Not now" }, { prompt = question }, function(choice)
    if choice ~= yes then
      return cb(errors.new(errors.CODE.MODEL_NOT_FOUND, err.message .. " (download declined)",
        { level = vim.log.levels.WARN }))
    end
    M.download_model({ variant = err.variant }, cb)
  end)
end

--- Download the model (giving consent). cb(err) when it is complete or failed.
M.download_model = function(opts, cb)
  cb = cb or function() end
  if M.state.download then
    return table.insert(M.state.download.waiters, cb)
  end
  M.state.download = { percent = 0, waiters = { cb } }
  progress_message(M.state.download, "downloading the model...", vim.log.levels.INFO, true)
  daemon.request("download_model", opts and opts.variant and { variant = opts.variant } or nil, function(req_err)
    if req_err then
      download_done(req_err)
    end
  end, { timeout_ms = math.max(M.config.request_timeout_ms, SLOW_REQUEST_MS) })
end

-- ------------------------------------------------------------------ the API

--- Generate a track. Returns at once; cb(err, record) when the track is finished.
---@param prompt string
---@param opts? {duration_sec?: number, seed?: integer, priority?: string, play?: boolean}
---@param cb? fun(err: table|nil, record: table|nil)
M.generate = function(prompt, opts, cb)
  opts = opts or {}
  local callbacks = opts._callbacks or {}
  if cb then
    table.insert(callbacks, cb)
  end
  if opts.play then
    table.insert(callbacks, function(err, record)
      if not err then
        M.play(record)
      end
    end)
  end
  local arg = {
    prompt = prompt,
    duration_sec = opts.duration_sec or M.config.duration_sec,
    priority = opts.priority or M.config.priority,
    seed = opts.seed,
    allow_download = opts.allow_download,
  }
  local function fail(err)
    M.report(err)
    for _, fn in ipairs(callbacks) do
      require("lofi.rpc").safe_call(fn, err, nil)
    end
  end
  -- lofid answers generate once it has located the model (hashing a --model-dir the first time)
  daemon.request("generate", arg, function(err, res)
    if err and err.code == errors.CODE.MODEL_NOT_FOUND and err.consent_required and not opts._consent_asked then
      return ask_consent(err, function(consent_err)
        if consent_err then
          return fail(consent_err)
        end
        local again = vim.tbl_extend("force", opts, { _consent_asked = true, allow_download = true, _callbacks = callbacks })
        again.play = nil
        M.generate(prompt, again)
      end)
    elseif err then
      return fail(err)
    end
    if res.status == "complete" then
      local record = { track_id = res.track_id, path = res.path, prompt = prompt, seed = res.seed, cached = true,
        duration_sec = arg.duration_sec, status = "complete" }
      M.state.tracks[res.track_id] = vim.tbl_extend("keep", M.state.tracks[res.track_id] or {}, record)
      M.state.last_track = M.state.tracks[res.track_id]
      notify(string.format("%s ready (cached): %s", M.config.icon, res.path))
      for _, fn in ipairs(callbacks) do
        require("lofi.rpc").safe_call(fn, nil, M.state.last_track)
      end
      return fire("LofiComplete")
    end
    local job = M.state.jobs[res.track_id]
    if job then -- the same track asked twice: one job, every callback
      vim.list_extend(job.callbacks, callbacks)
      return
    end
    job = { track_id = res.track_id, prompt = prompt, seed = res.seed, duration_sec = arg.duration_sec,
      priority = arg.priority, status = res.status, position = res.position, percent = 0, callbacks = callbacks }
    M.state.jobs[res.track_id] = job
    progress_message(job, job_line(job), vim.log.levels.INFO, true)
    fire("LofiProgress")
    local early = orphans[res.track_id]
    if early then
      orphans[res.track_id], orphan_count = nil, orphan_count - 1
      handlers[early.method](early.payload)
    end
  end, { timeout_ms = math.max(M.config.request_timeout_ms, SLOW_REQUEST_MS) })
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

local function play_path(path)
  local player = require("lofi.player")
  local err = player.play(path, M.config.players, function(play_err)
    M.report(play_err)
    fire("LofiError")
  end)
  if err then
    return M.report(err)
  end
  notify(string.format("%s playing %s (%s)", M.config.icon, vim.fn.fnamemodify(path, ":t"), player.current.argv[1]))
  fire("LofiPlay")
end

--- Loop a track in the background. `track`: a record, a track id, a WAV path, or nil
--- for the last finished track (else the newest in the cache).
M.play = function(track)
  if type(track) == "table" then
    return play_path(track.path)
  end
  if type(track) == "string" and track ~= "" then
    if track:match("^%x+$") and not uv.fs_stat(track) then
      return M.track(track, function(err, record)
        if err then
          return M.report(err)
        end
        if not record.path or record.status ~= "complete" then
          return M.report(errors.new(errors.CODE.TRACK_NOT_FOUND, string.format("track %s is %s, not finished yet",
            track, record.status or "unknown")))
        end
        play_path(record.path)
      end)
    end
    local path = vim.fn.expand(track)
    if not uv.fs_stat(path) then
      return M.report(errors.new(errors.CODE.TRACK_NOT_FOUND, "no track or file " .. track))
    end
    return play_path(path)
  end
  if M.state.last_track then
    return play_path(M.state.last_track.path)
  end
  M.tracks(function(err, records)
    if err then
      return M.report(err)
    end
    if not records or #records == 0 then
      return M.report(errors.new(errors.CODE.TRACK_NOT_FOUND, "no tracks yet; make one with :LofiGenerate"))
    end
    play_path(records[1].path)
  end, 1)
end

--- Stop the music.
M.stop = function()
  if require("lofi.player").stop() then
    notify("stopped")
  else
    notify("nothing is playing")
  end
  fire("LofiStop")
end

--- A statusline component: "♪ 45% ~0:12" while generating, "♪ queued", "♪ ↓ 30%" while
--- downloading the model, "♪ offline" after lofid went away mid-job, "♪" while playing.
M.statusline = function()
  local icon = M.config.icon
  local running, queued = nil, 0
  for _, job in pairs(M.state.jobs) do
    if job.status == "running" then
      running = job
    else
      queued = queued + 1
    end
  end
  local more = queued > 0 and string.format(" +%d", queued) or ""
  if running then
    local eta = running.eta_sec and (" ~" .. clock(running.eta_sec)) or ""
    return string.format("%s %d%%%s%s", icon, running.percent or 0, eta, more)
  elseif queued > 0 then
    return string.format("%s queued%s", icon, queued > 1 and (" " .. queued) or "")
  elseif M.state.download then
    return string.format("%s ↓ %d%%", icon, M.state.download.percent or 0)
  elseif M.state.lost and #M.state.interrupted > 0 then
    return icon .. " offline"
  elseif require("lofi.player").is_playing() then
    return icon
  end
  return ""
end

return M
