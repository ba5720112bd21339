"""The web administration console: server-rendered pages (Jinja2 + htmx), no build step."""
