-- User commands (and the help tags) only; everything else loads on first use.
if vim.g.loaded_lofi == 1 or vim.fn.has("nvim-0.7") == 0 then
  return
end
vim.g.loaded_lofi = 1

-- :help lofi works whatever installed the plugin (lazy.nvim runs no build step for a local
-- `dir` plugin, a runtimepath line none at all): the help tags are made here when they are
-- missing or older than the help file, if the doc folder is writable.
local doc = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h") .. "/doc"
if vim.fn.getftime(doc .. "/tags") < vim.fn.getftime(doc .. "/lofi.txt") and vim.fn.filewritable(doc) == 2 then
  pcall(vim.cmd, "silent helptags " .. vim.fn.fnameescape(doc))
end

vim.api.nvim_create_user_command("LofiGenerate", function(args)
  require("lofi.commands").command_generate(args.fargs)
end, {
  nargs = "*",
  complete = function(lead)
    return require("lofi.commands").complete_generate(lead)
  end,
  desc = "Generate a lofi track: :LofiGenerate [prompt] [duration=S] [seed=N] [priority=high] [play=true]",
})

vim.api.nvim_create_user_command("LofiStatus", function()
  require("lofi.commands").command_status()
end, { nargs = 0, desc = "Show lofid's status (never starts it)" })

vim.api.nvim_create_user_command("LofiTracks", function()
  require("lofi.commands").command_tracks()
end, { nargs = 0, desc = "Pick a generated track to play" })

vim.api.nvim_create_user_command("LofiPlay", function(args)
  require("lofi").play(args.args ~= "" and args.args or nil)
end, {
  nargs = "?",
  complete = function(lead)
    return require("lofi.commands").complete_tracks(lead)
  end,
  desc = "Loop a track in the background: :LofiPlay [track id or path]",
})

vim.api.nvim_create_user_command("LofiStop", function()
  require("lofi").stop()
end, { nargs = 0, desc = "Stop the music" })

vim.api.nvim_create_user_command("LofiDaemon", function(args)
  require("lofi.commands").command_daemon(args.args)
end, {
  nargs = 1,
  complete = function(lead)
    return require("lofi.commands").complete_daemon(lead)
  end,
  desc = "Start, stop or restart lofid, or read its log: :LofiDaemon start|stop|restart|log",
})
