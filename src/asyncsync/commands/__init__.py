"""What the CLI runs: push, watch, run, and the cleanup and run record they use."""
