-- Asking the user once whether lofid may download the model it needs.
local download = require("lofi.download")
local errors = require("lofi.errors")

local M = {}

--- Ask whether to download the model that `err` (MODEL_NOT_FOUND with consent_required)
--- names; on yes download it with progress. cb(err) when it is there, or declined.
M.ask = function(err, cb)
  if download.wait(cb) then -- a download is running already: wait for it
    return
  end
  local size = err.download_bytes and string.format("about %.1f GB", err.download_bytes / 1e9) or "a large download"
  local question = string.format("lofid needs the %s model (%s from %s). Download it now?",
    err.variant or "MusicGen", size, err.repo or "Hugging Face")
  local yes = "Download " .. size
  vim.ui.select({ yes, "Not now" }, { prompt = question }, function(choice)
    if choice ~= yes then
      return cb(errors.new(errors.CODE.MODEL_NOT_FOUND, err.message .. " (download declined)",
        { level = vim.log.levels.WARN }))
    end
    download.start({ variant = err.variant }, cb)
  end)
end

return M
