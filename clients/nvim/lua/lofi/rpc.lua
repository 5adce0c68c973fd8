-- A msgpack-rpc client over a Unix socket (libuv pipe), the dialect lofid and Neovim speak:
-- request [0, msgid, method, params], response [1, msgid, error, result],
-- notification [2, method, params], concatenated with no length prefix.
--
-- It knows message types and msgids, never the daemon's methods. Every libuv callback is
-- wrapped in vim.schedule_wrap, so all state changes and all user callbacks run on the
-- main loop, in order. On disconnect every pending request fails with DISCONNECTED.
local uv = vim.uv or vim.loop
local errors = require("lofi.errors")

local M = {}

M.DEFAULT_TIMEOUT_MS = 10000
local REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
local MAX_MSGID = 4294967295

--- vim.NIL (msgpack nil) out of decoded maps, recursively, so `x == nil` works.
local function strip_nil(v)
  if type(v) ~= "table" then
    return v
  end
  for k, item in pairs(v) do
    if item == vim.NIL then
      v[k] = nil
    else
      strip_nil(item)
    end
  end
  return v
end
M.strip_nil = strip_nil

---@class lofi.rpc.Client
---@field path string
---@field pipe any the uv pipe while connected
local Client = {}
Client.__index = Client

---@param opts {path: string, on_notification?: fun(method: string, payload: table),
---  on_close?: fun(err: table), on_connect?: fun()}
---@return lofi.rpc.Client
M.new = function(opts)
  return setmetatable({
    path = opts.path,
    on_notification = opts.on_notification or function() end,
    on_close = opts.on_close or function() end,
    on_connect = opts.on_connect or function() end,
    pipe = nil,
    connecting = nil, -- list of callbacks waiting for the connect in progress
    pending = {}, -- msgid -> {cb, timer, method}
    last_id = 0,
  }, Client)
end

function Client:is_connected()
  return self.pipe ~= nil
end

--- mode AND mask ~= 0 (no bit library: Neovim may be built with PUC Lua)
local function any_bits(mode, mask)
  mode = mode % 4096
  while mask > 0 do
    if mask % 2 == 1 and mode % 2 == 1 then
      return true
    end
    mode, mask = math.floor(mode / 2), math.floor(mask / 2)
  end
  return false
end

--- Before connecting (libuv has no SO_PEERCRED): nil if the socket at `path` can only be this
--- user's lofid's, else an UNTRUSTED_DAEMON error. The socket and its folder must be this
--- user's, the folder closed to others (lofid makes it 0700), and every folder above it
--- this user's or root's and not writable by others unless sticky (/tmp): the per-user
--- fallback under /tmp could have been made by someone else first. A missing socket passes
--- (connecting then fails: NOT_RUNNING).
M.check_socket = function(path)
  local uid = uv.getuid()
  local st = uv.fs_lstat(path)
  if not st then
    return nil
  end
  local function untrusted(fmt, ...)
    return errors.new(errors.CODE.UNTRUSTED_DAEMON, string.format(fmt, ...) .. "; refusing to connect to " .. path)
  end
  if st.type ~= "socket" or st.uid ~= uid then
    return untrusted("%s is a %s of uid %d, not your lofid's socket (uid %d)", path, st.type, st.uid, uid)
  end
  local dir = vim.fn.fnamemodify(path, ":p:h")
  local dst = uv.fs_stat(dir) or { uid = -1, mode = 0 }
  if dst.uid ~= uid then
    return untrusted("its folder %s belongs to uid %d, not to you (uid %d)", dir, dst.uid, uid)
  elseif any_bits(dst.mode, 63) then -- 0077
    return untrusted("its folder %s is open to others (mode %04o)", dir, dst.mode % 4096)
  end
  local parent = vim.fn.fnamemodify(dir, ":h")
  while true do
    local pst = uv.fs_stat(parent) or { uid = -1, mode = 0 }
    if pst.uid ~= uid and pst.uid ~= 0 then
      return untrusted("%s, above it, belongs to uid %d", parent, pst.uid)
    elseif any_bits(pst.mode, 18) and not any_bits(pst.mode, 512) then -- 0022, sticky 01000
      return untrusted("%s, above it, can be written by others (mode %04o)", parent, pst.mode % 4096)
    end
    local up = vim.fn.fnamemodify(parent, ":h")
    if up == parent then
      return nil
    end
    parent = up
  end
end

--- Connect; cb(err) on the main loop (err = nil when connected, or a NOT_RUNNING or
--- UNTRUSTED_DAEMON error).
function Client:connect(cb)
  cb = cb or function() end
  if self.pipe then
    return vim.schedule(function()
      cb(nil)
    end)
  end
  if self.connecting then
    table.insert(self.connecting, cb)
    return
  end
  local untrusted = M.check_socket(self.path)
  if untrusted then
    return vim.schedule(function()
      cb(untrusted)
    end)
  end
  self.connecting = { cb }
  local pipe = uv.new_pipe(false)
  local ok, call_err = pcall(pipe.connect, pipe, self.path, vim.schedule_wrap(function(err)
    local waiters = self.connecting or {}
    self.connecting = nil
    local failure
    if err then
      pipe:close()
      failure = errors.new(errors.CODE.NOT_RUNNING,
        string.format("lofid is not running (nothing answers on %s: %s)", self.path, err))
    else
      self.pipe = pipe
      self.unpacker = vim.mpack.Unpacker()
      pipe:read_start(vim.schedule_wrap(function(read_err, chunk)
        if self.pipe ~= pipe then
          return -- a read scheduled before this pipe was closed
        end
        if read_err then
          self:_closed(errors.new(errors.CODE.DISCONNECTED, "lost the connection to lofid: " .. read_err))
        elseif chunk == nil then
          self:_closed(errors.new(errors.CODE.DISCONNECTED, "lofid closed the connection"))
        else
          self:_on_data(chunk)
        end
      end))
    end
    if not failure then
      M.safe_call(self.on_connect)
    end
    for _, waiter in ipairs(waiters) do
      waiter(failure)
    end
  end))
  if not ok then
    self.connecting = nil
    pcall(pipe.close, pipe)
    local failure = errors.new(errors.CODE.NOT_RUNNING,
      string.format("lofid is not running (cannot connect to %s: %s)", self.path, call_err))
    vim.schedule(function()
      cb(failure)
    end)
  end
end

--- Close the connection; pending requests fail with DISCONNECTED. on_close is not called.
function Client:close()
  self:_closed(errors.new(errors.CODE.DISCONNECTED, "the connection was closed"), true)
end

function Client:_closed(err, quiet)
  local pipe = self.pipe
  if not pipe then
    return
  end
  self.pipe, self.unpacker = nil, nil
  pcall(pipe.read_stop, pipe)
  if not pipe:is_closing() then
    pipe:close()
  end
  local pending = self.pending
  self.pending = {}
  for _, req in pairs(pending) do
    req.timer:stop()
    req.timer:close()
  end
  for _, req in pairs(pending) do
    M.safe_call(req.cb, errors.new(err.code, err.message .. " (before answering " .. req.method .. ")"))
  end
  if not quiet then
    M.safe_call(self.on_close, err)
  end
end

--- Call fn(...), reporting an error in it instead of breaking the dispatch loop.
M.safe_call = function(fn, ...)
  local ok, e = pcall(fn, ...)
  if not ok then
    vim.notify("lofi: internal error in a callback: " .. tostring(e), vim.log.levels.ERROR)
  end
end

function Client:_on_data(chunk)
  local pos = 1
  while self.unpacker and pos <= #chunk do
    local ok, value, next_pos = pcall(self.unpacker, chunk, pos)
    if not ok then
      return self:_closed(errors.new(errors.CODE.BAD_FRAME, "lofid sent undecodable data: " .. tostring(value)))
    end
    if value == nil and (next_pos == nil or next_pos > #chunk) then
      break -- half a frame: the unpacker keeps it until the next chunk
    end
    pos = next_pos
    if value ~= nil and value ~= vim.NIL then
      self:_dispatch(value)
    end
  end
end

function Client:_dispatch(msg)
  if type(msg) ~= "table" then
    return
  end
  local kind = msg[1]
  if kind == RESPONSE then
    local req = self.pending[msg[2]]
    if not req then
      return -- timed out already, or not ours: dropped
    end
    self.pending[msg[2]] = nil
    req.timer:stop()
    req.timer:close()
    local err, result = msg[3], msg[4]
    if err ~= nil and err ~= vim.NIL then
      M.safe_call(req.cb, errors.normalize(strip_nil(err)), nil)
    else
      M.safe_call(req.cb, nil, strip_nil(result ~= vim.NIL and result or nil))
    end
  elseif kind == NOTIFICATION then
    local params = msg[3]
    local payload = type(params) == "table" and params[1] or nil
    M.safe_call(self.on_notification, msg[2], strip_nil(type(payload) == "table" and payload or {}))
  elseif kind == REQUEST and self.pipe then
    -- lofid never asks anything; answer politely rather than leave it waiting
    local reply = { RESPONSE, msg[2], { code = "UNKNOWN_METHOD", message = "the client serves no methods" }, vim.NIL }
    self.pipe:write(vim.mpack.encode(reply))
  end
end

--- Send a request; cb(err, result) runs on the main loop exactly once.
---@param method string
---@param arg? table the one argument map (nil: no argument)
---@param cb fun(err: table|nil, result: any)
---@param opts? {timeout_ms?: integer}
---@return integer|nil msgid
function Client:request(method, arg, cb, opts)
  cb = cb or function() end
  if not self.pipe then
    local err = errors.new(errors.CODE.NOT_RUNNING, "not connected to lofid")
    vim.schedule(function()
      cb(err)
    end)
    return nil
  end
  self.last_id = self.last_id >= MAX_MSGID and 1 or self.last_id + 1
  local id = self.last_id
  local timeout = (opts and opts.timeout_ms) or M.DEFAULT_TIMEOUT_MS
  local timer = uv.new_timer()
  self.pending[id] = { cb = cb, timer = timer, method = method }
  timer:start(timeout, 0, vim.schedule_wrap(function()
    local req = self.pending[id]
    if req and req.timer == timer then
      self.pending[id] = nil
      timer:close()
      local msg = string.format("lofid did not answer %s within %d ms", method, timeout)
      M.safe_call(cb, errors.new(errors.CODE.TIMEOUT, msg))
    end
  end))
  local params = arg == nil and {} or { arg }
  local pipe = self.pipe
  pipe:write(vim.mpack.encode({ REQUEST, id, method, params }), vim.schedule_wrap(function(err)
    if err and self.pipe == pipe then
      self:_closed(errors.new(errors.CODE.DISCONNECTED, "cannot write to lofid: " .. err))
    end
  end))
  return id
end

return M
