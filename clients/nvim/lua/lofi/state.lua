-- What the plugin knows of lofid's work in this session (require("lofi").state).
return {
  jobs = {}, -- track_id -> job: {track_id, prompt, seed, duration_sec, priority, status, percent, eta_sec, ...}
  tracks = {}, -- track_id -> track record, for the tracks finished in this session
  last_track = nil, -- the last finished track record
  interrupted = {}, -- jobs lost when lofid went away, sent again when it comes back
  lost = false, -- lofid went away and has not come back
  download = nil, -- {percent, file, waiters} while a model download runs
}
