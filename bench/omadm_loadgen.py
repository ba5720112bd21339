"""The OMA DM load generator of B9, in its own process (bench/omadm.py starts it).

    python bench/omadm_loadgen.py --url URL --ca-file F --password P --devices N \\
        --concurrency C --duration D [--httpx]

1. Registers N OMA DM devices through the admin API (POST /api/v1/omadm/devices, md5
   credentials both ways) and keeps the credentials the answer holds.
2. Warm-up: one whole session per device (package 1, then Status/Results for the server's
   Gets of ./DevDetail), which sets the device's inventory time; with a long inventory
   interval on the server, later sessions are DevInfo-only.
3. Measured: C workers, each owning the devices k, k+C, … and looping over them for D
   seconds. Every session has a new SessionID and is one message each way: package 1
   (Alert 1201 + Replace of the ./DevInfo nodes, md5 Cred made with the NextNonce of the
   device's previous answer) → Status 212 with a fresh NextNonce and the server's own md5
   Cred (checked), no management commands: the session is over.

Output: one JSON object per line on stdout, like bench/loadgen.py (`registered`,
`measuring`, `result`).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from custos.omadm import auth, codec
from custos.omadm import message as m
from loadgen import Admin, emit, percentile
from rawhttp import RawHTTP

SID_MARK = "B9SESSIONIDMARK"
CRED_MARK = "B9CREDENTIALSMARK"
DEVINFO = ("./DevInfo/DevId", "./DevInfo/Man", "./DevInfo/Mod", "./DevInfo/DmV", "./DevInfo/Lang")
DEVDETAIL = {
    "./DevDetail/DevTyp": "phone",
    "./DevDetail/OEM": "Acme",
    "./DevDetail/FwV": "fw-17",
    "./DevDetail/SwV": "4.2.1",
    "./DevDetail/HwV": "r3",
}
MANAGEMENT = frozenset(m.ITEM_COMMANDS | m.CONTAINERS) - {"Results"}


class SessionError(Exception):
    """The server did not answer a session the way a DevInfo-only session is answered."""


@dataclass
class DmDevice:
    """One registered OMA DM device: its DMAcc and where its nonce chain stands."""

    dev_id: str
    client_ha1: str
    server_ha1: str
    server_id: str
    client_nonce: str
    server_nonce: str
    template: bytes = b""
    sessions: int = 0
    tree: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_created(cls, created: dict[str, Any], url: str) -> DmDevice:
        dev = cls(
            dev_id=created["dev_id"],
            client_ha1=auth.ha1(created["client_name"], created["client_password"]),
            server_ha1=auth.ha1(created["server_id"], created["server_password"]),
            server_id=created["server_id"],
            client_nonce=created["client_nonce"],
            server_nonce=created["server_nonce"],
        )
        dev.tree = {
            "./DevInfo/DevId": dev.dev_id,
            "./DevInfo/Man": "Acme",
            "./DevInfo/Mod": "Roadrunner 3",
            "./DevInfo/DmV": "1.2",
            "./DevInfo/Lang": "en-US",
            **DEVDETAIL,
        }
        # package 1 as the library writes it, with marks where the session id and the
        # credentials go: each session only substitutes them
        pkg1 = m.Message(
            header=m.Header(
                session_id=SID_MARK,
                msg_id="1",
                target=url,
                source=dev.dev_id,
                cred=m.Cred(type=auth.AUTH_MD5, format="b64", data=CRED_MARK),
            ),
            commands=[
                m.Command(name="Alert", cmd_id="1", data="1201"),
                m.Command(
                    name="Replace",
                    cmd_id="2",
                    items=[m.Item(source=uri, data=dev.tree[uri]) for uri in DEVINFO],
                ),
            ],
        )
        dev.template = codec.encode(m.build(pkg1), codec.XML_TYPE)
        assert dev.template.count(SID_MARK.encode()) == 1
        return dev

    def package1(self) -> bytes:
        """This device's next package 1: a new SessionID, md5 credentials on the last nonce."""
        self.sessions += 1
        cred = auth.md5_digest(self.client_ha1, auth.unb64(self.client_nonce))
        return self.template.replace(SID_MARK.encode(), str(self.sessions).encode()).replace(
            CRED_MARK.encode(), cred.encode()
        )

    def take_reply(self, data: bytes) -> m.Message:
        """Read an answer: the header's Status must be 200/212; keep its NextNonce."""
        try:
            root, _ = codec.decode(data, codec.XML_TYPE)
            reply = m.parse(root)
        except (codec.CodecError, m.MessageError) as exc:
            raise SessionError(f"unreadable answer: {exc}") from None
        hs = next((c for c in reply.commands if c.name == "Status" and c.cmd == "SyncHdr"), None)
        if hs is None or hs.data not in ("200", "212"):
            raise SessionError(f"header status {hs.data if hs else None}")
        if hs.chal is not None and hs.chal.next_nonce:
            self.client_nonce = hs.chal.next_nonce
        cred = reply.header.cred
        if cred is not None and not auth.check_md5(
            cred.data, self.server_ha1, auth.unb64(self.server_nonce)
        ):
            raise SessionError("the server's md5 credentials do not verify")
        return reply


class Poster:
    """POST a SyncML message: a bare keep-alive connection per worker, or a shared httpx client."""

    def __init__(self, url: str, ca_file: str, use_httpx: bool, concurrency: int) -> None:
        self.url = url
        self.path = "/omadm"
        self.ctx = ssl.create_default_context(cafile=ca_file) if url.startswith("https") else None
        self.http: httpx.AsyncClient | None = None
        if use_httpx:
            limits = httpx.Limits(
                max_connections=concurrency, max_keepalive_connections=concurrency
            )
            self.http = httpx.AsyncClient(
                base_url=url, verify=self.ctx or False, timeout=60, limits=limits
            )

    def connection(self) -> RawHTTP | None:
        return None if self.http is not None else RawHTTP(self.url, self.ctx)

    async def post(
        self, conn: RawHTTP | None, body: bytes, path: str | None = None
    ) -> tuple[int, bytes]:
        headers = {"content-type": codec.XML_TYPE}
        path = path or self.path
        if conn is not None:
            return await conn.post(path, headers, body)
        assert self.http is not None
        r = await self.http.post(path, content=body, headers=headers)
        return r.status_code, r.content

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()


async def register(admin: Admin, n: int, url: str, run: str) -> list[DmDevice]:
    """N OMA DM devices through the admin API, 16 registrations in flight."""
    out: list[DmDevice | None] = [None] * n
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            r = await admin.http.post(
                "/api/v1/omadm/devices",
                json={"dev_id": f"IMEI:{run}{i:07d}", "name": f"b9-dm-{i:05d}", "auth": "md5"},
                headers=admin.auth,
            )
            if r.status_code != 201:
                raise SystemExit(f"omadm_loadgen: registration: HTTP {r.status_code} {r.text}")
            out[i] = DmDevice.from_created(r.json(), url)

    await asyncio.gather(*(worker() for _ in range(16)))
    return [d for d in out if d is not None]


def answer(dev: DmDevice, reply: m.Message, msg_id: int) -> bytes | None:
    """The device's next message for a reply with management commands (None: session over)."""
    managed = [c for c in reply.commands if c.name in MANAGEMENT]
    if not managed and reply.final:
        return None
    ref = reply.header.msg_id
    cmds = [m.Command(name="Status", msg_ref=ref, cmd_ref="0", cmd="SyncHdr", data="212")]
    for c in managed:
        uri = c.items[0].target if c.items else None
        code = "200" if c.name != "Get" or uri in dev.tree else "404"
        cmds.append(
            m.Command(
                name="Status", msg_ref=ref, cmd_ref=c.cmd_id, cmd=c.name, target_ref=uri, data=code
            )
        )
        if c.name == "Get" and uri in dev.tree:
            cmds.append(
                m.Command(
                    name="Results",
                    msg_ref=ref,
                    cmd_ref=c.cmd_id,
                    items=[m.Item(source=uri, data=dev.tree[uri])],
                )
            )
    for i, c in enumerate(cmds, 1):
        c.cmd_id = str(i)
    header = m.Header(
        session_id=str(dev.sessions), msg_id=str(msg_id), target=reply.header.source,
        source=dev.dev_id,
    )  # fmt: skip
    return codec.encode(m.build(m.Message(header=header, commands=cmds)), codec.XML_TYPE)


async def full_session(poster: Poster, conn: RawHTTP | None, dev: DmDevice) -> int:
    """A whole session (the warm-up: it answers the DevDetail Gets); the messages it took."""
    body: bytes | None = dev.package1()
    msgs = 0
    path: str | None = None
    while body is not None:
        msgs += 1
        if msgs > 10:
            raise SessionError("the warm-up session did not end")
        status, data = await poster.post(conn, body, path)
        if status != 200:
            raise SessionError(f"HTTP {status}: {data[:200]!r}")
        reply = dev.take_reply(data)
        if reply.header.resp_uri:
            # the rest of the session goes to the RespURI (it carries the session's token)
            path = urlsplit(reply.header.resp_uri)._replace(scheme="", netloc="").geturl()
        body = answer(dev, reply, msgs + 1)
    return msgs


async def main_async(args: argparse.Namespace) -> None:
    admin = Admin(args.url, args.ca_file, args.password)
    await admin.login()
    t0 = time.perf_counter()
    run = f"{int(time.time()) % 10**8:08d}"
    devices = await register(admin, args.devices, args.url + "/omadm", run)
    await admin.http.aclose()
    emit("registered", devices=len(devices), seconds=time.perf_counter() - t0)

    poster = Poster(args.url, args.ca_file, args.httpx, args.concurrency)
    t0 = time.perf_counter()
    warm_msgs: list[int] = []
    todo = iter(devices)

    async def warm() -> None:
        conn = poster.connection()
        for dev in todo:
            warm_msgs.append(await full_session(poster, conn, dev))
        if conn is not None:
            await conn.close()

    await asyncio.gather(*(warm() for _ in range(min(args.concurrency, 16))))
    emit(
        "warmed",
        seconds=time.perf_counter() - t0,
        messages_per_session=sum(warm_msgs) / max(len(warm_msgs), 1),
    )

    lat: list[float] = []
    errors, long_sessions, last_error = 0, 0, ""
    emit("measuring", devices=len(devices), concurrency=args.concurrency)
    cpu0 = time.process_time()
    started = time.perf_counter()
    deadline = started + args.duration

    async def worker(k: int) -> None:
        nonlocal errors, long_sessions, last_error
        conn = poster.connection()
        mine = devices[k :: args.concurrency]
        i = 0
        while mine and time.perf_counter() < deadline:
            dev = mine[i % len(mine)]
            i += 1
            body = dev.package1()
            sent = time.perf_counter()
            try:
                status, data = await poster.post(conn, body)
                took = time.perf_counter() - sent
                if status != 200:
                    raise SessionError(f"HTTP {status}: {data[:200]!r}")
                reply = dev.take_reply(data)
                if [c for c in reply.commands if c.name in MANAGEMENT] or not reply.final:
                    long_sessions += 1
                    raise SessionError("the answer carries management commands")
                bad = [c.data for c in reply.commands if c.name == "Status" and c.data != "200"]
                if bad != ["212"]:
                    raise SessionError(f"statuses {bad}")
            except (OSError, ConnectionError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
                errors += 1
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            except SessionError as exc:
                errors += 1
                last_error = f"{dev.dev_id}: {exc}"
                continue
            lat.append(took)
        if conn is not None:
            await conn.close()

    await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    await poster.aclose()
    emit(
        "result",
        seconds=elapsed,
        sessions=len(lat),
        p50_ms=1000 * percentile(lat, 50),
        p99_ms=1000 * percentile(lat, 99),
        errors=errors,
        long_sessions=long_sessions,
        last_error=last_error,
        loadgen_measured_cpu_s=cpu,
        request_bytes=len(devices[0].package1()) if devices else 0,
        client="httpx" if args.httpx else "raw asyncio HTTP/1.1 (bench/rawhttp.py)",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the server's base URL")
    ap.add_argument("--ca-file", required=True)
    ap.add_argument("--password", required=True, help="the admin password")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=64, help="sessions in flight")
    ap.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    ap.add_argument("--httpx", action="store_true", help="httpx instead of bare connections")
    args = ap.parse_args()
    if not 1 <= args.devices <= 1_000_000 or not 1 <= args.concurrency <= 10_000:
        ap.error("--devices 1..1,000,000 and --concurrency 1..10,000")
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
