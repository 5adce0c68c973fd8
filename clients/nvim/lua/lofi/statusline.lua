-- The statusline component: what lofid does for this editor, in a few characters.
local config = require("lofi.config")
local state = require("lofi.state")
local util = require("lofi.util")

--- "♪ 45% ~0:12" while generating ("♪ ▶ 45% ~0:12" while it plays from the stream),
--- "♪ queued", "♪ ↓ 30%" while downloading the model, "♪ starting" while it starts lofid,
--- "♪ offline" after lofid went away mid-job, "♪" while playing, "" when idle.
return function()
  local icon = config.options.icon
  local running, queued = nil, 0
  for _, job in pairs(state.jobs) do
    if job.status == "running" then
      running = job
    else
      queued = queued + 1
    end
  end
  local more = queued > 0 and string.format(" +%d", queued) or ""
  local stream = require("lofi.stream")
  if running then
    local eta = running.eta_sec and (" ~" .. util.clock(running.eta_sec)) or ""
    local playing = stream.is_playing() and stream.current.track_id == running.track_id and " ▶" or ""
    return string.format("%s%s %d%%%s%s", icon, playing, running.percent or 0, eta, more)
  elseif queued > 0 then
    return string.format("%s queued%s", icon, queued > 1 and (" " .. queued) or "")
  elseif state.download then
    return string.format("%s ↓ %d%%", icon, state.download.percent or 0)
  elseif require("lofi.daemon").starting then
    return icon .. " starting"
  elseif state.lost and #state.interrupted > 0 then
    return icon .. " offline"
  elseif require("lofi.player").is_playing() or stream.is_playing() then
    return icon
  end
  return ""
end
