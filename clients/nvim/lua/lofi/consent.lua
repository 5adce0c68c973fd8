-- Asking the user once whether lofid may download the model it needs: one short question,
-- asked only when the user is not typing (never in insert, replace, command-line or
-- terminal mode), and one line for the answer.
local download = require("lofi.download")
local errors = require("lofi.errors")
local util = require("lofi.util")

local M = {}

local asking = nil -- the callbacks waiting for the question on screen or queued

--- Whether the user is typing (or a prompt waits for a key): no time to ask a question.
M.busy = function()
  local mode = vim.api.nvim_get_mode()
  return mode.blocking or mode.mode:match("^[iRcrt]") ~= nil
end

--- Run fn once the user is not typing (now, if not).
M.when_idle = function(fn)
  if not M.busy() then
    return vim.schedule(fn)
  end
  local group = vim.api.nvim_create_augroup("LofiConsent", { clear = true })
  vim.api.nvim_create_autocmd({ "ModeChanged", "CursorHold" }, {
    group = group,
    callback = function()
      vim.schedule(function()
        if M.busy() or not pcall(vim.api.nvim_del_augroup_by_id, group) then
          return -- still typing, or already asked
        end
        fn()
      end)
    end,
  })
end

--- A yes/no question. Neovim's own vim.ui.select would print a numbered list over several
--- lines; then the question is one line (`short`, cut to the message area) and one key
--- instead (y: yes, anything else: no).
local function yes_or_no(question, short, yes, on_answer)
  if not util.is_stock(vim.ui.select) then
    return vim.ui.select({ yes, "Not now" }, { prompt = "lofi: " .. question }, function(choice)
      on_answer(choice == yes)
    end)
  end
  local width = vim.v.echospace > 0 and vim.v.echospace or (vim.o.columns - 1)
  vim.api.nvim_echo({ { util.fit("lofi: " .. short .. " [y/N]", width), "Question" } }, false, {})
  local ok, key = pcall(vim.fn.getcharstr)
  vim.cmd("redraw") -- the question goes; the answer's message takes its line
  on_answer(ok and (key == "y" or key == "Y"))
end

--- Ask whether to download the model that `err` (MODEL_NOT_FOUND with consent_required)
--- names; on yes download it with progress. cb(err) when it is there, or declined.
M.ask = function(err, cb)
  if download.wait(cb) then -- a download is running already: wait for it
    return
  end
  if asking then -- the question is asked already: its answer is this caller's too
    return table.insert(asking, cb)
  end
  asking = { cb }
  local size = errors.download_size(err)
  local model = string.format("the %s model", err.variant or "MusicGen")
  local question = string.format("download %s (%s from %s)?", model, size, err.repo or "Hugging Face")
  local short = string.format("download %s (%s)?", model, size)
  M.when_idle(function()
    yes_or_no(question, short, "Download " .. size, function(yes)
      local waiters = asking
      asking = nil
      if yes then
        for _, waiter in ipairs(waiters) do
          download.start({ variant = err.variant }, waiter)
        end
        return
      end
      local declined = errors.new(errors.CODE.MODEL_NOT_FOUND, "download declined; :LofiGenerate asks again ("
        .. err.message .. ")", { level = vim.log.levels.WARN })
      for _, waiter in ipairs(waiters) do
        waiter(declined)
      end
    end)
  end)
end

return M
