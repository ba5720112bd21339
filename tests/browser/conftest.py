"""Browser fixtures: a real `custos server` with a real agent, driven by Debian's chromium.

One server per module (on a fresh PostgreSQL database cloned from the migrated template)
keeps the suite quick; each test gets its own browser context, so cookies never leak
between tests. A screenshot of every test's last page is kept in test-artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from e2e_harness import ADMIN_PASSWORD, E2E, LOG_TAIL_CHARS, wait_for

# the same server as tests/conftest.py's fixtures (its module cannot be imported by name:
# every conftest.py here is called "conftest")
PG_DSN = os.environ.get("CUSTOS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _pg_exec(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_url(name: str) -> str:
    """SQLAlchemy URL of a database on the test PostgreSQL."""
    base = PG_DSN.rsplit("/", 1)[0]
    return base.replace("postgresql://", "postgresql+asyncpg://") + "/" + name


CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
HELPDESK = ("helpdesk-1", "helpdesk-pw-1")
DEVICE_NAME = "browser-dev-1"


class Console:
    """The running server, its one real agent, and the accounts the tests sign in with."""

    def __init__(self, world: E2E) -> None:
        self.world = world
        self.url = world.url
        self.admin_password = ADMIN_PASSWORD
        self.helpdesk = HELPDESK
        self.device_id = ""


@pytest.fixture(scope="module")
def console_server(pg_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A server on a fresh PostgreSQL database, an enrolled running agent and a helpdesk user."""
    name = f"custos_b_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_exec(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    root = tmp_path_factory.mktemp("browser")
    logs: list[tuple[str, Path]] = []
    world = E2E(pg_url(name), root, logs)
    try:
        world.start()
        agent = world.agent(DEVICE_NAME)
        agent.start()
        console = Console(world)
        console.device_id = agent.device_id
        r = world.admin.post(
            "/api/v1/users",
            json={"username": HELPDESK[0], "password": HELPDESK[1], "roles": ["helpdesk"]},
        )
        assert r.status_code == 201, r.text
        # the agent's first inventory makes the charts' data
        wait_for(
            "the agent's first inventory",
            lambda: world.admin.device(agent.device_id)["inventory_version"] >= 1,
            timeout=30,
        )
        yield console
    finally:
        world.close()
        for title, path in logs:
            if path.exists():
                (SCREENSHOTS.parent / "logs").mkdir(parents=True, exist_ok=True)
                text = path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
                safe = title.replace(" ", "-").replace("/", "_")
                (SCREENSHOTS.parent / "logs" / f"{safe}.log").write_text(text)
        asyncio.run(_pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def browser(console_server: Console) -> Iterator[Any]:
    """Debian's chromium, headless, through Playwright (no browser download).

    Started after the server (and closed before it stops): Playwright's sync API runs an
    event loop in this thread, and the server fixture's database set-up needs none running.
    """
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _new_page(browser: Any, request: pytest.FixtureRequest, **context_args: Any) -> Iterator[Any]:
    # the server's certificate comes from its own CA; the tests trust it by not checking
    context = browser.new_context(ignore_https_errors=True, **context_args)
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_console(msg: Any) -> None:
        # refused sign-ins and actions (401, 403) are answers the tests ask for
        if msg.type == "error" and not re.search(r"status of 40[13]\b", msg.text):
            errors.append(msg.text)

    page.on("console", on_console)
    page.js_errors = errors  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        try:
            page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"), full_page=True)
        finally:
            context.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh desktop-sized browser page; its screenshot is saved when the test ends."""
    yield from _new_page(browser, request, viewport={"width": 1280, "height": 900})


@pytest.fixture
def phone_page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A phone-sized page (390 x 844, touch)."""
    yield from _new_page(
        browser, request, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True
    )
