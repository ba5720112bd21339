"""The command queue: remote execution, scripts, reboot, settings, file collection."""
