"""lofictl: the shell client of lofid."""
