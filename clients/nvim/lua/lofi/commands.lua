-- The user commands' work: argument parsing, completion, and what each command shows.
-- plugin/lofi.lua defines the commands and calls these.
local daemon = require("lofi.daemon")
local errors = require("lofi.errors")
local lofi = require("lofi")
local util = require("lofi.util")

local M = {}

local OPTION_KEYS = { duration = "duration_sec", duration_sec = "duration_sec", seed = "seed", priority = "priority",
  play = "play" }
local BOOLEANS = { ["true"] = true, yes = true, on = true, ["1"] = true, ["false"] = false, no = false, off = false,
  ["0"] = false }

--- A prompt written in quotes, "like this" or 'like this', without them.
local function unquote(prompt)
  local first, last = prompt:sub(1, 1), prompt:sub(-1)
  if #prompt >= 2 and first == last and (first == '"' or first == "'") then
    return prompt:sub(2, -2)
  end
  return prompt
end

--- Split :LofiGenerate arguments into the prompt and key=value options (duration= or
--- duration_sec=, seed=, priority=, play=); other words, also other key=value ones, stay
--- in the prompt, whose enclosing quotes are dropped.
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
      opts.play = BOOLEANS[value:lower()]
      if opts.play == nil then
        return "", opts, "play must be true or false, not " .. value
      end
    else
      table.insert(words, word)
    end
  end
  return unquote(table.concat(words, " ")), opts, nil
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
      lofi.generate(unquote(vim.trim(input)), opts)
    end
  end)
end

--- Completion for :LofiGenerate: the option keys, and the values of priority= and play=.
M.complete_generate = function(lead)
  local values = { ["priority="] = { "normal", "high" }, ["play="] = { "true", "false" } }
  local key = lead:match("^[%w_]+=")
  local items = {}
  if key and values[key] then
    for _, v in ipairs(values[key]) do
      table.insert(items, key .. v)
    end
  elseif not key then
    items = { "duration=", "seed=", "priority=", "play=" }
  end
  return vim.tbl_filter(function(item)
    return item:sub(1, #lead) == lead
  end, items)
end

-- :LofiStatus only reports: it never starts lofid.
M.command_status = function()
  daemon.request("status", nil, function(err, s)
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
      table.insert(lines, string.format("playing %s (%s)", player.current.path, player.current.argv[1]))
    end
    if util.last_error then
      table.insert(lines, string.format("last error (%s): %s", os.date("%H:%M:%S", util.last_error.at),
        util.last_error.text))
    end
    util.show(lines)
  end, { start = false })
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

local COMPLETE_WAIT_MS = 1000

--- Completion for :LofiPlay: the ids of the tracks in lofid's cache (when it runs; it is
--- never started for this) and of those this session made.
M.complete_tracks = function(lead)
  local seen, done = {}, false
  for id in pairs(lofi.state.tracks) do
    seen[id] = true
  end
  daemon.request("tracks", { limit = 100 }, function(err, records)
    for _, r in ipairs(not err and records or {}) do
      seen[r.track_id] = true
    end
    done = true
  end, { start = false, timeout_ms = COMPLETE_WAIT_MS })
  vim.wait(COMPLETE_WAIT_MS, function()
    return done
  end, 10)
  local ids = {}
  for id in pairs(seen) do
    if id:sub(1, #lead) == lead then
      table.insert(ids, id)
    end
  end
  table.sort(ids)
  return ids
end

-- ------------------------------------------------------------------ :LofiDaemon

local daemon_actions = {}

daemon_actions.start = function()
  daemon.ensure(function(running)
    if not running then
      return util.notify("lofid is running already")
    end
    daemon.start(function(err)
      if err then
        return util.report(err)
      end
      util.notify("lofid started")
    end)
  end, { start = false })
end

daemon_actions.stop = function()
  daemon.shutdown("stop", function(err)
    if err then
      return util.report(err)
    end
    util.notify("lofid stopped")
  end)
end

daemon_actions.restart = function()
  daemon.shutdown("restart", function(err)
    if err and err.code ~= errors.CODE.NOT_RUNNING then
      return util.report(err)
    end
    daemon.start(function(start_err)
      if start_err then
        return util.report(start_err)
      end
      util.notify("lofid restarted")
    end)
  end)
end

daemon_actions.log = function()
  local log = daemon.log_path()
  if vim.fn.filereadable(log) == 0 then
    return util.notify("no log at " .. log .. ": only a lofid the plugin started writes there",
      vim.log.levels.WARN)
  end
  vim.cmd("split " .. vim.fn.fnameescape(log))
  vim.bo.readonly, vim.bo.swapfile = true, false
  vim.cmd("normal! G")
end

M.DAEMON_ACTIONS = { "start", "stop", "restart", "log" }

M.command_daemon = function(action)
  local fn = daemon_actions[action]
  if not fn then
    return util.report(errors.new(errors.CODE.INVALID_PARAMS, string.format(
      "unknown action %q: :LofiDaemon start, stop, restart or log", action)))
  end
  fn()
end

M.complete_daemon = function(lead)
  return vim.tbl_filter(function(action)
    return action:sub(1, #lead) == lead
  end, M.DAEMON_ACTIONS)
end

return M
