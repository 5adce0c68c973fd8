-- The plugin's options: their defaults and the values in force (see :help lofi-setup).
local M = {}

M.defaults = {
  -- the daemon's socket; nil = lofid's default ($LOFID_SOCKET, $XDG_RUNTIME_DIR/lofid/lofid.sock, ...)
  socket = nil,
  -- start lofid (detached) when nothing answers on the socket
  auto_start = false,
  -- the command that runs the daemon (`--socket <path>` is appended)
  lofid_cmd = { "lofid" },
  -- where an auto-started lofid writes its log
  log_file = vim.fn.stdpath("cache") .. "/lofi/lofid.log",
  start_timeout_ms = 30000,
  request_timeout_ms = 10000,
  -- reconnect after lofid went away, and send again the generations it lost
  reconnect = true,
  reconnect_timeout_ms = 10 * 60 * 1000,
  resume = true,
  -- generate defaults
  duration_sec = 30,
  priority = "normal",
  -- play each track :LofiGenerate makes (as play=true does)
  play_on_complete = false,
  -- play a track asked to play as lofid makes it (from its stream), not once it is finished
  stream = true,
  -- audio players for files, tried in order: names or argv tables ({cmd, args..., loop = true})
  players = { "pw-play", "paplay", "aplay", "afplay", "ffplay", "mpv" },
  -- players that read raw PCM on stdin, for the stream: names or argv tables ("{rate}": the sample rate)
  stream_players = { "pw-play", "paplay", "aplay", "ffplay", "mpv", "play" },
  -- at most one progress message per this many ms (the statusline shows every step)
  progress_interval_ms = 2000,
  -- the statusline icon
  icon = "♪",
}

M.options = vim.deepcopy(M.defaults)

--- The defaults with `opts` over them; `duration` (the command's word) is taken for
--- `duration_sec`.
M.set = function(opts)
  opts = vim.deepcopy(opts or {})
  if opts.duration ~= nil and opts.duration_sec == nil then
    opts.duration_sec = opts.duration
  end
  opts.duration = nil
  M.options = vim.tbl_extend("force", vim.deepcopy(M.defaults), opts)
  return M.options
end

return M
