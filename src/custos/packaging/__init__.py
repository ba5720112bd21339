"""Software packages: formats, manifests, inspection, signing (shared by server and agent).

This package never imports server code: the agent uses it to re-check what the server checked.
"""

from __future__ import annotations
