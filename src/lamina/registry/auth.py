"""Registry authentication: the ``WWW-Authenticate`` challenge, basic and bearer tokens.

How a registry asks (distribution's token spec, also what OCI registries do): a request
without credentials gets ``401`` and ``WWW-Authenticate: Bearer realm="…",service="…",
scope="repository:REPO:pull"`` (or ``Basic realm="…"``). For Basic, every request then
carries ``Authorization: Basic base64(user:password)``. For Bearer, the client asks the
realm for a token (``GET realm?service=…&scope=…``, with the user's Basic credentials if
it has any, anonymously if not; or, holding an identity token, ``POST`` OAuth2's
refresh-token grant) and sends ``Authorization: Bearer TOKEN``.

Tokens are scoped (``repository:a/b:pull,push``), so we keep one per set of scopes, and
they expire: a token is dropped a little before its ``expires_in`` runs out, and a 401
on a request that carried a token means it has expired (or been revoked) early, so the
token is fetched again once and the request repeated. A second 401 is an answer:
the credentials are wrong or do not reach that repository.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from lamina.errors import ImageError
from lamina.registry.credentials import Credentials

#: refresh this long before a token's stated expiry (clocks and round trips differ)
_EXPIRY_MARGIN = 10.0
#: what the token spec says to assume when a token server gives no expires_in
_DEFAULT_EXPIRY = 60.0
_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


class AuthError(ImageError):
    """The registry refused our credentials (or asked for ones we do not have)."""


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lower case
    params: dict[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` value (``Bearer realm="…",…``)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass
class _Token:
    value: str
    expires: float


#: a function that fetches a URL for the token exchange:
#: (method, url, headers, body) -> (status, body bytes)
Fetch = Callable[[str, str, dict[str, str], bytes | None], tuple[int, bytes]]


class Authenticator:
    """What one registry wants from us, and the tokens it gave us, shared by threads."""

    def __init__(self, registry: str, credentials: Credentials | None,
                 clock: Callable[[], float] = time.monotonic, *, missing: str = "") -> None:
        """``missing``: where credentials were looked for and not found, told in the
        error when the registry then wants some."""
        self.registry = registry
        self.credentials = credentials
        self.missing = missing
        self._clock = clock
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        #: how many tokens were fetched (tests and --debug read it)
        self.tokens_fetched = 0

    def header(self, scopes: tuple[str, ...], fetch: Fetch) -> str | None:
        """The ``Authorization`` value for a request needing ``scopes``, or None."""
        with self._lock:
            ch = self._challenge
            if ch is None:
                return None
            if ch.scheme == "basic":
                return self._basic()
            if ch.scheme != "bearer":
                raise AuthError(f"{self.registry}: unsupported authentication scheme {ch.scheme!r}")
            tok = self._tokens.get(scopes)
            if tok is not None and tok.expires > self._clock():
                return f"Bearer {tok.value}"
            tok = self._fetch_token(ch, scopes, fetch)
            self._tokens[scopes] = tok
            return f"Bearer {tok.value}"

    def challenged(self, header: str, scopes: tuple[str, ...], sent: str | None) -> bool:
        """Take a 401's challenge; True if a retry may succeed (new scheme or stale token)."""
        ch = parse_challenge(header)
        if ch is None:
            return False
        with self._lock:
            first = self._challenge is None or self._challenge.scheme != ch.scheme
            self._challenge = ch
            if sent is None:
                return True  # we sent nothing: now we know what to send
            if ch.scheme == "bearer" and sent.startswith("Bearer "):
                tok = self._tokens.get(scopes)
                if tok is not None and f"Bearer {tok.value}" == sent:
                    del self._tokens[scopes]  # expired or revoked early: fetch a new one
                return True
            return first

    def _basic(self) -> str:
        creds = self.credentials
        if creds is None or not (creds.username or creds.password):
            raise AuthError(f"{self.registry}: the registry wants a user name and password "
                            f"(docker login, or --username with --password-stdin){self._why_none()}")
        raw = f"{creds.username}:{creds.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _why_none(self) -> str:
        return f"; {self.missing}" if self.missing and not self.credentials else ""

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...], fetch: Fetch) -> _Token:
        realm = ch.params.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise AuthError(f"{self.registry}: bearer challenge without a usable realm ({realm!r})")
        service = ch.params.get("service", "")
        creds = self.credentials
        headers = {"Accept": "application/json"}
        if creds is not None and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": "lamina", "service": service, "scope": " ".join(scopes)}
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            status, body = fetch("POST", realm, headers, urllib.parse.urlencode(form).encode())
        else:
            query = [("service", service)] if service else []
            query += [("scope", s) for s in scopes]
            if creds is not None and (creds.username or creds.password):
                query.append(("account", creds.username))
                headers["Authorization"] = self._basic()
            sep = "&" if "?" in realm else "?"
            url = realm + (sep + urllib.parse.urlencode(query) if query else "")
            status, body = fetch("GET", url, headers, None)
        if status in (401, 403):
            anonymous = not creds or creds.empty
            raise AuthError(f"{self.registry}: the token server refused "
                            f"{'anonymous access' if anonymous else 'the credentials'} "
                            f"for {' '.join(scopes) or 'the registry'} (HTTP {status})"
                            f"{self._why_none() if anonymous else ''}")
        if status != 200:
            raise AuthError(f"{self.registry}: the token server answered HTTP {status}")
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or _DEFAULT_EXPIRY)
        except (ValueError, AttributeError, TypeError) as e:
            raise AuthError(f"{self.registry}: the token server's answer is not JSON ({e})") from e
        if not isinstance(value, str) or not value:
            raise AuthError(f"{self.registry}: the token server gave no token")
        self.tokens_fetched += 1
        life = max(expires_in - _EXPIRY_MARGIN, expires_in / 2)
        return _Token(value, self._clock() + life)
