-- The user commands' work: argument parsing and what each command shows.
-- plugin/lofi.lua defines the commands and calls these.
local errors = require("lofi.errors")
local lofi = require("lofi")
local util = require("lofi.util")

local M = {}

local OPTION_KEYS = { duration = "duration_sec", duration_sec = "duration_sec", seed = "seed", priority = "priority",
  play = "play" }

--- Split :LofiGenerate arguments into the prompt and key=value options (duration=,
--- seed=, priority=, play=); other words, also other key=value ones, stay in the prompt.
---@return string prompt, table opts, string|nil error
M.parse_args = function(fargs)
  local words, opts = {}, {}
  for _, word in ipairs(fargs) do
    local key, value = word:match("^([%w_]+)=(.*)$")
    local opt = key and OPTION_KEYS[key]
    if opt == "duration_sec" then
      opts.duration_sec = tonumber(value)
      if not opts.duration_sec then
        return "", opts, "duration must be a number of seconds, not " .. value
      end
    elseif opt == "seed" then
      opts.seed = tonumber(value)
      if not opts.seed or opts.seed % 1 ~= 0 or opts.seed < 0 then
        return "", opts, "seed must be a non-negative integer, not " .. value
      end
    elseif opt == "priority" then
      if value ~= "normal" and value ~= "high" then
        return "", opts, "priority must be normal or high, not " .. value
      end
      opts.priority = value
    elseif opt == "play" then
      opts.play = value ~= "false" and value ~= "0" and value ~= "no"
    else
      table.insert(words, word)
    end
  end
  return table.concat(words, " "), opts, nil
end

M.command_generate = function(fargs)
  local prompt, opts, err = M.parse_args(fargs)
  if err then
    return util.report(errors.new(errors.CODE.INVALID_PARAMS, err))
  end
  if opts.play == nil and lofi.config.play_on_complete then
    opts.play = true
  end
  if prompt ~= "" then
    return lofi.generate(prompt, opts)
  end
  vim.ui.input({ prompt = "lofi prompt: " }, function(input)
    if input and vim.trim(input) ~= "" then
      lofi.generate(vim.trim(input), opts)
    end
  end)
end

M.command_status = function()
  lofi.status(function(err, s)
    if err then
      return util.report(err)
    end
    local model = s.model or {}
    local lines = {
      string.format("lofid %s (pid %s, up %s)", s.version or "?", s.pid or "?", util.clock(s.uptime_sec or 0)),
      string.format("model: %s %s, %s (%s)", model.variant or "?", model.state or "?", model.device or "no device yet",
        model.provider or "-"),
    }
    if s.running then
      table.insert(lines, string.format("generating %s: %d%%", s.running.track_id, s.running.percent or 0))
    end
    table.insert(lines, string.format("queue: %d waiting", s.queue and #s.queue or 0))
    local player = require("lofi.player")
    if player.current then
      table.insert(lines, "playing " .. player.current.path)
    end
    util.notify(table.concat(lines, "\n"))
  end)
end

M.command_tracks = function()
  lofi.tracks(function(err, records)
    if err then
      return util.report(err)
    end
    if not records or #records == 0 then
      return util.notify("no tracks yet; make one with :LofiGenerate")
    end
    vim.ui.select(records, {
      prompt = "lofi: play which track?",
      format_item = function(r)
        local date = r.created_at and os.date("%Y-%m-%d %H:%M", math.floor(r.created_at)) or ""
        return string.format("%s  %s  %ds  %s", r.track_id, date, r.duration_sec or 0, util.short(r.prompt))
      end,
    }, function(choice)
      if choice then
        lofi.play(choice)
      end
    end)
  end, 100)
end

--- Completion for :LofiPlay: the ids of the tracks this session knows.
M.complete_tracks = function(lead)
  local ids = {}
  for id in pairs(lofi.state.tracks) do
    if id:sub(1, #lead) == lead then
      table.insert(ids, id)
    end
  end
  table.sort(ids)
  return ids
end


return M
