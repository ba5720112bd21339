"""Offline scheduled tasks: definitions, delivery to agents through the command queue, runs."""
