"""`custos task create`'s request building (the server re-checks everything)."""

from __future__ import annotations

import pytest

from custos.cli.task_cmds import build_task_body


def _body(**kw):
    args = {
        "cron": None,
        "every": None,
        "tz": "UTC",
        "window": None,
        "grace": None,
        "timeout": 60.0,
        "script": None,
        "disabled": False,
    }
    args.update(kw)
    argv = args.pop("argv", ["rm", "-rf", "/tmp/cache"])
    return build_task_body("nightly", "group:lab", argv, **args)


def test_cron_exec_with_window_and_grace():
    body = _body(cron="0 3 * * *", window="mon-fri 01:00-05:00 Europe/Paris", grace="30m")
    assert body == {
        "name": "nightly",
        "target": "group:lab",
        "timeout_s": 60.0,
        "timezone": "UTC",
        "kind": "exec",
        "argv": ["rm", "-rf", "/tmp/cache"],
        "cron": "0 3 * * *",
        "window": "mon-fri 01:00-05:00 Europe/Paris",
        "misfire_grace_s": 1800,
    }


def test_interval_script_disabled_and_zero_grace():
    body = _body(every="1h30m", script=("sh", "echo hi"), argv=["a"], grace="0", disabled=True)
    assert body["every_s"] == 5400 and "cron" not in body
    assert (body["kind"], body["interpreter"], body["script"], body["args"]) == (
        "script",
        "sh",
        "echo hi",
        ["a"],
    )
    assert body["misfire_grace_s"] == 0 and body["enabled"] is False


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "exactly one of --cron and --every"),
        ({"cron": "* * * * *", "every": "5m"}, "exactly one"),
        ({"cron": "* * * * *", "argv": []}, "nothing to run"),
        ({"every": "soon"}, "not a duration"),
        ({"every": "5m", "timeout": 0}, "--timeout"),
    ],
)
def test_refused_before_anything_is_sent(kw, message):
    with pytest.raises(ValueError, match=message):
        _body(**kw)
