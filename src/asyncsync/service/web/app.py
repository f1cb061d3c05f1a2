"""The browser's HTTP side: routes, auth, object streaming, and the server itself.

Routes (GET and HEAD only; nothing here writes to the store): ``/`` the runs, ``/run/PATH``
one run, ``/compare?run=A&run=B&metric=M`` curves overlaid, ``/api/runs`` the runs as JSON,
``/obj/KEY`` an object below PREFIX (streamed, a ``Range`` passed through to the store's
ranged GET; with ``presign``, a redirect to a short-lived presigned URL), ``/static/NAME``
the vendored uPlot and the page's own script and styles, ``/healthz``. Object keys are
checked segment by segment (no empty, ``.`` or ``..`` segment, nothing of asyncsync's own but
run records), so a request names an object under PREFIX or gets 404. Every answer carries a
Content-Security-Policy without inline script, and objects are served as images, plain text
or downloads only, so an HTML object in the bucket cannot run in the browser's origin.

`BrowserServer` binds loopback unless told otherwise, and refuses any other address without
credentials (`auth.Credentials`); on loopback without credentials it answers only requests
whose Host is a loopback name, so a web page elsewhere cannot reach it by DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from types import TracebackType
from urllib.parse import urlsplit

from aiohttp import web

from ...errors import ConfigError, NotFound, NotSupported, StoreError
from ...names import printable
from ..health import _is_loopback, format_listen_address, start_listening
from .auth import Credentials
from .catalog import RunCatalog
from .markup import Html
from .pages import compare_page, error_page, pretty_record, run_page, runs_page

log = logging.getLogger("asyncsync")

STATIC = {
    "uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css",
    "app.js": "text/javascript", "app.css": "text/css", "uPlot.LICENSE": "text/plain",
}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_OWN = "_asyncsync"
_CHUNK = 256 * 1024
# What an object is served as: images shown, text shown as plain text, the rest downloaded.
_IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
           ".gif": "image/gif", ".webp": "image/webp"}
_TEXT = (".csv", ".yaml", ".yml", ".json", ".txt", ".log", ".md")
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
ARGS_MAX = 256 * 1024


@dataclass(frozen=True)
class BrowserSettings:
    presign: bool = False
    presign_expiry: int = 300
    # The store's origin (scheme://host:port), allowed as an image source with presign.
    store_origin: str | None = None


def safe_key(relative: str) -> bool:
    """A key below PREFIX that the object route may serve."""
    if not relative or relative.startswith("/") or "\\" in relative or "\0" in relative:
        return False
    segments = relative.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return False
    if _OWN in segments[:-1]:
        return segments[-2:] == [_OWN, "run.json"]  # a run record, nothing else of ours
    return True


def content_type_of(key: str) -> tuple[str, bool]:
    """(Content-Type, shown inline) of an object served from the bucket."""
    name = key.rpartition("/")[2].lower()
    suffix = name[name.rfind("."):] if "." in name else ""
    if suffix in _IMAGES:
        return _IMAGES[suffix], True
    if suffix in _TEXT:
        return "text/plain; charset=utf-8", True
    return "application/octet-stream", False


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as [start, end), or None to send the whole object; a range
    that cannot be satisfied raises `web.HTTPRequestRangeNotSatisfiable`."""
    if not header:
        return None
    found = _RANGE.fullmatch(header.strip())
    if found is None or (not found[1] and not found[2]):
        return None  # several ranges, or another unit: the whole object (RFC 9110 allows it)
    if not found[1]:
        length = int(found[2])
        if length == 0:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
        return max(0, size - length), size
    start = int(found[1])
    end = min(size, int(found[2]) + 1) if found[2] else size
    if start >= size or end <= start:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


class Browser:
    """The aiohttp application of one catalog."""

    def __init__(self, catalog: RunCatalog, settings: BrowserSettings,
                 credentials: Credentials | None, *, loopback_only: bool = False) -> None:
        self.catalog = catalog
        self.settings = settings
        self.credentials = credentials
        self.loopback_only = loopback_only  # set once bound: loopback without credentials
        self.where = catalog.destination.url
        images = "'self'" + (f" {settings.store_origin}" if settings.presign and
                             settings.store_origin else "")
        self._page_policy = (
            "default-src 'none'; script-src 'self'; style-src 'self'; "
            f"img-src {images} data:; connect-src 'self'; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self.runs)
        app.router.add_get("/api/runs", self.runs_json)
        app.router.add_get("/run/{path:.*}", self.run)
        app.router.add_get("/compare", self.compare)
        app.router.add_get("/obj/{key:.*}", self.object)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/healthz", self.healthz)
        return app

    # -- the guard: auth, the Host check, the headers every answer carries --------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if self.loopback_only and _host_name(request.host) not in _LOOPBACK_HOSTS:
            return self._secure(web.Response(status=421, text="this server answers to "
                                             "localhost only\n"), page=False)
        if self.credentials is not None and request.path != "/healthz":
            user = self.credentials.check(request.headers.get("Authorization"))
            if user is None:
                return self._secure(web.Response(status=401, text="authentication required\n",
                                                 headers={"WWW-Authenticate":
                                                          'Basic realm="asyncsync", '
                                                          'charset="UTF-8"'}), page=False)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status in (404, 405) and not request.path.startswith(("/obj/", "/api/")):
                response = self._html(error_page(exc.status, exc.reason, self.where),
                                      status=exc.status)
            else:
                response = exc
        except (StoreError, OSError) as exc:
            log.warning("%s %s: %s", request.method, printable(request.path), exc)
            response = self._html(error_page(502, "the store could not be read", self.where),
                                  status=502)
        return self._secure(response, page=response.content_type == "text/html")

    def _secure(self, response: web.StreamResponse, *, page: bool) -> web.StreamResponse:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Content-Security-Policy", self._page_policy if page else
                           "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                           "sandbox")
        headers.setdefault("Cache-Control", "no-store")
        return response

    def _html(self, page: Html, status: int = 200) -> web.Response:
        return web.Response(text=page, status=status, content_type="text/html",
                            charset="utf-8")

    # -- pages ----------------------------------------------------------------------------

    async def runs(self, request: web.Request) -> web.Response:
        runs = await self.catalog.runs()
        return self._html(runs_page(runs, self.where, time.time(),
                                    live=self.catalog.live is not None,
                                    listed_at=self.catalog.listed_at))

    async def runs_json(self, request: web.Request) -> web.Response:
        runs = await self.catalog.runs()
        return web.Response(text=json.dumps(runs, ensure_ascii=False),
                            content_type="application/json")

    async def run(self, request: web.Request) -> web.Response:
        path = request.match_info["path"].rstrip("/")
        described = await self.catalog.run(path)
        if described is None:
            raise web.HTTPNotFound(reason="no such run")
        base = self.catalog.base
        objects = await self.catalog.objects(path)
        inside = f"{base}{path}/" if path else base
        args = next((info for info in objects if info.key == f"{inside}args.yaml"), None)
        args_text = (await self.catalog.text(args.key) if args is not None
                     and args.size <= ARGS_MAX else None)
        record = (pretty_record(await self.catalog.text(described["record"]))
                  if described["record"] else None)
        page = run_page(described, curves=await self.catalog.curves(path), objects=objects,
                        base=base, args_yaml=args_text, record=record, where=self.where,
                        now=time.time())
        return self._html(page)

    async def compare(self, request: web.Request) -> web.Response:
        wanted = list(dict.fromkeys(request.query.getall("run", [])))[:12]
        known = {run["run"] for run in await self.catalog.runs()}
        runs = [path for path in wanted if path in known]
        if not runs:
            raise web.HTTPNotFound(reason="pick one run or more on the runs page")
        curves = {path: await self.catalog.curves(path) for path in runs}
        columns = list(dict.fromkeys(column for found in curves.values() if found
                                     for column in found.columns))
        metric = request.query.get("metric") or next(
            (c for c in ("metrics/mAP50-95(B)", "metrics/mAP50(B)") if c in columns),
            columns[0] if columns else "")
        return self._html(compare_page(runs, metric, columns, curves, self.where))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        response = web.Response(body=body, headers={"Content-Type": STATIC[name],
                                                    "Cache-Control": "public, max-age=3600"})
        return response

    # -- objects --------------------------------------------------------------------------

    async def object(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["key"]
        if not safe_key(relative):
            raise web.HTTPNotFound()
        key = self.catalog.base + relative
        store = await self.catalog.store()
        content_type, inline = content_type_of(relative)
        name = relative.rpartition("/")[2]
        if self.settings.presign:
            try:
                url = await store.presign_get(key, expires=self.settings.presign_expiry)
            except NotSupported:
                pass
            else:
                raise web.HTTPFound(url, headers={"Cache-Control": "no-store"})
        wanted = request.headers.get("Range")
        span = None
        if wanted:
            # The range is judged against the size (a suffix range, one past the end).
            found = await store.head_object(key)
            if found is None:
                raise web.HTTPNotFound()
            span = parse_range(wanted, found.size)
        try:
            async with store.get_object(key, offset=span[0] if span else 0,
                                        end=span[1] if span else None,
                                        chunk_size=_CHUNK) as body:
                info = body.info
                if span is None and request.headers.get("If-None-Match") == info.etag:
                    return web.Response(status=304, headers={"ETag": info.etag})
                response = self._object_response(info.etag, content_type, inline, name,
                                                 info.content_encoding)
                self._set_length(response, info.size, span)
                await response.prepare(request)
                if request.method != "HEAD":
                    async for chunk in body:
                        await response.write(chunk)
                await response.write_eof()
                return response
        except NotFound:
            raise web.HTTPNotFound() from None

    def _object_response(self, etag: str, content_type: str, inline: bool, name: str,
                         encoding: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": content_type, "ETag": etag, "Accept-Ranges": "bytes",
            "Cache-Control": "private, max-age=60",
        })
        if encoding:
            response.headers["Content-Encoding"] = encoding
        if not inline:
            quoted = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "object"
            response.headers["Content-Disposition"] = f'attachment; filename="{quoted}"'
        return response

    @staticmethod
    def _set_length(response: web.StreamResponse, size: int, span: tuple[int, int] | None
                    ) -> None:
        if span is None:
            response.content_length = size
            return
        response.set_status(206)
        response.headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
        response.content_length = span[1] - span[0]


def _host_name(host: str) -> str:
    """The name of a Host header, without its port."""
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def store_origin(endpoint_url: str | None) -> str:
    """The origin presigned URLs point at: the endpoint's, or AWS's."""
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        return f"{parts.scheme}://{parts.netloc}"
    return "https://*.amazonaws.com"


class BrowserServer:
    """The browser on ``host:port``, inside the running event loop (as `HealthServer`)."""

    def __init__(self, browser: Browser, host: str, port: int) -> None:
        self.browser = browser
        self._host, self._requested_port = host, port
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return format_listen_address(self._host, self._requested_port)

    @property
    def url(self) -> str:
        host = self._host if self._host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{format_listen_address(host, self.port)}/"

    async def start(self) -> None:
        credentials = self.browser.credentials
        if credentials is None and not is_loopback_name(self._host):
            raise ConfigError(
                f"serving on {self.address} would show the bucket to anyone who can reach "
                "it: give --auth-file or $ASYNCSYNC_SERVE_TOKEN, or listen on 127.0.0.1")
        runner = await start_listening(self.browser.application(), self._host,
                                       self._requested_port, self.address)
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        loopback = all(_is_loopback(address[0]) for address in runner.addresses)
        if credentials is None and not loopback:
            await self.stop()
            raise ConfigError(f"{self.address} is not loopback alone: give --auth-file or "
                              "$ASYNCSYNC_SERVE_TOKEN")
        self.browser.loopback_only = credentials is None
        log.warning("run browser of %s on %s%s", printable(self.browser.where), self.url,
                    " (basic auth)" if credentials is not None else "")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> BrowserServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
