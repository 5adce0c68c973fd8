-- Error codes: the daemon's (see lofid's docs/protocol.md) plus the plugin's own,
-- and how loudly each is reported.
local M = {}

M.CODE = {
  -- lofid's spec codes
  MODEL_NOT_FOUND = "MODEL_NOT_FOUND",
  MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED",
  MODEL_INFERENCE_FAILED = "MODEL_INFERENCE_FAILED",
  QUEUE_FULL = "QUEUE_FULL",
  INVALID_DURATION = "INVALID_DURATION",
  MODEL_DOWNLOAD_FAILED = "MODEL_DOWNLOAD_FAILED",
  -- added by lofid
  INVALID_PARAMS = "INVALID_PARAMS",
  UNKNOWN_METHOD = "UNKNOWN_METHOD",
  TRACK_NOT_FOUND = "TRACK_NOT_FOUND",
  STORAGE_FAILED = "STORAGE_FAILED",
  INTERNAL = "INTERNAL",
  -- the plugin's own (never sent by the daemon)
  NOT_RUNNING = "NOT_RUNNING", -- nothing answers on the socket
  DISCONNECTED = "DISCONNECTED", -- the connection closed with the request unanswered
  TIMEOUT = "TIMEOUT", -- no response within the request's timeout
  START_FAILED = "START_FAILED", -- auto_start could not start lofid
  BAD_FRAME = "BAD_FRAME", -- the daemon sent bytes that are not msgpack-rpc
  NO_PLAYER = "NO_PLAYER", -- no audio player found
  PLAYER_FAILED = "PLAYER_FAILED", -- the player exited with an error
  CANCELLED = "CANCELLED", -- the user said no
  UNTRUSTED_DAEMON = "UNTRUSTED_DAEMON", -- the socket is another user's, or lofid gave a path no lofid gives
}

---@param code string
---@param message string
---@param data? table extra fields (consent_required, repo, ...)
---@return table err {code, message, ...}
M.new = function(code, message, data)
  local err = {}
  for k, v in pairs(data or {}) do
    err[k] = v
  end
  err.code, err.message = code, message
  return err
end

--- An rpc error value (a map from lofid, or anything else) as {code, message, ...}.
M.normalize = function(value)
  if type(value) == "table" and type(value.code) == "string" then
    if type(value.message) ~= "string" then
      value.message = "(no message)"
    end
    return value
  end
  if type(value) == "table" and type(value[2]) == "string" then -- [type, message] (Neovim's shape)
    return M.new(M.CODE.INTERNAL, value[2])
  end
  return M.new(M.CODE.INTERNAL, tostring(value))
end

---@param code string
---@return integer a vim.log.levels value
M.level_for_code = function(code)
  if code == M.CODE.CANCELLED then
    return vim.log.levels.INFO
  elseif
    code == M.CODE.QUEUE_FULL
    or code == M.CODE.INVALID_DURATION
    or code == M.CODE.INVALID_PARAMS
    or code == M.CODE.TRACK_NOT_FOUND
    or code == M.CODE.NO_PLAYER
  then
    return vim.log.levels.WARN
  else
    return vim.log.levels.ERROR
  end
end

--- MODEL_NOT_FOUND's download size for people, as lofid's models.size_text writes it
--- ("548 kB", "1.0 GB"); "about 1.0 GB, an estimate" where the hub did not answer.
M.download_size = function(err)
  local n = tonumber(err.download_bytes)
  if not n then
    return "a large download"
  end
  local text = n >= 1e9 and string.format("%.1f GB", n / 1e9)
    or n >= 1e6 and string.format("%.1f MB", n / 1e6)
    or n >= 1e3 and string.format("%.0f kB", n / 1e3)
    or string.format("%d bytes", n)
  return err.download_bytes_estimated == true and ("about " .. text .. ", an estimate") or text
end

--- "CODE: sentence", the one way errors are shown.
M.format = function(err)
  return string.format("%s: %s", err.code or "INTERNAL", err.message or "(no message)")
end

return M
