"""Every feature package's models, imported so Base.metadata knows all tables (for Alembic)."""

from __future__ import annotations

from sqlalchemy import MetaData


def load_metadata() -> MetaData:
    """Import the model modules and return the shared metadata."""
    from custos.accounts import models as _accounts  # noqa: F401
    from custos.audit import models as _audit  # noqa: F401
    from custos.commands import models as _commands  # noqa: F401
    from custos.db.base import Base
    from custos.devices import models as _devices  # noqa: F401
    from custos.diagnostics import models as _diagnostics  # noqa: F401
    from custos.omadm import models as _omadm  # noqa: F401
    from custos.policies import models as _policies  # noqa: F401
    from custos.reports import models as _reports  # noqa: F401
    from custos.software import models as _software  # noqa: F401
    from custos.tasks import models as _tasks  # noqa: F401
    from custos.webhooks import models as _webhooks  # noqa: F401

    return Base.metadata
