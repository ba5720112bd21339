"""Artifact content shared by server and agent: content-defined chunks (`chunking`), binary
deltas (`delta`) and transfer plans (`plan`).

Neutral ground: it imports nothing from the server, so the agent rebuilds artifacts with the
same code the server plans them with.
"""
