"""The agent's loop: check in, store work before acting on it, run it once, report it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from custos import __version__, protocol
from custos.agent.client import DeviceClient, RequestRejected, ServerError, ServerRefused
from custos.agent.executor import run_process, script_argv
from custos.agent.identity import Identity
from custos.agent.inventory import collect_inventory, inventory_delta
from custos.agent.policy import PolicyEngine, lockwipe
from custos.agent.software import SoftwareManager, SoftwareStore
from custos.agent.state import AgentState, QueuedCommand
from custos.agent.tasks import TaskScheduler, TaskStore

log = logging.getLogger("custos.agent")

UPLOAD_CHUNK = 256 * 1024
MAX_BACKOFF_S = 300.0


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), UTC).isoformat()


def _epoch(value: Any) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value)).timestamp()


def default_reboot_argv() -> list[str]:
    """How this platform reboots (a one-minute delay lets the result reach the server)."""
    if sys.platform == "win32":
        return ["shutdown", "/r", "/t", "60"]
    return ["shutdown", "-r", "+1"]


class AgentRuntime:
    """One enrolled agent: its check-in loop and its command worker."""

    def __init__(
        self,
        state: AgentState,
        identity: Identity,
        *,
        client: DeviceClient | None = None,
        collect: Callable[[], dict[str, str]] = collect_inventory,
        inventory_interval_s: float = 3600.0,
        reboot_argv: list[str] | None = None,
        max_output: int = 1024 * 1024,
        push: bool = False,
        mqtt_ca_pem: str | None = None,
        root: Path | None = None,
    ) -> None:
        self.state = state
        self.identity = identity
        self.client = client or DeviceClient(
            identity.server_url, identity.device_id, identity.key, ca_pem=identity.ca_pem
        )
        self.collect = collect
        self.inventory_interval_s = inventory_interval_s
        self.reboot_argv = reboot_argv or default_reboot_argv()
        self.max_output = max_output
        self.push = push  # keep a push connection open for wake nudges while run_forever runs
        self.mqtt_ca_pem = mqtt_ca_pem  # the MQTT broker's CA, when it is not the Custos CA
        self.push_channel: Any = None  # a PushChannel while run_forever runs with push
        self._wake = asyncio.Event()
        self._woken_by_push = False
        self._work = asyncio.Event()
        self._full_inventory = False
        self._inventory_due = 0.0
        self._result_batch = 100
        # scheduled tasks run from the local state with no network, by the server's clock
        if not self.client.clock_offset and state.get("clock_offset"):
            self.client.clock_offset = float(state.get("clock_offset") or 0.0)
        self._task_batch = 100
        self._offline = False
        self.tasks = TaskScheduler(
            TaskStore(state._db),
            clock_offset=lambda: self.client.clock_offset,
            work_dir=state.dir / "tmp",
            on_result=self._task_result_ready,
        )
        self.software = SoftwareManager(
            SoftwareStore(state._db),
            self.client,
            ca_pem=identity.ca_pem,
            work_dir=state.dir / "software",
            server_now=self.server_now,
            on_change=self._software_changed,
        )
        # policies evaluate offline; only their reports (and reinstalls) need the server
        self.policy = PolicyEngine(
            state,
            root=root or Path(os.environ.get("CUSTOS_AGENT_ROOT") or "/"),
            software=self.software,
            send=self._send_policy_report,
            server_now=self.server_now,
            clock_offset=lambda: self.client.clock_offset,
        )

    async def _send_policy_report(self, body: bytes) -> Any:
        return await self.client.request("POST", protocol.DEVICE_API + "/policy/report", body=body)

    def _software_changed(self) -> None:
        """Something was installed or removed: send the inventory at the next check-in, now."""
        self._inventory_due = 0.0
        self._wake.set()
        self.policy.software_changed()  # a required package may now be there: look again

    # --- settings ---

    @property
    def interval(self) -> float:
        """Seconds between check-ins: a local override (a settings command) or the server's."""
        v = self.state.get("interval_override") or self.state.get("checkin_interval") or "60"
        return max(1.0, float(v))

    def server_now(self) -> float:
        """The server's idea of now: command times are the server's, this clock may be off."""
        return time.time() + self.client.clock_offset

    # --- check-in ---

    async def _inventory_part(self) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
        if time.monotonic() < self._inventory_due and not self._full_inventory:
            return None, None
        current = await asyncio.to_thread(self.collect)
        # what Custos deployments installed, so labels and reports can ask for it
        for pkg_name, pkg_version in self.software.store.all_installed().items():
            current[f"custos.pkg.{pkg_name}"] = pkg_version
        acked_raw = self.state.get("inventory_acked")
        version = int(self.state.get("inventory_version") or "0")
        if acked_raw is None or version <= 0 or self._full_inventory:
            return {"base": 0, "full": True, "set": current, "remove": []}, current
        acked = json.loads(acked_raw)
        changed, removed = inventory_delta(acked, current)
        if not changed and not removed:
            self._inventory_due = time.monotonic() + self.inventory_interval_s
            return None, None
        return {"base": version, "full": False, "set": changed, "remove": removed}, current

    async def checkin(self) -> int:
        """One check-in; returns the number of new commands received."""
        if lockwipe.is_wiped(self.state):
            raise DeviceWiped("this device was wiped")
        results = self.state.outbox(self._result_batch)
        acks = self.state.unacked()
        inv, snapshot = await self._inventory_part()
        payload: dict[str, Any] = {"agent_version": __version__, "results": results, "acks": acks}
        if self._woken_by_push:
            # tells the server to look for work even if its own index has not heard yet
            payload["wake"] = True
            self._woken_by_push = False
        if inv is not None:
            payload["inventory"] = inv
        task_results = self.tasks.store.outbox(self._task_batch)
        if task_results:
            payload["task_results"] = task_results
        try:
            resp = await self.client.checkin(payload)
        except RequestRejected as exc:
            if task_results:
                self._task_results_refused(task_results, alone=not results and inv is None)
            self._after_rejection(exc, results, inv is not None)
            raise
        self._result_batch = 100
        if isinstance(resp.get("server_time"), int | float):
            # follow the server's clock (signatures and command times are judged by it)
            self.client.clock_offset = float(resp["server_time"]) - time.time()
        if self.push_channel is not None:
            # the server names where to listen for nudges (absent: its WebSocket)
            self.push_channel.configure(resp.get("push"))
        accepted = list(resp.get("accepted_results", []))
        self.state.sent(accepted)
        pending_wipe = self.state.get(lockwipe.PENDING_WIPE)
        if pending_wipe and pending_wipe in accepted:
            sent = next((r for r in results if r.get("run_id") == pending_wipe), None)
            if lockwipe.wipe_succeeded(sent):
                # the server has the wipe's result: now the device forgets who it was
                lockwipe.erase_secrets(self.state)
                self.client._session = None
                raise DeviceWiped("this device was wiped")
            # a failed or partial wipe keeps the key: the device must still report and retry
            log.error("wipe %s did not succeed; the agent keeps its key", pending_wipe)
            self.state.set(**{lockwipe.PENDING_WIPE: ""})
        self._task_batch = 100
        if task_results:
            self.tasks.store.sent(list(resp.get("accepted_task_results") or []))
        self.state.mark_acked(acks)
        if inv is not None and snapshot is not None:
            if resp.get("inventory_resync"):
                self._full_inventory = True
            else:
                self.state.set(
                    inventory_acked=json.dumps(snapshot, sort_keys=True),
                    inventory_version=str(resp["inventory_version"]),
                )
                self._full_inventory = False
                self._inventory_due = time.monotonic() + self.inventory_interval_s
        self.state.set(
            checkin_interval=str(resp.get("checkin_interval", 60)),
            last_checkin=_iso(),
            clock_offset=f"{self.client.clock_offset:.1f}",
        )
        return len(self._enqueue(resp.get("commands") or []))

    def _enqueue(self, commands: list[dict[str, Any]]) -> list[str]:
        """Put delivered commands in the local queue (a run id seen before is ignored)."""
        if commands:
            self.state.enqueue(
                [
                    {
                        "run_id": c["run_id"],
                        "kind": c["kind"],
                        "payload": c.get("payload") or {},
                        "not_before": _epoch(c.get("not_before")),
                        "expires_at": _epoch(c.get("expires_at")),
                    }
                    for c in commands
                ]
            )
            self._work.set()
        return [str(c["run_id"]) for c in commands]

    def _delivered(self, response: dict[str, Any]) -> list[str]:
        """Work handed down the push socket: a check-in response, queued like one."""
        if isinstance(response.get("server_time"), int | float):
            self.client.clock_offset = float(response["server_time"]) - time.time()
        commands = response.get("commands") or []
        if not isinstance(commands, list):
            return []
        return self._enqueue(commands)

    def _after_rejection(
        self, exc: RequestRejected, results: list[dict[str, Any]], had_inventory: bool
    ) -> None:
        """Make sure a refused check-in is not sent again as it was (it would never pass)."""
        log.error("the server refused a check-in: %s", exc)
        if had_inventory:
            # try the inventory again later, in full; the results must not wait for it
            self._inventory_due = time.monotonic() + self.inventory_interval_s
            self._full_inventory = False
            self.state.set(inventory_version="0")
            return
        if len(results) > 1:
            self._result_batch = 1  # find the one the server refuses
            return
        for res in results:
            if res.get("result", {}).get("undeliverable"):
                log.error("dropping result %s: the server refuses even its summary", res["run_id"])
                self.state.sent([res["run_id"]])
                continue
            state = res.get("state")
            self.state.replace_result(
                res["run_id"],
                {
                    "run_id": res["run_id"],
                    "state": state if state in ("succeeded", "failed") else "failed",
                    "truncated": True,
                    "error": f"the full result was refused by the server ({exc.status} "
                    f"{exc.code}): {exc.detail[:500]}",
                    "result": {"undeliverable": True},
                },
            )

    def _more_to_send(self) -> bool:
        return (
            bool(self.state.outbox(1))
            or bool(self.state.unacked())
            or self._full_inventory
            or self.tasks.store.pending() > 0
        )

    def _task_result_ready(self) -> None:
        # report now while the server answers; while it is away, the check-in backoff rules
        if not self._offline:
            self._wake.set()

    def _task_results_refused(self, sent: list[dict[str, Any]], *, alone: bool) -> None:
        """A refused check-in is never sent again as it was: isolate, then drop, the culprit."""
        if len(sent) > 1:
            self._task_batch = 1
        elif alone:
            log.error(
                "dropping result %s of task %s: the server refuses it",
                sent[0].get("seq"),
                sent[0].get("task_id"),
            )
            self.tasks.store.sent(sent)

    # --- commands ---

    def recover(self) -> None:
        """Close commands that were running when the agent stopped: never run them twice."""
        for run_id in self.state.interrupted():
            log.warning(
                "run %s was interrupted by an agent restart; reporting, not re-running", run_id
            )
            self.state.finish(
                run_id,
                {
                    "run_id": run_id,
                    "state": "interrupted",
                    "error": "the agent stopped while this command was running; it was not re-run",
                    "finished_at": _iso(),
                },
            )

    async def run_due(self) -> int:
        """Run every command whose time has come, one after another; returns how many ran."""
        n = 0
        for cmd in self.state.runnable(self.server_now()):
            if not self.state.claim(cmd.run_id):
                continue
            started = time.time()
            try:
                result = await self._execute(cmd)
            except Exception as exc:  # a bug in one handler must not kill the agent
                log.exception("run %s failed", cmd.run_id)
                result = {"state": "failed", "error": f"agent error: {exc}"}
            result.update(run_id=cmd.run_id, started_at=_iso(started), finished_at=_iso())
            result.setdefault("state", "succeeded")
            self.state.finish(cmd.run_id, result)
            n += 1
            if cmd.kind == "reboot" and result["state"] == "succeeded":
                await self._send_results_quietly()
                await run_process(self.reboot_argv, timeout=60, max_output=4096)
        return n

    async def _send_results_quietly(self) -> None:
        try:
            await self.checkin()
        except (ServerError, RequestRejected) as exc:
            log.warning("could not report before reboot: %s", exc)

    async def _execute(self, cmd: QueuedCommand) -> dict[str, Any]:
        if cmd.expires_at is not None and cmd.expires_at <= self.server_now():
            return {"state": "expired", "error": "the command expired before it could run"}
        p = cmd.payload
        log.info("running %s %s", cmd.kind, cmd.run_id)
        if cmd.kind == "exec":
            res = await run_process(
                [str(a) for a in p["argv"]],
                timeout=float(p.get("timeout_s", 300)),
                max_output=self.max_output,
            )
            return self._process_result(res)
        if cmd.kind == "script":
            return await self._script(cmd.run_id, p)
        if cmd.kind == "ping":
            return {
                "result": {"pong": True, "agent_time": time.time(), "agent_version": __version__}
            }
        if cmd.kind == "settings":
            interval = int(p["checkin_interval"])
            self.state.set(interval_override=str(interval))
            return {"result": {"checkin_interval": interval}}
        if cmd.kind == "reboot":
            return {"result": {"reboot": "scheduled", "argv": self.reboot_argv}}
        if cmd.kind == "diagnose":
            from custos.agent import diagnose

            return {"result": {"snapshot": await asyncio.to_thread(diagnose.snapshot)}}
        if cmd.kind == "collect_file":
            return await self._collect(cmd.run_id, p)
        if cmd.kind in ("schedule", "unschedule"):
            return self.tasks.handle(cmd.kind, p)
        if cmd.kind == "software":
            return self.software.handle(p)
        if cmd.kind == "policy":
            return self.policy.handle(p)
        if cmd.kind in ("lock", "unlock", "wipe"):
            return await self._lock_or_wipe(cmd)
        return {
            "state": "rejected",
            "error": f"this agent does not know the command kind {cmd.kind!r}",
        }

    async def _lock_or_wipe(self, cmd: QueuedCommand) -> dict[str, Any]:
        bundle = self.policy.store.bundle() or {}
        sandbox = self.policy.sandbox
        if cmd.kind == "wipe":
            return await lockwipe.wipe(
                cmd.payload,
                run_id=cmd.run_id,
                state=self.state,
                sandbox=sandbox,
                managed_data=[str(p) for p in bundle.get("managed_data") or []],
                software=self.software.store,
            )
        accounts = [str(a) for a in bundle.get("managed_accounts") or []]
        handler = lockwipe.lock if cmd.kind == "lock" else lockwipe.unlock
        return await handler(cmd.payload, sandbox=sandbox, managed_accounts=accounts)

    def _process_result(self, res: Any) -> dict[str, Any]:
        if res.error:
            return {"state": "failed", "error": res.error, "exit_code": None}
        state = "succeeded" if res.exit_code == 0 and not res.timed_out else "failed"
        out: dict[str, Any] = {
            "state": state,
            "exit_code": res.exit_code,
            "stdout": res.stdout,
            "stderr": res.stderr,
            "truncated": res.truncated,
            "result": {"duration_s": round(res.duration_s, 3), "timed_out": res.timed_out},
        }
        if res.timed_out:
            out["error"] = "timed out; the process group was killed"
        return out

    async def _script(self, run_id: str, p: dict[str, Any]) -> dict[str, Any]:
        interpreter = str(p["interpreter"])
        suffix = {"sh": ".sh", "python": ".py", "powershell": ".ps1"}.get(interpreter, "")
        tmp = self.state.dir / "tmp"
        tmp.mkdir(exist_ok=True, mode=0o700)
        path = tmp / f"{run_id}{suffix}"
        path.write_text(str(p["script"]))
        try:
            argv = script_argv(interpreter, str(path), [str(a) for a in p.get("args", [])])
            res = await run_process(
                argv, timeout=float(p.get("timeout_s", 300)), max_output=self.max_output
            )
            return self._process_result(res)
        except ValueError as exc:
            return {"state": "rejected", "error": str(exc)}
        finally:
            path.unlink(missing_ok=True)

    async def _collect(self, run_id: str, p: dict[str, Any]) -> dict[str, Any]:
        raw = str(p["path"])
        parts = PureWindowsPath(raw).parts if sys.platform == "win32" else PurePosixPath(raw).parts
        if not os.path.isabs(raw) or ".." in parts:
            return {"state": "rejected", "error": "path must be absolute and must not contain '..'"}
        limit = int(p.get("max_bytes", 0))
        base = f"{protocol.DEVICE_API}/uploads/{run_id}"
        restarts = transient = 0
        try:
            size, digest = await asyncio.to_thread(_inspect_file, Path(raw), limit)
            meta = json.dumps({"size": size, "sha256": digest, "source_path": raw}).encode()
            up: dict[str, Any] | None = None  # None: (re-)announce and learn the server's offset
            while up is None or not up["complete"]:
                try:
                    if up is None:
                        up = await self._upload_call("POST", base, meta)
                        continue
                    offset = int(up["received"])
                    chunk = await asyncio.to_thread(_read_at, Path(raw), offset, UPLOAD_CHUNK)
                    if not chunk:
                        raise _CollectError(f"{raw} shrank while it was being uploaded")
                    up = await self._upload_call("PUT", base, chunk, offset=offset)
                    transient = 0
                except RequestRejected as exc:
                    if exc.code == "hash_mismatch":
                        # the file changed under us: hash it again and start over, a few times
                        restarts += 1
                        if restarts > 3:
                            raise _CollectError(f"{raw} keeps changing while uploading") from None
                        size, digest = await asyncio.to_thread(_inspect_file, Path(raw), limit)
                        meta = json.dumps(
                            {"size": size, "sha256": digest, "source_path": raw}
                        ).encode()
                    elif exc.code != "offset_mismatch":
                        raise
                    up = None
                except ServerError as exc:
                    # a dropped link or a restarting server: resume where the server is
                    transient += 1
                    if transient > 8:
                        raise _CollectError(f"upload kept failing: {exc}") from None
                    await asyncio.sleep(min(60.0, 2.0**transient))
                    up = None
        except _CollectError as exc:
            return {"state": "failed", "error": str(exc)}
        except RequestRejected as exc:
            return {"state": "failed", "error": f"upload refused: {exc.detail}"}
        return {"result": {"size": size, "sha256": digest, "path": raw}}

    async def _upload_call(
        self, method: str, path: str, body: bytes, *, offset: int | None = None
    ) -> dict[str, Any]:
        if offset is None:
            result: dict[str, Any] = await self.client.request(method, path, body=body)
        else:
            result = await self.client.request(
                method,
                path,
                body=body,
                params={"offset": str(offset)},
                content_type="application/octet-stream",
            )
        return result

    # --- loops ---

    async def run_once(self) -> None:
        """One full cycle: check in, run what is due, report; raises ServerRefused if refused."""
        self.recover()
        await self.checkin()
        ran = await self.run_due()
        await self.tasks.run_pending()
        await self.policy.run_once()
        if ran or self._more_to_send():
            await self.checkin()

    def _pushed(self) -> None:
        """A push nudge arrived: check in now, saying so."""
        self._woken_by_push = True
        self._wake.set()

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Check in at the interval (with jitter), back off on errors, until stop is set."""
        self.recover()
        worker = asyncio.create_task(self._worker(stop))
        tasks = [
            worker,
            asyncio.create_task(self.tasks.run_forever(stop), name="tasks"),
            asyncio.create_task(self.software.run_forever(stop), name="software"),
            asyncio.create_task(self.policy.run_forever(stop), name="policy"),
        ]
        if self.push:
            from custos.agent.push import PushChannel

            self.push_channel = PushChannel(
                self.client,
                self._pushed,
                state=self.state,
                ca_pem=self.identity.ca_pem,
                mqtt_ca_pem=self.mqtt_ca_pem,
                on_work=self._delivered,
                on_acked=self.state.mark_acked,
            )
            tasks.append(asyncio.create_task(self.push_channel.run(), name="push"))
        failures = 0
        immediate = 0
        try:
            while not stop.is_set():
                # cleared before, not after, the check-in: a nudge that arrives while it is
                # under way may be for work it did not see, so it triggers another round
                self._wake.clear()
                try:
                    await self.checkin()
                    failures = 0
                    self._offline = False
                    # results or acks still waiting go at once, a few rounds at most
                    if self._more_to_send() and immediate < 5:
                        immediate += 1
                        delay = 0.0
                    else:
                        immediate = 0
                        delay = self.interval * random.uniform(0.9, 1.1)  # noqa: S311 - jitter
                except (ServerRefused, DeviceWiped):
                    raise
                except (ServerError, RequestRejected) as exc:
                    failures += 1
                    self._offline = True
                    delay = min(MAX_BACKOFF_S, 2.0 ** min(failures, 10)) * random.uniform(0.5, 1.0)  # noqa: S311
                    asked = getattr(exc, "retry_after", None)
                    if asked:
                        # an overloaded server says when; spread over twice that, not all at once
                        delay = max(delay, asked * random.uniform(1.0, 2.0))  # noqa: S311
                    log.warning("check-in failed (%s); retrying in %.1fs", exc, delay)
                if delay > 0:
                    await self._sleep(stop, delay)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            due = self.state.next_due()
            timeout = max(0.05, due - self.server_now()) if due else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), timeout=timeout)
            self._work.clear()
            if await self.run_due():
                self._wake.set()  # report results now, not at the next interval


class DeviceWiped(Exception):
    """A wipe's result reached the server and the key is erased: the agent must stop."""


class _CollectError(Exception):
    pass


def _inspect_file(path: Path, limit: int) -> tuple[int, str]:
    """Size and SHA-256 of a regular file within the limit."""
    try:
        st = path.stat()
    except OSError as exc:
        raise _CollectError(f"cannot read {path}: {exc.strerror}") from None
    if not path.is_file():
        raise _CollectError(f"{path} is not a regular file")
    if st.st_size > limit:
        raise _CollectError(f"{path} is {st.st_size} bytes; the limit is {limit}")
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise _CollectError(f"cannot read {path}: {exc.strerror}") from None
    return st.st_size, h.hexdigest()


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)
