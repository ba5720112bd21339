"""Wire types of the push channel."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class PushDescriptor(BaseModel):
    """Where a device listens for wake nudges; sent in every check-in response.

    Absent (null) means the server's WebSocket. For MQTT the device subscribes to
    `<topic_prefix>/<its device id>` on `url`, so the descriptor is the same for every device
    and is built once per process.
    """

    kind: Literal["websocket", "mqtt"]
    url: str | None = None
    topic_prefix: str | None = None
