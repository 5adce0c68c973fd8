-- The connection to lofid: where its socket is, connecting on demand, starting it
-- detached when asked (auto_start), reconnecting (and starting it again) after it went
-- away, and stopping or restarting it on request.
local uv = vim.uv or vim.loop
local errors = require("lofi.errors")
local rpc = require("lofi.rpc")
local util = require("lofi.util")

local M = {}

local listeners = { notification = {}, connect = {}, disconnect = {} }
M.client = nil ---@type lofi.rpc.Client|nil
M.starting = nil -- callbacks waiting for an auto-start in progress
M.reconnect_timer = nil
M.last_start = nil -- {pid, cmd, log, exit_code} of the last auto-start, for :checkhealth
M.intent = nil -- "stop" or "restart" while :LofiDaemon stops lofid on purpose
M.START_ATTEMPTS = 5 -- starts in a row that may fail while reconnecting before it gives up

local function config()
  return require("lofi.config").options
end

local function is_private_dir(path, uid)
  local st = uv.fs_lstat(path)
  return st ~= nil and st.type == "directory" and st.uid == uid and st.mode % 512 == 448 -- 0700
end

--- The socket lofid listens on by default (mirrors lofid.paths.default_socket):
--- $LOFID_SOCKET, else $XDG_RUNTIME_DIR/lofid/lofid.sock, else platformdirs' fallback.
M.default_socket = function()
  local env = vim.env.LOFID_SOCKET
  if env and env ~= "" then
    return env
  end
  local runtime = vim.env.XDG_RUNTIME_DIR
  if runtime and runtime ~= "" then
    return runtime .. "/lofid/lofid.sock"
  end
  if vim.fn.has("mac") == 1 then
    return vim.fn.expand("~/Library/Caches/TemporaryItems/lofid/lofid.sock")
  end
  local uid = uv.getuid()
  local base = "/run/user/" .. uid
  if not is_private_dir(base, uid) then
    local tmp = vim.env.TMPDIR
    if not (tmp and tmp:sub(1, 1) == "/") then
      tmp = "/tmp"
    end
    base = tmp:gsub("/+$", "") .. "/runtime-" .. uid
  end
  return base .. "/lofid/lofid.sock"
end

--- The socket to use, and where that choice came from.
M.socket_path = function()
  local socket = config().socket
  if type(socket) == "string" and socket ~= "" then
    return vim.fn.expand(socket), "setup({ socket })"
  end
  local env = vim.env.LOFID_SOCKET
  return M.default_socket(), (env and env ~= "") and "$LOFID_SOCKET" or "lofid's default"
end

M.log_path = function()
  return vim.fn.expand(config().log_file)
end

--- Listen to "notification" (method, payload), "connect" (), "disconnect" (err).
M.on = function(event, fn)
  table.insert(listeners[event], fn)
end

local function emit(event, ...)
  for _, fn in ipairs(listeners[event]) do
    rpc.safe_call(fn, ...)
  end
end

local function get_client()
  local path = M.socket_path()
  if M.client and M.client.path ~= path then
    M.client:close()
    M.client = nil
  end
  if not M.client then
    M.client = rpc.new({
      path = path,
      on_notification = function(method, payload)
        emit("notification", method, payload)
      end,
      on_connect = function()
        M.intent = nil
        M.stop_reconnect()
        emit("connect")
      end,
      on_close = function(err)
        emit("disconnect", err) -- the listener calls reconnect() if work was lost
      end,
    })
  end
  return M.client
end

M.is_connected = function()
  return M.client ~= nil and M.client:is_connected()
end

--- Connect (starting lofid first when auto_start is on, unless opts.start is false);
--- cb(err, client).
M.ensure = function(cb, opts)
  local client = get_client()
  if client:is_connected() then
    return cb(nil, client)
  end
  client:connect(function(err)
    if not err then
      return cb(nil, client)
    end
    if err.code == errors.CODE.UNTRUSTED_DAEMON then
      return cb(err) -- starting lofid would not help
    end
    if not config().auto_start or (opts and opts.start == false) then
      err.hint = "start it with :LofiDaemon start, or setup({ auto_start = true })"
      return cb(err)
    end
    M.start(function(start_err)
      cb(start_err, not start_err and client or nil)
    end)
  end)
end

--- A request that connects first (opts.start = false: never starts lofid); cb(err, result)
--- on the main loop.
M.request = function(method, arg, cb, opts)
  opts = opts or {}
  M.ensure(function(err, client)
    if err then
      return cb(err)
    end
    client:request(method, arg, cb, { timeout_ms = opts.timeout_ms or config().request_timeout_ms })
  end, opts)
end

local function lofid_argv()
  local cmd = config().lofid_cmd
  local argv = type(cmd) == "string" and { cmd } or vim.deepcopy(cmd)
  table.insert(argv, "--socket")
  table.insert(argv, (M.socket_path()))
  return argv
end

--- Open the log for appending, private whatever the umask (it holds prompts): its folder
--- 0700 when created here, the file 0600; never through a symlink. -> fd or nil.
M.open_private_log = function(log)
  local dir = vim.fn.fnamemodify(log, ":h")
  if vim.fn.isdirectory(dir) == 0 then
    vim.fn.mkdir(dir, "p", 448) -- 0700
    uv.fs_chmod(dir, 448)
  end
  local st = uv.fs_lstat(log)
  if st and st.type ~= "file" then
    return nil
  end
  local fd = uv.fs_open(log, "a", 384) -- 0600
  if fd then
    uv.fs_fchmod(fd, 384)
  end
  return fd
end

--- Start lofid detached (it outlives the editor), logging to log_file, and wait until it
--- answers; cb(err). Concurrent callers share one start.
M.start = function(cb)
  if M.starting then
    return table.insert(M.starting, cb)
  end
  M.starting = { cb }
  local function finish(err)
    local waiters = M.starting or {}
    M.starting = nil
    for _, waiter in ipairs(waiters) do
      rpc.safe_call(waiter, err)
    end
  end
  local argv = lofid_argv()
  if vim.fn.executable(argv[1]) == 0 then
    return finish(errors.new(errors.CODE.START_FAILED, string.format(
      "no lofid answers on %s, and `%s` is not an executable on PATH (set lofid_cmd in setup())",
      M.socket_path(), argv[1])))
  end
  local log = M.log_path()
  local fd = M.open_private_log(log)
  local exited = nil
  local handle, pid_or_err = uv.spawn(argv[1], {
    args = vim.list_slice(argv, 2),
    detached = true,
    stdio = { nil, fd, fd },
  }, vim.schedule_wrap(function(code, signal)
    exited = signal ~= 0 and ("signal " .. signal) or ("code " .. code)
    if M.last_start then
      M.last_start.exit = exited
    end
  end))
  if fd then
    uv.fs_close(fd)
  end
  if not handle then
    return finish(errors.new(errors.CODE.START_FAILED, string.format("cannot start %s: %s", argv[1], pid_or_err)))
  end
  handle:unref()
  M.last_start = { pid = pid_or_err, cmd = argv, log = log }
  util.notify("starting lofid...", vim.log.levels.INFO, { hide_from_history = true })
  local client = get_client()
  local deadline = uv.now() + config().start_timeout_ms
  local timer = uv.new_timer()
  local function poll()
    client:connect(function(err)
      if not err or err.code == errors.CODE.UNTRUSTED_DAEMON then
        timer:close()
        return finish(err)
      end
      if exited or uv.now() > deadline then
        timer:close()
        local why = exited and ("exited with " .. exited) or "did not answer in time"
        return finish(errors.new(errors.CODE.START_FAILED, string.format(
          "lofid %s after it was started; see :LofiDaemon log (%s, `%s`)", why, log, table.concat(argv, " "))))
      end
      timer:start(100, 0, vim.schedule_wrap(poll))
    end)
  end
  timer:start(50, 0, vim.schedule_wrap(poll))
end

--- Try to connect again with backoff after lofid went away, until reconnect_timeout_ms;
--- with auto_start, start it again (at most START_ATTEMPTS failed starts in a row).
--- Only while work is in flight: an idle lofid may exit on purpose (idle_exit_sec), and a
--- connect would start a socket-activated one again; the next request connects anyway.
M.reconnect = function()
  local cfg = config()
  if not cfg.reconnect or M.reconnect_timer then
    return
  end
  local timer = uv.new_timer()
  M.reconnect_timer = timer
  local delay, deadline, failed_starts = 250, uv.now() + cfg.reconnect_timeout_ms, 0
  local try
  local function again()
    delay = math.min(delay * 2, 5000)
    timer:start(delay, 0, vim.schedule_wrap(try))
  end
  try = function()
    if M.reconnect_timer ~= timer then
      return
    end
    get_client():connect(function(err)
      if not err or M.reconnect_timer ~= timer then
        return -- on_connect stopped the timer
      end
      if err.code == errors.CODE.UNTRUSTED_DAEMON then
        M.stop_reconnect()
        return util.report(err) -- starting lofid would not help
      end
      if uv.now() > deadline then
        return M.stop_reconnect()
      end
      if not (config().auto_start and M.intent == nil) then
        return again()
      end
      M.start(function(start_err)
        if not start_err or M.reconnect_timer ~= timer then
          return
        end
        failed_starts = failed_starts + 1
        if failed_starts >= M.START_ATTEMPTS then
          M.stop_reconnect()
          return util.report(start_err)
        end
        again()
      end)
    end)
  end
  timer:start(delay, 0, vim.schedule_wrap(try))
end

M.stop_reconnect = function()
  local timer = M.reconnect_timer
  M.reconnect_timer = nil
  if timer then
    timer:stop()
    timer:close()
  end
end

M.reconnecting = function()
  return M.reconnect_timer ~= nil
end

--- Wait (without blocking the editor) until process `pid` is gone; cb(gone).
local function wait_exit(pid, timeout_ms, cb)
  local timer, deadline = uv.new_timer(), uv.now() + timeout_ms
  timer:start(0, 100, vim.schedule_wrap(function()
    local alive = pid and uv.kill(pid, 0) == 0
    if not alive or uv.now() > deadline then
      timer:stop()
      timer:close()
      cb(not alive)
    end
  end))
end

--- Ask lofid to shut down (it finishes writing first) and wait until it has exited;
--- cb(err). `intent`: "stop" (the jobs in flight fail) or "restart" (they are sent again).
M.shutdown = function(intent, cb)
  M.request("status", nil, function(err, status)
    if err then
      return cb(err)
    end
    M.intent = intent
    M.request("shutdown", nil, function(shutdown_err)
      if shutdown_err and shutdown_err.code ~= errors.CODE.DISCONNECTED then
        M.intent = nil
        return cb(shutdown_err)
      end
      wait_exit(status.pid, config().start_timeout_ms, function(gone)
        if not gone then
          M.intent = nil
          return cb(errors.new(errors.CODE.TIMEOUT, string.format("lofid (pid %s) is still running", status.pid)))
        end
        cb(nil)
      end)
    end, { start = false })
  end, { start = false })
end

return M
