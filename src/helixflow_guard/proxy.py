"""The HTTP side of the guard: read a request, ask the policy, forward it, stream the answer back.

One request per client connection (every answer says ``Connection: close``), so no request can
hide behind another in a kept-alive connection, and answers need no re-framing: the engine's
bytes after the status line and headers are passed on as they come (chunked logs, a ``wait``
held open for hours, an attach stream after ``101``). Request bodies are read whole (chunked or
``Content-Length``, at most ``Policy.max_body_bytes``) before the policy sees them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass

from helixflow_guard.policy import Decision, Policy, Refused, decide

log = logging.getLogger("helixflow_guard")

HEAD_LIMIT_BYTES = 64 * 1024
MAX_HEADERS = 100
LIST_LIMIT_BYTES = 64 * 1024 * 1024  # a container list read whole to cut it to helixflow's
PIPE_CHUNK_BYTES = 64 * 1024
LINGER_S = 2.0
REQUEST_READ_S = 60.0  # a request (head and body) arrives within this, or the connection is closed
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length", "host", "expect"}
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 502: "Bad Gateway"}


@dataclass(frozen=True)
class Upstream:
    """The engine's API: ``unix:///path/to/socket`` or ``tcp://host:port``."""

    url: str

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.url.startswith("unix://"):
            return await asyncio.open_unix_connection(self.url[len("unix://"):], limit=HEAD_LIMIT_BYTES)
        host, _, port = self.url.removeprefix("tcp://").rpartition(":")
        return await asyncio.open_connection(host, int(port), limit=HEAD_LIMIT_BYTES)


@dataclass
class Message:
    """A request or response head: start line, headers in order, and the body once read."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name]
        if len(values) > 1:
            raise Refused(f"header {name} given twice", status=400)
        return values[0] if values else None


async def read_head(reader: asyncio.StreamReader) -> Message:
    """Start line and headers; refuses folded, malformed, too many or too long header lines."""
    try:
        start = (await reader.readuntil(b"\r\n"))[:-2].decode("ascii")
        headers = []
        while True:
            line = (await reader.readuntil(b"\r\n"))[:-2].decode("latin-1")
            if not line:
                return Message(start, headers)
            name, colon, value = line.partition(":")
            if not colon or not TOKEN.fullmatch(name):
                raise Refused(f"malformed header line {line[:80]!r}", status=400)
            headers.append((name, value.strip(" \t")))
            if len(headers) > MAX_HEADERS:
                raise Refused("too many headers", status=431)
    except asyncio.LimitOverrunError:
        raise Refused(f"header line longer than {HEAD_LIMIT_BYTES} bytes", status=431) from None
    except UnicodeDecodeError:
        raise Refused("request line is not ASCII", status=400) from None


async def read_body(reader: asyncio.StreamReader, head: Message, *, limit: int, until_eof: bool = False) -> bytes:
    """The body framed by ``Transfer-Encoding: chunked`` or ``Content-Length`` (or, for an
    answer without either, by the end of the connection), refused beyond ``limit`` bytes."""
    encoding = head.header("transfer-encoding")
    length = head.header("content-length")
    if encoding is not None:
        if length is not None or encoding.lower() != "chunked":
            raise Refused("Transfer-Encoding other than chunked, or with Content-Length: refused", status=400)
        return await read_chunked(reader, limit=limit)
    if length is not None:
        if not length.isdigit():
            raise Refused(f"Content-Length {length!r} is not a number", status=400)
        if int(length) > limit:
            raise Refused(f"body of {length} bytes is over the guard's limit of {limit}", status=413)
        return await reader.readexactly(int(length))
    if until_eof:
        body = await reader.read(limit + 1)
        if len(body) > limit:
            raise Refused(f"answer over {limit} bytes", status=502)
        return body
    return b""


async def read_chunked(reader: asyncio.StreamReader, *, limit: int) -> bytes:
    body = bytearray()
    while True:
        size_line = (await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_line):
            raise Refused("malformed chunk size", status=400)
        size = int(size_line, 16)
        if len(body) + size > limit:
            raise Refused(f"chunked body over the guard's limit of {limit} bytes", status=413)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, ignored
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise Refused("chunk not followed by CRLF", status=400)


def request_line(request: Message) -> tuple[str, str]:
    """Method and target of an HTTP/1.x request line."""
    parts = request.start.split(" ")
    if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise Refused(f"malformed request line {request.start[:80]!r}", status=400)
    return parts[0], parts[1]


def encode_head(start: str, headers: list[tuple[str, str]]) -> bytes:
    return (start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def json_answer(status: int, payload: object) -> bytes:
    body = json.dumps(payload).encode()
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")]
    return encode_head(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", head) + body


class Guard:
    """Serves the guard on a listening socket; one task per client connection."""

    def __init__(self, policy: Policy, upstream: Upstream) -> None:
        self.policy = policy
        self.upstream = upstream

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, limit=HEAD_LIMIT_BYTES)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        request = None
        try:
            async with asyncio.timeout(REQUEST_READ_S):
                request = await read_head(reader)
                method, target = request_line(request)
                if (request.header("expect") or "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.body = await read_body(reader, request, limit=self.policy.max_body_bytes)
            decision = decide(self.policy, method, target, request.body,
                              upgrade=request.header("upgrade") is not None)
            target = await self.owned_target(decision, target)
            log.info("%s %s %s -> passed (%s)", peer, method, target, decision.route)
            await self.forward(request, method, target, decision, reader, writer)
        except Refused as refusal:
            log.warning("%s %s -> %d refused: %s", peer, request.start if request else "?", refusal.status, refusal)
            answer = json_answer(refusal.status, {"message": f"helixflow guard: {refusal}"})
            writer.write(answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
                         if request and request.start.startswith("HEAD ") else answer)
            await linger(reader, writer)
        except Passthrough as answer:
            writer.write(encode_head(answer.head.start, [(k, v) for k, v in answer.head.headers
                                                         if k.lower() not in HOP_BY_HOP]
                                     + [("Content-Length", str(len(answer.body))), ("Connection", "close")])
                         + answer.body)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except OSError as error:  # the engine's socket
            log.error("%s engine unreachable: %s", peer, error)
            writer.write(json_answer(502, {"message": f"helixflow guard: the Docker engine is unreachable: {error}"}))
        except Exception:  # noqa: BLE001 - an answer from the engine the guard cannot read
            log.exception("%s %s: unreadable answer from the engine", peer, request.start if request else "?")
            writer.write(json_answer(502, {"message": "helixflow guard: unreadable answer from the Docker engine"}))
        finally:
            try:
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def owned_target(self, decision: Decision, target: str) -> str:
        """Refuse calls on containers helixflow did not start; name them by ID from here on, so
        the container checked is the one acted on."""
        if decision.container is None:
            return target
        reader, writer = await self.upstream.connect()
        try:
            writer.write(encode_head(f"GET /containers/{decision.container}/json HTTP/1.1",
                                     [("Host", "docker"), ("Connection", "close")]))
            head = await read_head(reader)
            body = await read_body(reader, head, limit=LIST_LIMIT_BYTES, until_eof=True)
        finally:
            writer.close()
        status = int(head.start.split(" ")[1])
        if status != 200:
            raise Passthrough(head, body)
        container = json.loads(body)
        if not self.policy.owns((container.get("Config") or {}).get("Labels")):
            raise Refused(f"container {decision.container!r} was not started by helixflow (no label "
                          f"{self.policy.owner_label!r}): {decision.route} refused")
        return target.replace(f"/containers/{decision.container}", f"/containers/{container['Id']}", 1)

    async def forward(self, request: Message, method: str, target: str, decision: Decision,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = [(k, v) for k, v in request.headers if k.lower() not in HOP_BY_HOP]
        headers.append(("Host", "docker"))
        if decision.body or method in ("POST", "PUT"):
            headers.append(("Content-Length", str(len(decision.body))))
        if decision.upgrade and request.header("upgrade") is not None:
            headers += [("Connection", "Upgrade"), ("Upgrade", request.header("upgrade"))]
        else:
            headers.append(("Connection", "close"))
        up_reader, up_writer = await self.upstream.connect()
        try:
            up_writer.write(encode_head(f"{method} {target} HTTP/1.1", headers) + decision.body)
            await up_writer.drain()
            head = await read_head(up_reader)
            status = head.start.split(" ")[1]
            if decision.owned_list and status == "200":
                body = await read_body(up_reader, head, limit=LIST_LIMIT_BYTES, until_eof=True)
                writer.write(json_answer(200, self.policy.owned_only(json.loads(body))))
                return
            kept = [(k, v) for k, v in head.headers if status == "101" or k.lower() not in ("connection", "keep-alive")]
            writer.write(encode_head(head.start, kept if status == "101" else [*kept, ("Connection", "close")]))
            await relay(up_reader, writer, reader)
        finally:
            up_writer.close()


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After a refusal: half-close, and read what the client still sends (an unread body) for a
    moment, so that closing does not reset the connection before the client reads the answer."""
    try:
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(PIPE_CHUNK_BYTES):
                pass
    except (TimeoutError, ConnectionError):
        pass


class Passthrough(Exception):
    """The engine's own answer to the ownership look-up (e.g. 404 No such container), passed on."""

    def __init__(self, head: Message, body: bytes) -> None:
        super().__init__(head.start)
        self.head = head
        self.body = body


async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter, client: asyncio.StreamReader) -> None:
    """Copy the engine's bytes to the client until either side closes. What the client sends
    meanwhile is dropped (an attach gets no stdin)."""
    async def pipe() -> None:
        while chunk := await source.read(PIPE_CHUNK_BYTES):
            sink.write(chunk)
            await sink.drain()

    async def drain_client() -> None:
        while await client.read(PIPE_CHUNK_BYTES):
            pass

    tasks = [asyncio.create_task(pipe()), asyncio.create_task(drain_client())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() and not isinstance(task.exception(), ConnectionError):
            raise task.exception()
