-- What every part of the plugin shows the user: messages, errors, short prompts, times,
-- and the User events.
local uv = vim.uv or vim.loop
local config = require("lofi.config")
local errors = require("lofi.errors")

local M = {}

--- vim.notify with the plugin's prefix and title; returns what vim.notify returns.
M.notify = function(msg, level, opts)
  return vim.notify("lofi: " .. msg, level or vim.log.levels.INFO, vim.tbl_extend("force", { title = "lofi" }, opts or {}))
end

--- Show an error (code + sentence), at the level its code deserves, once.
M.report = function(err, prefix)
  if err.reported then
    return
  end
  err.reported = true
  local hint = err.hint and ("; " .. err.hint) or ""
  return M.notify((prefix or "") .. errors.format(err) .. hint, err.level or errors.level_for_code(err.code))
end

--- A message about work in progress (`holder`: a job or the download), replaced in place
--- where vim.notify supports it (nvim-notify's `replace`), and otherwise throttled to one
--- per progress_interval_ms; `force` shows it anyway and keeps it in the history.
M.progress = function(holder, msg, level, force)
  local now = uv.now()
  if not force and holder.notified_at and now - holder.notified_at < config.options.progress_interval_ms then
    return
  end
  holder.notified_at = now
  local ok, record = pcall(M.notify, msg, level, { replace = holder.notify_record, hide_from_history = not force })
  if ok and type(record) == "table" then
    holder.notify_record = record
  end
end

--- A prompt cut to 40 characters.
M.short = function(prompt)
  prompt = prompt or ""
  return vim.fn.strchars(prompt) > 40 and (vim.fn.strcharpart(prompt, 0, 37) .. "...") or prompt
end

--- Seconds as m:ss.
M.clock = function(sec)
  sec = math.max(0, math.floor(sec + 0.5))
  return string.format("%d:%02d", math.floor(sec / 60), sec % 60)
end

--- Fire the User autocommand `pattern` (LofiProgress, ...) and redraw the statuslines.
M.fire = function(pattern)
  pcall(vim.api.nvim_exec_autocmds, "User", { pattern = pattern, modeline = false })
  pcall(vim.cmd, "redrawstatus")
end

return M
