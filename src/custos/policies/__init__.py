"""Policies: profiles (desired state), assignment, compliance, lost-device lock and wipe."""
