"""Rotating a device's DM account secrets over the protocol (DMAcc, OMA DM 1.2 tree).

A rotation is a command run (kind `omadm`, payload `{"rotate": "dmacc"}`) that the session
carries out in steps, one server message each; the step state lives in the session's stored
state (`state["rotate"]`), so the steps may reach different server processes:

1. `list`: Get ./DMAcc, whose value lists the account nodes (`a/b/c`);
2. `server`: Get ./DMAcc/<x>/ServerID of each, to find the one for this server's ServerID;
3. `appauth`: Get ./DMAcc/<x>/AppAuth, the credential nodes under it;
4. `level`: Get …/AppAuth/<y>/AAuthLevel of each: CLCRED (the client's own credentials)
   and SRVCRED (what it expects from the server);
5. `replace`: one Atomic of Replaces of AAuthSecret and AAuthData (the nonce) in every
   CLCRED and SRVCRED node, with new generated secrets and nonces.

The new secrets are written (sealed) to the account's `rotation_*` columns as the Atomic is
sent, and from then on both sets are accepted until the device settles which it holds:

- it signs in with the new client secret (in any session): they become the account's, the
  old ones are dropped, the run succeeds;
- the Atomic is refused (any code but 200: an Atomic device has rolled back): the new ones are
  dropped at once, the run fails;
- every Status is 200 (`taken`): the run succeeds; the old ones are still accepted until the
  device signs in with the new ones, and dropped if a later session signs in with the old;
- a Status never comes, or the Atomic is 200 with a Replace missing or refused (`unknown`):
  the run waits (`acked`) for the device's next sign-in, which decides as above (the old
  secret: the run fails);
- nobody signs in within PENDING_TTL: a `taken` rotation's secrets become the account's (the
  device said it holds them), an `unknown` one's are dropped (the run fails).

This module decides the steps and the outcome; the session (service.py) sends them, seals the
secrets and writes the account. No I/O.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

ROOT = "./DMAcc"
PAYLOAD_KEY = "rotate"
PAYLOAD_VALUE = "dmacc"
MAX_CHILDREN = 16  # DMAcc or AppAuth children looked at
MAX_CREDS = 4  # CLCRED or SRVCRED nodes rewritten at most, each
CLIENT_LEVEL, SERVER_LEVEL = "CLCRED", "SRVCRED"
# how long secrets sent stay acceptable without the device signing in with either set
PENDING_TTL = timedelta(days=7)
TAKEN, REFUSED, UNKNOWN = "taken", "refused", "unknown"


class RotationFailed(Exception):
    """The rotation cannot go on; the message is the run's error (never a secret)."""


def is_rotation(kind: str, payload: dict[str, Any]) -> bool:
    """Whether a run is a DMAcc credential rotation."""
    return kind == "omadm" and payload.get(PAYLOAD_KEY) == PAYLOAD_VALUE


def new_state(run_id: str) -> dict[str, Any]:
    """The stored state of a rotation that is about to send its first step."""
    return {"run": run_id, "phase": "list", "answers": {}, "ops": []}


def _children(value: str | None) -> list[str]:
    """The child names in an interior node's value (`a/b/c`), bounded and sane."""
    names = [n.strip() for n in (value or "").split("/")]
    good = [n for n in names if n and n not in (".", "..") and len(n) <= 64]
    return good[:MAX_CHILDREN]


def requests(rot: dict[str, Any]) -> list[str]:
    """The nodes to Get in the current (discovery) phase."""
    phase = rot["phase"]
    if phase == "list":
        return [ROOT]
    if phase == "server":
        return [f"{ROOT}/{x}/ServerID" for x in rot["accounts"]]
    if phase == "appauth":
        return [f"{ROOT}/{rot['acc']}/AppAuth"]
    if phase == "level":
        return [f"{ROOT}/{rot['acc']}/AppAuth/{y}/AAuthLevel" for y in rot["appauth"]]
    raise ValueError(f"no Gets in phase {phase}")


def replaces(
    rot: dict[str, Any], client: tuple[str, str], server: tuple[str, str]
) -> list[dict[str, str]]:
    """The Replaces of the last phase: (secret, nonce) for CLCRED and SRVCRED nodes."""
    out: list[dict[str, str]] = []
    base = f"{ROOT}/{rot['acc']}/AppAuth"
    for names, (secret, nonce) in ((rot["cl"], client), (rot["srv"], server)):
        for y in names:
            out.append({"target": f"{base}/{y}/AAuthSecret", "data": secret, "format": "chr"})
            out.append({"target": f"{base}/{y}/AAuthData", "data": nonce, "format": "b64"})
    return out


def record(rot: dict[str, Any], target: str, status: str, data: str | None) -> None:
    """A device's answer to one of the rotation's commands."""
    rot["answers"][target] = {"status": status, "data": data}
    verb = "Atomic" if target == "Atomic" else "Replace" if rot["phase"] == "replace" else "Get"
    code = int(status) if status.isascii() and status.isdigit() else 0
    rot["ops"].append({"verb": verb, "target": target, "status": code})


def _answer(rot: dict[str, Any], target: str) -> tuple[str, str | None]:
    a = rot["answers"].get(target) or {}
    return str(a.get("status", "0")), a.get("data")


def advance(rot: dict[str, Any], server_id: str) -> bool:
    """Move on once every command of the phase is answered.

    True when the Replaces' Statuses are all in (or never will be) and do not refuse them
    (the caller asks `outcome` which); False when the next phase is ready to be sent.
    RotationFailed when the rotation cannot go on, the device's refusal included.
    """
    phase = rot["phase"]
    if phase == "list":
        status, data = _answer(rot, ROOT)
        if status != "200":
            raise RotationFailed(f"the device did not list {ROOT} (status {status})")
        accounts = _children(data)
        if not accounts:
            raise RotationFailed(f"the device has no account under {ROOT}")
        rot["accounts"], rot["phase"] = accounts, "server"
    elif phase == "server":
        mine = [
            x for x in rot["accounts"] if _answer(rot, f"{ROOT}/{x}/ServerID") == ("200", server_id)
        ]
        if not mine:
            raise RotationFailed(f"no DMAcc account on the device has ServerID {server_id!r}")
        rot["acc"], rot["phase"] = mine[0], "appauth"
    elif phase == "appauth":
        status, data = _answer(rot, f"{ROOT}/{rot['acc']}/AppAuth")
        names = _children(data) if status == "200" else []
        if not names:
            raise RotationFailed(f"{ROOT}/{rot['acc']} has no AppAuth nodes (status {status})")
        rot["appauth"], rot["phase"] = names, "level"
    elif phase == "level":
        levels = {
            y: (_answer(rot, f"{ROOT}/{rot['acc']}/AppAuth/{y}/AAuthLevel")[1] or "").strip()
            for y in rot["appauth"]
        }
        rot["cl"] = [y for y, lv in levels.items() if lv == CLIENT_LEVEL][:MAX_CREDS]
        rot["srv"] = [y for y, lv in levels.items() if lv == SERVER_LEVEL][:MAX_CREDS]
        missing = [
            lv for lv, ys in ((CLIENT_LEVEL, rot["cl"]), (SERVER_LEVEL, rot["srv"])) if not ys
        ]
        if missing:
            raise RotationFailed(
                f"{ROOT}/{rot['acc']}/AppAuth has no {' or '.join(missing)} credentials"
            )
        rot["phase"] = "replace"
    elif phase == "replace":
        verdict, why = outcome(rot)
        if verdict == REFUSED:
            raise RotationFailed(why)
        return True  # taken, or unknown: see outcome()
    rot["answers"] = {}
    return False


def outcome(rot: dict[str, Any]) -> tuple[str, str]:
    """What the device's Statuses say of the Replaces: TAKEN, REFUSED or UNKNOWN, and why.

    A status of 0 is one that never came. Only a refused Atomic is definite: an Atomic
    device applies all of its commands or none; anything short of all 200 but not that
    leaves the device holding either set.
    """
    ops = [op for op in rot["ops"] if op["verb"] in ("Atomic", "Replace")]
    atomic = [op["status"] for op in ops if op["verb"] == "Atomic"]
    bad = "; ".join(
        f"{op['target'] if op['verb'] == 'Atomic' else op['verb'] + ' ' + op['target']}: "
        f"{op['status'] or 'no Status'}"
        for op in ops
        if op["status"] != 200
    )
    expected = 2 * (len(rot.get("cl", [])) + len(rot.get("srv", [])))
    replaced = [op for op in ops if op["verb"] == "Replace"]
    if atomic == [200] and len(replaced) >= expected and not bad:
        return TAKEN, ""
    if atomic and atomic[-1] not in (0, 200):
        return REFUSED, f"the device did not take the new credentials; the old ones stay: {bad}"
    return UNKNOWN, (
        "the device's answer to the new credentials is incomplete ("
        + (bad or "no answer")
        + "); both sets are accepted until it signs in with one"
    )


def summary(rot: dict[str, Any]) -> str:
    """The run's output: which nodes were rewritten (no values)."""
    base = f"{ROOT}/{rot.get('acc')}/AppAuth"
    return (
        f"DM account {ROOT}/{rot.get('acc')}: new client credentials in "
        f"{', '.join(f'{base}/{y}' for y in rot.get('cl', []))}; new server credentials in "
        f"{', '.join(f'{base}/{y}' for y in rot.get('srv', []))}"
    )
