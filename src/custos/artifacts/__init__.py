"""Artifact content shared by server and agent: chunking, deltas and transfer plans (no I/O
beyond local files; the agent imports this, so nothing here imports server code)."""
