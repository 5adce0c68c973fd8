-- Test harness, loaded with --cmd: record vim.notify messages instead of showing them
-- (a headless editor has no one to press ENTER), and answer vim.ui prompts from queues
-- that the test fills: _G.lofi_test.answers.select (item indexes, or false = cancel) and
-- _G.lofi_test.answers.input (strings, or false = cancel).
local uv = vim.uv or vim.loop

_G.lofi_test = { messages = {}, asked = {}, answers = { select = {}, input = {} } }

vim.notify = function(msg, level)
  table.insert(_G.lofi_test.messages, { msg = msg, level = level or vim.log.levels.INFO, ms = uv.now() })
end

vim.ui.select = function(items, opts, on_choice)
  local shown = {}
  for i, item in ipairs(items) do
    shown[i] = opts.format_item and opts.format_item(item) or tostring(item)
  end
  table.insert(_G.lofi_test.asked, { kind = "select", prompt = opts.prompt, items = shown })
  local answer = table.remove(_G.lofi_test.answers.select, 1)
  vim.schedule(function()
    if answer then
      on_choice(items[answer], answer)
    else
      on_choice(nil, nil)
    end
  end)
end

vim.ui.input = function(opts, on_confirm)
  table.insert(_G.lofi_test.asked, { kind = "input", prompt = opts.prompt })
  local answer = table.remove(_G.lofi_test.answers.input, 1)
  vim.schedule(function()
    on_confirm(answer or nil)
  end)
end

--- Messages (strings) recorded so far, optionally only those matching a Lua pattern.
_G.lofi_test.texts = function(pattern)
  local out = {}
  for _, m in ipairs(_G.lofi_test.messages) do
    if pattern == nil or pattern == vim.NIL or m.msg:find(pattern) then
      table.insert(out, m.msg)
    end
  end
  return out
end
