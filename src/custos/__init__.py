"""Custos: device management — server, agent, CLI."""

__version__ = "0.1.0"
