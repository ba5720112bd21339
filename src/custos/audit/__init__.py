"""The tamper-evident audit log: every admin action, append-only, chained by SHA-256."""
