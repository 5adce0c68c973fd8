-- Generations from request to finished track: the generate request (asking for the
-- download consent when lofid needs it), the jobs' progress, completion and errors from
-- lofid's notifications, and resuming the jobs lofid lost when it went away.
local config = require("lofi.config")
local consent = require("lofi.consent")
local daemon = require("lofi.daemon")
local download = require("lofi.download")
local errors = require("lofi.errors")
local rpc = require("lofi.rpc")
local state = require("lofi.state")
local util = require("lofi.util")

local M = {}

--- The one-line progress message of a job (the prompt last: it is what a narrow message
--- area cuts).
M.line = function(job)
  if job.status == "queued" then
    local pos = job.position or 0
    return string.format("queued (%s): “%s”", pos == 0 and "next" or (pos .. " ahead"), util.short(job.prompt))
  end
  local eta = job.eta_sec and (" ~" .. util.clock(job.eta_sec)) or ""
  return string.format("generating %d%%%s: “%s”", job.percent or 0, eta, util.short(job.prompt))
end

-- A job lofid could not finish because it went away or shut down: sent again when it is
-- back (resume), unless it was stopped with :LofiDaemon stop.
local function resumable()
  return config.options.resume and config.options.reconnect and daemon.intent ~= "stop"
end

local function interrupt(job)
  state.jobs[job.track_id] = nil
  state.lost = true
  table.insert(state.interrupted, job)
end

local function finish(job, err, record)
  state.jobs[job.track_id] = nil
  for _, cb in ipairs(job.callbacks) do
    rpc.safe_call(cb, err, record)
  end
end

local function call_all(callbacks, err, record)
  for _, fn in ipairs(callbacks) do
    rpc.safe_call(fn, err, record)
  end
end

-- ------------------------------------------------------------------ notifications

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

local function replay_orphan(track_id)
  local early = orphans[track_id]
  if early then
    orphans[track_id], orphan_count = nil, orphan_count - 1
    handlers[early.method](early.payload)
  end
end

handlers.generation_progress = function(p)
  local job = state.jobs[p.track_id]
  if not job then
    return keep_orphan("generation_progress", p)
  end
  job.status, job.percent, job.eta_sec = "running", p.percent, p.eta_sec
  util.progress(job, M.line(job))
  util.fire("LofiProgress")
end

handlers.generation_complete = function(record)
  local job = state.jobs[record.track_id]
  if not job then
    return keep_orphan("generation_complete", record)
  end
  state.tracks[record.track_id] = record
  state.last_track = record
  util.progress(job, string.format("%s ready: %s", config.options.icon, record.path), vim.log.levels.INFO, true)
  finish(job, nil, record)
  util.fire("LofiComplete")
end

handlers.generation_error = function(p)
  local job = state.jobs[p.track_id]
  if not job then
    return keep_orphan("generation_error", p)
  end
  local err = errors.normalize(p)
  if err.shutting_down and resumable() then
    return interrupt(job) -- the disconnect that follows says so, and reconnecting resumes it
  elseif err.shutting_down and daemon.intent == "stop" then
    err = errors.new(errors.CODE.CANCELLED, string.format("“%s” (%d%%) was not finished: lofid was stopped",
      util.short(job.prompt), job.percent or 0))
    util.report(err)
    return finish(job, err, nil)
  end
  job.notify_record = nil -- an error is a message of its own, kept in the history
  util.report(err, string.format("“%s” failed: ", util.short(job.prompt)))
  finish(job, err, nil)
  util.fire("LofiError")
end

daemon.on("notification", function(method, payload)
  local handler = handlers[method]
  if handler then
    handler(payload)
  end
end)

-- ------------------------------------------------------------------ generate

--- A generate request that gave a track id (queued, running or already in the cache).
local function accepted(prompt, arg, res, callbacks)
  if res.status == "complete" then
    local record = { track_id = res.track_id, path = res.path, prompt = prompt, seed = res.seed, cached = true,
      duration_sec = arg.duration_sec, status = "complete" }
    state.tracks[res.track_id] = vim.tbl_extend("keep", state.tracks[res.track_id] or {}, record)
    state.last_track = state.tracks[res.track_id]
    util.notify(string.format("%s ready (cached): %s", config.options.icon, res.path))
    call_all(callbacks, nil, state.last_track)
    return util.fire("LofiComplete")
  end
  local job = state.jobs[res.track_id]
  if job then -- the same track asked twice: one job, every callback
    vim.list_extend(job.callbacks, callbacks)
    return
  end
  job = { track_id = res.track_id, prompt = prompt, seed = res.seed, duration_sec = arg.duration_sec,
    priority = arg.priority, stream = arg.stream, status = res.status, position = res.position, percent = 0,
    callbacks = callbacks }
  state.jobs[res.track_id] = job
  util.progress(job, M.line(job)) -- the first one shows at once
  util.fire("LofiProgress")
  replay_orphan(res.track_id)
end

--- Ask lofid for a track; every callback(err, record) runs once, when it is finished or
--- failed. opts: duration_sec, seed, priority, allow_download, stream (send its audio as
--- it is made: a lofid that cannot is asked again without), on_accepted(result).
M.submit = function(prompt, opts, callbacks)
  local arg = {
    prompt = prompt,
    duration_sec = opts.duration_sec or config.options.duration_sec,
    priority = opts.priority or config.options.priority,
    seed = opts.seed,
    allow_download = opts.allow_download,
    stream = opts.stream or nil,
  }
  local function fail(err)
    util.report(err)
    call_all(callbacks, err, nil)
  end
  -- lofid answers generate once it has located the model (hashing a --model-dir the first time)
  daemon.request("generate", arg, function(err, res)
    if err and err.code == errors.CODE.MODEL_NOT_FOUND and err.consent_required and not opts.consent_asked then
      return consent.ask(err, function(consent_err)
        if consent_err then
          return fail(consent_err)
        end
        M.submit(prompt, vim.tbl_extend("force", opts, { consent_asked = true, allow_download = true }), callbacks)
      end)
    elseif err and err.code == errors.CODE.INVALID_PARAMS and arg.stream and err.message:find("stream") then
      return M.submit(prompt, vim.tbl_extend("force", opts, { stream = false }), callbacks) -- an older lofid
    elseif err and err.shutting_down and resumable() then
      return interrupt({ prompt = prompt, seed = arg.seed, duration_sec = arg.duration_sec, priority = arg.priority,
        stream = arg.stream, track_id = "", percent = 0, callbacks = callbacks })
    elseif err then
      return fail(err)
    end
    if opts.on_accepted then
      rpc.safe_call(opts.on_accepted, res)
    end
    accepted(prompt, arg, res, callbacks)
  end, { timeout_ms = math.max(config.options.request_timeout_ms, download.SLOW_REQUEST_MS) })
end

-- ------------------------------------------------------------------ lofid went away

local function lost_names(lost)
  local names = {}
  for _, job in ipairs(lost) do
    table.insert(names, string.format("“%s” (%d%%)", util.short(job.prompt), job.percent or 0))
  end
  return table.concat(names, ", ")
end

local function on_disconnect(err)
  for _, job in pairs(state.jobs) do
    interrupt(job)
  end
  local lost = state.interrupted
  if #lost == 0 and not state.download then
    return -- nothing in flight: an idle lofid may exit; the next request connects again
  end
  local cfg = config.options
  local what = #lost > 0 and (" during " .. lost_names(lost)) or ""
  if #lost > 0 and resumable() then
    local how = cfg.auto_start and "; starting it again to finish" or "; sent again when lofid is back"
    util.report(errors.new(errors.CODE.DISCONNECTED, "lofid went away" .. what .. how .. " (" .. err.message .. ")",
      { level = vim.log.levels.WARN }))
  else
    state.interrupted, state.lost = {}, daemon.intent ~= "stop"
    local why = daemon.intent == "stop" and "lofid was stopped" or "lofid went away"
    util.report(errors.new(errors.CODE.DISCONNECTED, why .. what .. " (" .. err.message .. ")"))
    for _, job in ipairs(lost) do
      finish(job, errors.new(errors.CODE.DISCONNECTED, why .. " before the track was finished"), nil)
    end
  end
  if state.download then
    download.finish(errors.new(errors.CODE.DISCONNECTED, "lofid went away during the model download"))
  end
  if daemon.intent ~= "stop" then
    daemon.reconnect()
  end
  util.fire("LofiError")
end

local function on_connect()
  if not state.lost then
    return
  end
  state.lost = false
  local again = state.interrupted
  state.interrupted = {}
  if #again == 0 then
    util.notify("reconnected to lofid")
  else
    util.notify(string.format("reconnected to lofid; sending %d interrupted generation(s) again", #again))
  end
  for _, job in ipairs(again) do
    M.submit(job.prompt, { duration_sec = job.duration_sec, seed = job.seed, priority = job.priority,
      stream = job.stream }, job.callbacks)
  end
  util.fire("LofiProgress")
end

daemon.on("disconnect", on_disconnect)
daemon.on("connect", on_connect)

return M
