"""One training run (one fold x one network) in this process, without Ray: its phases, its
checkpoints and cursor, and its identity."""
