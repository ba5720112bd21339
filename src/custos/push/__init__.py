"""The push channel: wake-up nudges to connected devices (hub.py backends, routes.py socket)."""

from custos.push.hub import MemoryPush, PostgresNotifyPush, PushHub, Subscription, build_push

__all__ = ["MemoryPush", "PostgresNotifyPush", "PushHub", "Subscription", "build_push"]
