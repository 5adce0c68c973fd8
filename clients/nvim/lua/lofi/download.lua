-- The model download: asking lofid for it, its progress and its end, and the callers
-- waiting for it (state.download while it runs).
local config = require("lofi.config")
local daemon = require("lofi.daemon")
local errors = require("lofi.errors")
local state = require("lofi.state")
local util = require("lofi.util")

local M = {}

M.SLOW_REQUEST_MS = 60000 -- generate / download_model: the first locate may hash the model

--- The download ended (err = nil: complete); tell every waiter.
M.finish = function(err)
  local dl = state.download
  if not dl then
    return
  end
  state.download = nil
  if err then
    util.report(err, "model download failed: ")
  else
    util.progress(dl, "model downloaded", vim.log.levels.INFO, true)
  end
  for _, cb in ipairs(dl.waiters) do
    require("lofi.rpc").safe_call(cb, err)
  end
  util.fire(err and "LofiError" or "LofiProgress")
end

--- Wait for the running download: cb(err) when it ends. False when none runs.
M.wait = function(cb)
  if not state.download then
    return false
  end
  table.insert(state.download.waiters, cb)
  return true
end

--- Download the model (giving consent). cb(err) when it is complete or failed.
M.start = function(opts, cb)
  cb = cb or function() end
  if M.wait(cb) then
    return
  end
  state.download = { percent = 0, waiters = { cb } }
  util.progress(state.download, "downloading the model...")
  daemon.request("download_model", opts and opts.variant and { variant = opts.variant } or nil, function(req_err)
    if req_err then
      M.finish(req_err)
    end
  end, { timeout_ms = math.max(config.options.request_timeout_ms, M.SLOW_REQUEST_MS) })
end

local handlers = {}

handlers.download_progress = function(p)
  local dl = state.download
  if not dl then
    return
  end
  dl.percent, dl.file = p.percent or 0, p.file
  util.progress(dl, string.format("downloading the model: %d%% (%s)", dl.percent, p.file or "?"))
  util.fire("LofiProgress")
end

handlers.download_complete = function()
  M.finish(nil)
end

handlers.download_error = function(p)
  M.finish(errors.normalize(vim.tbl_extend("keep", p, { code = errors.CODE.MODEL_DOWNLOAD_FAILED })))
end

daemon.on("notification", function(method, payload)
  local handler = handlers[method]
  if handler then
    handler(payload)
  end
end)

return M
