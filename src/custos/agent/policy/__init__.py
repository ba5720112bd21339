"""The agent's policy side: desired state evaluated and repaired offline, lock and wipe."""

from custos.agent.policy.engine import PolicyEngine
from custos.agent.policy.store import PolicyStore

__all__ = ["PolicyEngine", "PolicyStore"]
