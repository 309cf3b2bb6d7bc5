"""The live page's door over real sockets: headers, methods, Host and Origin, token, caps."""

from __future__ import annotations

import asyncio
import hashlib

import orjson
import pytest
import pytest_asyncio

from extproc import page as P
from extproc.diagnosis import Diagnosis
from extproc.failures import Failures
from extproc.metrics import Metrics
from extproc.page import Limits, Page, PageError, check_listen

TOKEN = b"a-page-token-of-32-characters-xy"
REFUSED = Diagnosis("upstream_refused", "nothing listens", (("status", 503),
                    ("cluster", "outbound|80||orders.shop.svc.cluster.local")))  # fmt: skip


async def exchange(port: int, head: bytes, *, read_all: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    try:
        if read_all:
            return await asyncio.wait_for(reader.read(), 10)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


def get(path: str = "/", host: str = "127.0.0.1:9902", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def header(answer: bytes, name: bytes) -> bytes | None:
    head = answer.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.lower() == name:
            return value.strip()
    return None


@pytest_asyncio.fixture
async def door():
    async with Page(Failures(), "127.0.0.1:0", metrics=Metrics()) as page:
        yield page


async def until(condition) -> None:
    """Yield to the loop until `condition()` holds (the server runs on this loop)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


class TestHeaders:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("path", ["/", "/page.js", "/page.css", "/api/failures", "/nowhere"])
    async def test_security_headers_on_every_answer(self, door, path):
        """Every answer carries the CSP, nosniff and no-store."""
        answer = await exchange(door.port, get(path))
        assert header(answer, b"content-security-policy") == (
            b"default-src 'self'; frame-ancestors 'none'"
        )
        assert header(answer, b"x-content-type-options") == b"nosniff"
        assert header(answer, b"cache-control") == b"no-store"

    @pytest.mark.asyncio
    async def test_snapshot_is_json_of_the_table(self, door):
        """/api/failures is the table's snapshot: a recorded failure is a row."""
        door.failures.record(REFUSED, 1000.0)
        answer = await exchange(door.port, get("/api/failures"))
        body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert [(r["cluster"], r["reason"]) for r in body["rows"]] == [
            ("outbound|80||orders.shop.svc.cluster.local", "upstream_refused")
        ]


class TestRefusals:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
    async def test_get_only(self, door, method):
        """Any method but GET gets 405 with Allow: GET."""
        answer = await exchange(door.port, f"{method} / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                "content-length: 0\r\n\r\n".encode())  # fmt: skip
        assert status(answer) == 405
        assert header(answer, b"allow") == b"GET"

    @pytest.mark.asyncio
    @pytest.mark.parametrize("host", ["attacker.example:9902", "attacker.example", ""])
    async def test_foreign_host_refused(self, door, host):
        """A Host that is not a loopback name (a DNS rebinding) gets 403 and no data."""
        door.failures.record(REFUSED, 1000.0)
        answer = await exchange(door.port, get("/api/failures", host=host))
        assert status(answer) == 403
        assert b"orders" not in answer

    @pytest.mark.asyncio
    @pytest.mark.parametrize("host", ["localhost:9902", "127.0.0.1:8080", "[::1]:9902"])
    async def test_loopback_hosts_served(self, door, host):
        """Loopback names on any port (kubectl port-forward picks its own) are served."""
        assert status(await exchange(door.port, get("/", host=host))) == 200

    @pytest.mark.asyncio
    async def test_foreign_origin_refused(self, door):
        """A request whose Origin is another site gets 403."""
        answer = await exchange(
            door.port, get("/api/failures", extra="Origin: http://evil.example\r\n")
        )
        assert status(answer) == 403
        same = await exchange(
            door.port, get("/api/failures", extra="Origin: http://127.0.0.1:9902\r\n")
        )
        assert status(same) == 200

    @pytest.mark.asyncio
    async def test_head_too_large(self, door):
        """A head over MAX_HEAD gets 431."""
        answer = await exchange(door.port, get(extra=f"x-big: {'a' * P.MAX_HEAD}\r\n"))
        assert status(answer) == 431

    @pytest.mark.asyncio
    async def test_too_many_header_lines(self, door):
        """More than MAX_HEADERS header lines get 431."""
        lines = "".join(f"x-{i}: 1\r\n" for i in range(P.MAX_HEADERS + 1))
        assert status(await exchange(door.port, get(extra=lines))) == 431

    @pytest.mark.asyncio
    async def test_connection_cap(self):
        """Past the connection cap a new connection gets 503 at once."""
        async with Page(Failures(), "127.0.0.1:0", limits=Limits(max_connections=2)) as page:
            held = [await asyncio.open_connection("127.0.0.1", page.port) for _ in range(2)]
            try:
                for _, writer in held:  # each is counted once its head is being read
                    writer.write(b"GET / HTTP/1.1\r\n")
                    await writer.drain()
                await until(lambda: page.connections == 2)
                # Refused at once, before the head is read: the client only reads.
                reader, writer = await asyncio.open_connection("127.0.0.1", page.port)
                assert status(await asyncio.wait_for(reader.read(), 10)) == 503
                writer.close()
            finally:
                for _, writer in held:
                    writer.close()


class TestToken:
    def test_non_loopback_needs_a_token(self):
        """A non-loopback address without a token is refused before anything binds."""
        with pytest.raises(PageError, match="--ui-token-file"):
            check_listen("0.0.0.0:9902", b"")
        assert check_listen("0.0.0.0:9902", TOKEN) == ("0.0.0.0", 9902)

    def test_cli_refuses_to_start(self):
        """`extproc serve --ui-listen 0.0.0.0:PORT` without a token is a config error naming
        the option, before anything binds."""
        from extproc.cli import ConfigError, build_parser, serve_config

        args = build_parser().parse_args(["serve", "--ui-listen", "0.0.0.0:9902"])
        with pytest.raises(ConfigError, match="--ui-token-file"):
            serve_config(args)

    @pytest.mark.asyncio
    async def test_token_required_and_accepted(self):
        """With a token: 401 without it; a cookie from /?token= or a Bearer header is let in,
        from any Host; a wrong token is not."""
        async with Page(Failures(), "127.0.0.1:0", token=TOKEN) as page:
            port = page.port
            assert status(await exchange(port, get("/api/failures", host="pod:9902"))) == 401
            wrong = await exchange(port, get("/?token=" + "x" * 32))
            assert status(wrong) == 401 and header(wrong, b"set-cookie") is None
            given = await exchange(port, get("/?token=" + TOKEN.decode(), host="pod:9902"))
            assert status(given) == 303
            cookie = header(given, b"set-cookie")
            assert cookie is not None and TOKEN not in cookie and b"HttpOnly" in cookie
            value = cookie.split(b";")[0].decode()
            assert value == f"{P.COOKIE}={hashlib.sha256(TOKEN).hexdigest()}"
            with_cookie = get("/api/failures", host="pod:9902", extra=f"Cookie: {value}\r\n")
            assert status(await exchange(port, with_cookie)) == 200
            bearer = get("/api/failures", extra=f"Authorization: Bearer {TOKEN.decode()}\r\n")
            assert status(await exchange(port, bearer)) == 200


async def read_event(reader: asyncio.StreamReader) -> dict[str, bytes]:
    block = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
    fields = {}
    for line in block.strip().split(b"\n"):
        key, _, value = line.partition(b": ")
        fields[key.decode()] = value
    return fields


class TestEvents:
    @pytest.mark.asyncio
    async def test_stream_resyncs_then_updates(self, door):
        """A new stream gets the whole table (resync), then each tick's changed rows with ids."""
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(get("/api/events"))
        await reader.readuntil(b"\r\n\r\n")
        first = await read_event(reader)
        assert first["event"] == b"resync" and first["id"] == b"0"
        door.failures.record(REFUSED, 1000.0)
        door.broadcast()
        update = await read_event(reader)
        assert update["event"] == b"update" and update["id"] == b"1"
        assert orjson.loads(update["data"])["rows"][0]["reason"] == "upstream_refused"
        writer.close()

    @pytest.mark.asyncio
    async def test_last_event_id_resumes(self, door):
        """A reconnect with Last-Event-ID gets only the rows changed since, as an update."""
        door.failures.record(REFUSED, 1000.0)
        other = Diagnosis("no_route", "no route", (("cluster", "c2"),))
        door.failures.record(other, 1001.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(get("/api/events", extra="Last-Event-ID: 1\r\n"))
        await reader.readuntil(b"\r\n\r\n")
        event = await read_event(reader)
        assert event["event"] == b"update" and event["id"] == b"2"
        assert [r["cluster"] for r in orjson.loads(event["data"])["rows"]] == ["c2"]
        writer.close()

    @pytest.mark.asyncio
    async def test_client_cap(self):
        """Past MAX_EVENT_CLIENTS a new stream gets 503, and the refusal is counted."""
        metrics = Metrics()
        async with Page(Failures(), "127.0.0.1:0", metrics=metrics,
                        limits=Limits(max_event_clients=2)) as page:  # fmt: skip
            held = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", page.port)
                writer.write(get("/api/events"))
                await reader.readuntil(b"\r\n\r\n")
                held.append(writer)
            assert status(await exchange(page.port, get("/api/events"))) == 503
            assert metrics.page_clients["refused"]._value.get() == 1
            for writer in held:
                writer.close()

    @pytest.mark.asyncio
    async def test_slow_client_dropped_to_a_resync(self):
        """A client whose queue is full gets one resync instead of more queued updates."""
        metrics = Metrics()
        async with Page(Failures(), "127.0.0.1:0", metrics=metrics,
                        limits=Limits(queue=2, tick_seconds=3600)) as page:  # fmt: skip
            reader, writer = await asyncio.open_connection("127.0.0.1", page.port)
            writer.write(get("/api/events"))
            await reader.readuntil(b"\r\n\r\n")
            assert (await read_event(reader))["event"] == b"resync"
            for i in range(10):  # ten ticks before the writer runs once: the queue overflows
                page.failures.record(Diagnosis("no_route", "h", (("cluster", f"c{i}"),)), 1.0)
                page.broadcast()
            (client,) = page.clients
            assert client.queue.qsize() == 1
            event = await read_event(reader)
            assert event["event"] == b"resync" and event["id"] == b"10"
            assert len(orjson.loads(event["data"])["rows"]) == 10
            assert metrics.page_clients["resynced"]._value.get() == 1
            writer.close()


class TestTraceLinks:
    @pytest.mark.parametrize(
        "template",
        [
            "https://jaeger.example/trace",  # no placeholder
            "javascript:alert('{trace_id}')",
            'https://jaeger.example/trace/{trace_id}?q="x"',
            "https://jaeger.example/{trace_id}/{other}",
        ],
    )
    def test_bad_template_refused(self, template):
        """--ui-trace-url must be an http(s) URL holding {trace_id}, with nothing that could
        leave the link's attribute."""
        from extproc.cli import ConfigError, build_parser, serve_config

        argv = ["serve", "--ui-listen", "127.0.0.1:0", "--ui-trace-url", template]
        with pytest.raises(ConfigError, match="--ui-trace-url"):
            serve_config(build_parser().parse_args(argv))

    def test_template_accepted_only_with_the_page(self):
        """A good template is taken with --ui-listen, refused without it."""
        from extproc.cli import ConfigError, build_parser, serve_config

        good = "https://tempo.example/explore?trace={trace_id}"
        argv = ["serve", "--ui-listen", "127.0.0.1:0", "--ui-trace-url", good]
        assert serve_config(build_parser().parse_args(argv)).ui_trace_url == good
        with pytest.raises(ConfigError, match="needs --ui-listen"):
            serve_config(build_parser().parse_args(["serve", "--ui-trace-url", good]))


class TestDocsLinks:
    @pytest.mark.parametrize(
        "url",
        [
            "javascript:alert(1)",
            "docs.example/extproc-doctor",  # no scheme
            "https:///reasons",  # no host
            "https://docs.example/x?q=1",  # the page appends a path: a query would be lost
            "https://docs.example/#top",
            'https://docs.example/"onmouseover=alert(1)',
            "https://docs.example/a b",
            "https://docs.example/\u00e9",
            "https://docs.example/" + "a" * 1024,
        ],
    )
    def test_bad_url_refused(self, url):
        """--ui-docs-url must be an http(s) URL with a host and no query, fragment or
        character that could leave the link's attribute; serve refuses to start, naming it."""
        from extproc.cli import ConfigError, build_parser, serve_config

        argv = ["serve", "--ui-listen", "127.0.0.1:0", "--ui-docs-url", url]
        with pytest.raises(ConfigError, match="--ui-docs-url: expected an http"):
            serve_config(build_parser().parse_args(argv))

    def test_url_accepted_only_with_the_page(self):
        """A good URL is taken with --ui-listen (ending in "/", so the page appends to it),
        refused without it."""
        from extproc.cli import ConfigError, build_parser, serve_config

        argv = ["serve", "--ui-listen", "127.0.0.1:0", "--ui-docs-url", "https://d.example/x"]
        assert serve_config(build_parser().parse_args(argv)).ui_docs_url == "https://d.example/x/"
        with pytest.raises(ConfigError, match="needs --ui-listen"):
            serve_config(build_parser().parse_args(["serve", "--ui-docs-url", "https://d.example"]))

    def test_default_is_the_documentation_project_url(self, monkeypatch):
        """Without --ui-docs-url the page links into the installed package's Documentation
        Project-URL when its metadata names one (today it names none: no link)."""
        from extproc import published
        from extproc.cli import build_parser, serve_config

        argv = ["serve", "--ui-listen", "127.0.0.1:0"]
        assert serve_config(build_parser().parse_args(argv)).ui_docs_url == ""

        class Meta:
            def get_all(self, name: str) -> list[str]:
                return ["Source, https://src.example", "Documentation, https://docs.example/x"]

        monkeypatch.setattr(published, "metadata", lambda name: Meta())
        assert (
            serve_config(build_parser().parse_args(argv)).ui_docs_url == "https://docs.example/x/"
        )
        assert serve_config(build_parser().parse_args(["serve"])).ui_docs_url == ""
