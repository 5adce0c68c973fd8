-- What every part of the plugin shows the user: messages, errors, short prompts, times,
-- and the User events.
local uv = vim.uv or vim.loop
local config = require("lofi.config")
local errors = require("lofi.errors")

local M = {}

M.last_error = nil -- the last error in full: {text, at}, for :LofiStatus and :checkhealth

--- Whether `fn` is Neovim's own (vim.notify, vim.ui.select, ...), not a plugin's.
M.is_stock = function(fn)
  local ok, info = pcall(debug.getinfo, fn, "S")
  local source = ok and info and info.source or ""
  return source:match("^@vim/") ~= nil or source:find("/runtime/lua/vim/", 1, true) ~= nil
end

--- `text`'s first line, cut to `width` display cells with an ellipsis.
M.fit = function(text, width)
  text = text:match("^[^\n]*")
  if vim.fn.strdisplaywidth(text) <= width then
    return text
  end
  local n = math.min(vim.fn.strchars(text), width)
  while n > 0 and vim.fn.strdisplaywidth(vim.fn.strcharpart(text, 0, n)) > width - 1 do
    n = n - 1
  end
  return vim.fn.strcharpart(text, 0, n) .. "…"
end

local HIGHLIGHT = { [vim.log.levels.ERROR] = "ErrorMsg", [vim.log.levels.WARN] = "WarningMsg" }

--- One line in the message area, never longer than it: a longer one (or vim.notify's
--- error lines) would leave the editor in a "Press ENTER" prompt, where it answers no rpc
--- and runs no timer until a key is pressed.
M.echo = function(text, level, history)
  local width = vim.v.echospace > 0 and vim.v.echospace or (vim.o.columns - 1)
  vim.api.nvim_echo({ { M.fit(text, width), HIGHLIGHT[level] } }, history, {})
end

--- A message. With Neovim's own vim.notify: one line that fits the message area
--- (progress kept out of :messages); with a notification plugin: vim.notify as it is.
--- Returns what vim.notify returns.
M.notify = function(msg, level, opts)
  level, opts = level or vim.log.levels.INFO, opts or {}
  local text = "lofi: " .. msg
  if level >= vim.log.levels.WARN then
    M.last_error = { text = text, at = os.time() }
  end
  if M.is_stock(vim.notify) then
    return M.echo(text, level, not opts.hide_from_history)
  end
  return vim.notify(text, level, vim.tbl_extend("force", { title = "lofi" }, opts))
end

--- Output a command asked for (:LofiStatus): every line, in the history; like :ls it may
--- wait for Enter when it is taller than the command line.
M.show = function(lines)
  if M.is_stock(vim.notify) then
    return vim.api.nvim_echo({ { "lofi: " .. table.concat(lines, "\n") } }, true, {})
  end
  return vim.notify("lofi: " .. table.concat(lines, "\n"), vim.log.levels.INFO, { title = "lofi" })
end

--- Show an error once, at the level its code deserves: "CODE: <prefix>message; hint".
M.report = function(err, prefix)
  if err.reported then
    return
  end
  err.reported = true
  local hint = err.hint and ("; " .. err.hint) or ""
  local text = string.format("%s: %s%s%s", err.code or "INTERNAL", prefix or "", err.message or "(no message)", hint)
  return M.notify(text, err.level or errors.level_for_code(err.code))
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
