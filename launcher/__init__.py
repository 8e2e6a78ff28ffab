"""hpctrain launcher: run specs, CLI, executors. Imports no torch at module level."""
