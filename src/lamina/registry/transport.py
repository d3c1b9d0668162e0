"""HTTP to one registry: connections, TLS, authentication, retries, redirects.

Why the standard library (``http.client``) and not aiohttp, which lamina already pins
for the plugin server: the store's API is synchronous (``apply_diff`` reads a file
object), and a pull is a handful of long blob streams, not thousands of small requests.
A few threads, each with a blocking connection that ``readinto``s straight into our
buffers, keep the pipeline a plain chain of file objects, need no event loop bridged to
the applying thread, and add no dependency. ``http.client`` reads a Content-Length body
without copying it twice; TLS is the ``ssl`` module's.

What this layer promises the rest of the package:

* **where**: ``https`` with the system CAs (plus ``--ca-file`` and Docker's
  ``/etc/docker/certs.d/HOST/ca.crt``); plain ``http`` only for a registry on a
  loopback address or one named ``--insecure`` (which also accepts any certificate),
  and then only when the TLS handshake shows the other end speaks no TLS.
* **who**: every request carries what the registry's challenge asked for (see
  :mod:`lamina.registry.auth`); a 401 is answered once by re-authenticating.
* **again**: connection failures (refused, reset, cut mid-answer), ``429`` and
  ``500/502/503/504`` are retried with exponential backoff, at most
  :attr:`ClientOptions.retries` times per request. A request body must then be sendable
  again, so bodies are bytes. An answer's ``Retry-After`` (seconds, or an HTTP date)
  replaces the backoff: the retry comes no sooner. One that asks for more than
  :data:`MAX_RETRY_AFTER` (30 s) is refused, not waited for, nor cut short: the request
  fails at once with an error saying how long the registry asked for. A pull that
  sleeps for an hour looks hung, and one that comes back early only earns another
  429; the user can run it again later.
* **elsewhere**: redirects are followed (blob storage behind a CDN), without our
  ``Authorization`` header once the host changes.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lamina.errors import ImageError, LaminaError
from lamina.registry import credentials as creds_mod
from lamina.registry.auth import Authenticator, AuthError
from lamina.registry.credentials import Credentials
from lamina.registry.reference import Reference, error_line

log = logging.getLogger(__name__)

USER_AGENT = "lamina/0.1"
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
#: the longest Retry-After waited for; a longer one fails the request (see the module doc)
MAX_RETRY_AFTER = 30.0
_CERTS_D = Path("/etc/docker/certs.d")
#: the errors that mean "the connection failed", worth another try
NET_ERRORS: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException)


class RegistryError(ImageError):
    """A registry answered something we cannot use (or did not answer at all)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ClientOptions:
    """How to reach registries: trust, credentials, patience."""

    #: allow plain HTTP and any certificate for every registry
    insecure: bool = False
    #: extra CA certificates (PEM) to trust besides the system's
    ca_file: str | None = None
    #: credentials given on the command line; None: look in Docker's config.json
    credentials: Credentials | None = None
    #: Docker's config.json to read (None: $DOCKER_CONFIG or ~/.docker)
    config_path: Path | None = None
    timeout: float = 60.0
    #: tries after the first, per request (and per blob resume)
    retries: int = 5
    backoff: float = 0.2
    max_backoff: float = 8.0
    #: called with (registry, what happened) each time something is retried
    on_retry: Callable[[str, str], None] | None = None


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` and ``::1``: registries Docker treats as insecure."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Response:
    """An answer whose body is read through :attr:`raw`; :meth:`close` when done."""

    status: int
    headers: http.client.HTTPMessage
    raw: http.client.HTTPResponse
    url: str
    _release: Callable[[bool], None] = field(repr=False)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default) or default

    def read(self, limit: int) -> bytes:
        """The whole body, refusing more than ``limit`` bytes."""
        data = self.raw.read(limit + 1)
        self.close()
        if len(data) > limit:
            raise RegistryError(f"{self.url}: answer longer than {limit} bytes")
        return data

    def close(self) -> None:
        """Give the connection back (if the body was read to its end) or drop it."""
        done = self.raw.isclosed()
        if not done:
            self.raw.close()
        self._release(done)


class RegistryClient:
    """Requests to one registry (``host[:port]``), shared by the threads of a pull or push."""

    def __init__(self, registry: str, api_host: str | None = None,
                 options: ClientOptions | None = None) -> None:
        self.registry = registry
        self.netloc = api_host or registry
        self.options = options or ClientOptions()
        parsed = urllib.parse.urlsplit(f"//{self.netloc}")
        self.host = parsed.hostname or self.netloc
        self.plain_ok = self.options.insecure or is_loopback(self.host)
        creds = self.options.credentials
        missing = ""
        if creds is None:
            found = creds_mod.find(registry, self.options.config_path)
            creds, missing = found.credentials, found.missing
        self.auth = Authenticator(registry, creds, missing=missing)
        self._scheme: str | None = None
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._ssl = self._ssl_context()

    # -- connections ---------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        extra = [self.options.ca_file] if self.options.ca_file else []
        certs_d = _CERTS_D / self.netloc
        with contextlib.suppress(OSError):
            extra += [str(p) for p in sorted(certs_d.glob("*.crt"))]
        for path in extra:
            try:
                ctx.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as e:
                raise RegistryError(f"cannot use CA file {path}: {e}") from e
        if self.options.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get((scheme, netloc))
            if idle:
                return idle.pop()
        timeout = self.options.timeout
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(netloc, timeout=timeout)

    def _releaser(self, scheme: str, netloc: str,
                  conn: http.client.HTTPConnection) -> Callable[[bool], None]:
        def release(reusable: bool) -> None:
            if reusable and conn.sock is not None:
                with self._lock:
                    self._idle.setdefault((scheme, netloc), []).append(conn)
            else:
                conn.close()
        return release

    def close(self) -> None:
        with self._lock:
            conns = [c for lst in self._idle.values() for c in lst]
            self._idle.clear()
        for c in conns:
            c.close()

    @property
    def scheme(self) -> str:
        """``https``, or ``http`` for a plain registry we may speak plainly to (probed once)."""
        if self._scheme is None:
            self._scheme = self._probe()
        return self._scheme

    def _probe(self) -> str:
        """Ask ``/v2/`` over TLS; fall back to plain HTTP where allowed and TLS is not spoken.

        The answer's challenge (a 401) teaches the authenticator what the registry wants.
        """
        last: BaseException | None = None
        for attempt in range(self.options.retries + 1):
            conn = self._connect("https", self.netloc)
            try:
                conn.request("GET", "/v2/", headers={"User-Agent": USER_AGENT})
                resp = conn.getresponse()
                self._learn(resp)
                resp.read()
                self._releaser("https", self.netloc, conn)(True)
                return "https"
            except ssl.SSLCertVerificationError as e:
                conn.close()
                raise RegistryError(f"{self.registry}: TLS certificate not trusted ({e.verify_message}); "
                                    "give its CA with --ca-file, or --insecure") from e
            except ssl.SSLError as e:
                conn.close()
                if not self.plain_ok:
                    raise RegistryError(f"{self.registry}: TLS failed ({e.reason or e}); a registry "
                                        "that speaks plain HTTP needs --insecure") from e
                return self._probe_plain()
            except NET_ERRORS as e:
                conn.close()
                last = e
                if isinstance(e, ConnectionRefusedError | socket.gaierror):
                    break
                self._pause(attempt, None, f"GET /v2/: {e}")
        raise RegistryError(f"{self.registry}: cannot connect ({_why(last)})")

    def _probe_plain(self) -> str:
        conn = self._connect("http", self.netloc)
        try:
            conn.request("GET", "/v2/", headers={"User-Agent": USER_AGENT})
            resp = conn.getresponse()
            self._learn(resp)
            resp.read()
            self._releaser("http", self.netloc, conn)(True)
        except NET_ERRORS as e:
            conn.close()
            raise RegistryError(f"{self.registry}: cannot connect ({_why(e)})") from e
        log.debug("%s speaks plain HTTP", self.registry)
        return "http"

    def _learn(self, resp: http.client.HTTPResponse) -> None:
        if resp.status == 401:
            self.auth.challenged(resp.getheader("WWW-Authenticate") or "", (), None)

    # -- requests ------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.netloc}{path}"

    def request(self, method: str, path: str, *, scopes: tuple[str, ...],
                headers: Mapping[str, str] | None = None, body: bytes | None = None,
                what: str = "", retries: int | None = None) -> Response:
        """Send a request (``path`` from ``/v2/…`` or a full URL the registry gave us).

        Returns any final answer (the caller judges the status); raises
        :class:`RegistryError` when the registry cannot be reached after the retries
        (``retries``: how many, default the options'; 0 for a request that must not be
        repeated blindly, such as an upload chunk the registry may half have).
        """
        tries = self.options.retries if retries is None else retries
        url = path if "://" in path else self.url(path)
        base_headers = {"User-Agent": USER_AGENT, **(headers or {})}
        attempt = 0
        auth_retries = 0
        redirects = 0
        while True:
            parts = urllib.parse.urlsplit(url)
            ours = parts.netloc == self.netloc
            hdrs = dict(base_headers)
            sent = self.auth.header(scopes, self._token_fetch) if ours else None
            if sent:
                hdrs["Authorization"] = sent
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn = self._connect(parts.scheme, parts.netloc)
            try:
                conn.request(method, target or "/", body=body, headers=hdrs)
                resp = conn.getresponse()
            except NET_ERRORS as e:
                conn.close()
                if attempt >= tries:
                    raise RegistryError(f"{what or self.registry}: {method} failed after "
                                        f"{attempt + 1} tries ({_why(e)})") from e
                self._pause(attempt, None, f"{method} {parts.path}: {_why(e)}")
                attempt += 1
                continue
            release = self._releaser(parts.scheme, parts.netloc, conn)
            answer = Response(resp.status, resp.headers, resp, url, release)
            if resp.status == 401 and ours and auth_retries < 2:
                challenge = resp.getheader("WWW-Authenticate") or ""
                _discard(answer)
                if self.auth.challenged(challenge, scopes, sent):
                    auth_retries += 1
                    continue
                return answer  # consumed: the caller judges the status only
            if resp.status in _TRANSIENT_STATUS and attempt < tries:
                retry_after = _retry_after(resp.getheader("Retry-After"))
                _discard(answer)
                _refuse_long_wait(what or f"{self.registry}: {method} {parts.path}", resp.status,
                                  retry_after)
                self._pause(attempt, retry_after, f"{method} {parts.path}: HTTP {resp.status}")
                attempt += 1
                continue
            if resp.status in _REDIRECTS and method in ("GET", "HEAD") and redirects < _MAX_REDIRECTS:
                location = resp.getheader("Location")
                _discard(answer)
                if not location:
                    raise RegistryError(f"{what or url}: redirect without a Location")
                url = urllib.parse.urljoin(url, location)
                redirects += 1
                continue
            return answer

    def _pause(self, attempt: int, retry_after: float | None, why: str) -> None:
        delay = retry_after if retry_after is not None else min(
            self.options.backoff * (2 ** attempt), self.options.max_backoff)
        delay *= 1 if retry_after is not None else random.uniform(0.75, 1.25)
        log.info("%s: %s; trying again in %.2f s", self.registry, why, delay)
        if self.options.on_retry is not None:
            self.options.on_retry(self.registry, why)
        time.sleep(delay)

    def _token_fetch(self, method: str, url: str, headers: dict[str, str],
                     body: bytes | None) -> tuple[int, bytes]:
        """One request to a token server (any host), with the same retry rules."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "http" and not (self.options.insecure or is_loopback(parts.hostname or "")):
            raise AuthError(f"{self.registry}: refusing to send credentials to a plain-HTTP "
                            f"token server {parts.netloc} (use --insecure)")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        hdrs = {"User-Agent": USER_AGENT, **headers}
        for attempt in range(self.options.retries + 1):
            conn = self._connect(parts.scheme, parts.netloc)
            try:
                conn.request(method, target or "/", body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read(1 << 20)
            except NET_ERRORS as e:
                conn.close()
                if attempt >= self.options.retries:
                    raise AuthError(f"{self.registry}: token server {parts.netloc}: {_why(e)}") from e
                self._pause(attempt, None, f"token: {_why(e)}")
                continue
            self._releaser(parts.scheme, parts.netloc, conn)(resp.isclosed())
            if resp.status in _TRANSIENT_STATUS and attempt < self.options.retries:
                retry_after = _retry_after(resp.getheader("Retry-After"))
                _refuse_long_wait(f"{self.registry}: token server {parts.netloc}", resp.status,
                                  retry_after)
                self._pause(attempt, retry_after, f"token: HTTP {resp.status}")
                continue
            return resp.status, data
        raise AssertionError("unreachable")


def _discard(resp: Response) -> None:
    """Read a small unwanted body so the connection can be reused."""
    try:
        resp.raw.read(64 << 10)
    except NET_ERRORS:
        pass
    resp.close()


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` asks for (delta-seconds or an HTTP date), None if none."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
        return max(when - time.time(), 0.0)


def _refuse_long_wait(what: str, status: int, retry_after: float | None) -> None:
    if retry_after is not None and retry_after > MAX_RETRY_AFTER:
        raise RegistryError(f"{what}: HTTP {status}, and the registry asks to be tried again in "
                            f"{retry_after:.0f} s, longer than lamina waits ({MAX_RETRY_AFTER:.0f} s); "
                            "try again later", status)


def _why(e: BaseException | None) -> str:
    if e is None:
        return "no answer"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def error_detail(body: bytes) -> str:
    """The first ``errors[].message`` of a registry's JSON error body, if any."""
    import json

    try:
        doc = json.loads(body)
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list) and errs and isinstance(errs[0], dict):
            code, msg = errs[0].get("code"), errs[0].get("message")
            return f"{code}: {msg}" if code and msg else str(msg or code or "")
    except (ValueError, AttributeError):
        pass
    return ""


@contextlib.contextmanager
def session(reference: Reference, options: ClientOptions | None) -> Iterator[RegistryClient]:
    """A client of ``reference``'s registry for one pull or push, closed after it; every
    error that leaves it names the reference, once (:func:`error_line`)."""
    client = RegistryClient(reference.registry, reference.api_host, options)
    try:
        yield client
    except LaminaError as e:
        line = error_line(reference, str(e))
        if line != str(e):
            raise ImageError(line) from e
        raise
    finally:
        client.close()
