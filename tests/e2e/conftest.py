"""End-to-end fixtures: a real `custos server` process and real `custos agent` processes.

The server runs over HTTPS with its own CA on a free port, on SQLite or PostgreSQL (the
`db_url` fixture of tests/conftest.py). When a test fails, the server's and agents' logs are
attached to the report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import E2E, LOG_TAIL_CHARS

LOGS_KEY = pytest.StashKey[list[tuple[str, Path]]]()


@pytest.fixture
def e2e(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[E2E]:
    """A running `custos server` on the test database, with a logged-in admin.

    `@pytest.mark.server_env(CUSTOS_X="v")` adds to (or overrides) the server's environment,
    e.g. a realistic check-in interval instead of the harness's 1 s.
    """
    logs: list[tuple[str, Path]] = []
    request.node.stash[LOGS_KEY] = logs
    root = tmp_path / "e2e"
    root.mkdir()
    world = E2E(db_url, root, logs)
    marker = request.node.get_closest_marker("server_env")
    if marker is not None:
        world.server.env.update({k: str(v) for k, v in marker.kwargs.items()})
    try:
        world.start()
        yield world
    finally:
        world.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, attach the tails of the server's and agents' logs to the report."""
    rep = yield
    if rep.failed:
        for title, path in item.stash.get(LOGS_KEY, []):
            try:
                text = path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            except OSError:
                continue
            rep.sections.append((title, text))
    return rep
