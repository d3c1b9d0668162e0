"""Private registries for tests: Debian's ``docker-registry`` on loopback, and its helpers.

* :class:`Registry` runs ``/usr/bin/docker-registry serve`` on a free loopback port with
  its own storage, plain HTTP or TLS (a CA made here, :func:`make_ca`), and optionally
  htpasswd basic auth (bcrypt, the only hash the registry takes) or token auth.
* :class:`TokenServer` is the token side of token auth: it checks a user's password
  and signs RS256 JWTs with a key whose certificate the registry trusts
  (``auth.token.rootcertbundle``), carried in the token's ``x5c`` header. It can issue
  tokens that expire early, to test the refresh.
* :class:`FaultProxy` sits between a client and a registry and breaks things on
  purpose: drops a blob's connection part-way, or once its client has stopped reading
  for a while (an idle timeout), answers 500 or 429, corrupts a blob, slows blobs
  down. It records every request it saw (method, path, Range).
* :class:`TmpWatch` watches a store's ``tmp/`` during a pull for anything that is not
  a layer's staging entry (a blob written to disk).
* :func:`skopeo` runs skopeo against these registries.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from procs import start_logged, wait_until

REGISTRY_BIN = "/usr/bin/docker-registry"
SERVICE = "lamina-test-registry"
ISSUER = "lamina-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- keys and certificates ------------------------------------------------------------------


@dataclass
class Cert:
    cert: Path
    key: Path


def make_ca(work: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Cert, Cert]:
    """A CA and a server certificate it signed for ``hosts`` (PEM files under ``work``)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lamina test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    work.mkdir(parents=True, exist_ok=True)

    def write(name: str, c: x509.Certificate, k: ec.EllipticCurvePrivateKey) -> Cert:
        cp, kp = work / f"{name}.crt", work / f"{name}.key"
        cp.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        return Cert(cp, kp)

    return write("ca", ca, ca_key), write("server", cert, key)


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    import bcrypt

    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}" for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the token server ------------------------------------------------------------------------


class TokenServer:
    """Signs registry tokens for users it knows (and anonymous pulls, if allowed)."""

    def __init__(self, work: Path, users: dict[str, str], *, anonymous_pull: bool = False,
                 refresh_tokens: dict[str, str] | None = None) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = users
        self.anonymous_pull = anonymous_pull
        #: OAuth2 refresh tokens (identity tokens) -> the user they stand for
        self.refresh_tokens = refresh_tokens or {}
        self.issued: list[dict[str, object]] = []
        #: the lifetime of the next tokens, as the registry will see it (exp - now);
        #: the registry allows 60 s of clock skew past exp
        self.lifetime = 300.0
        #: lifetimes for the next tokens, used up one per token before ``lifetime`` applies
        #: (one short-lived token: it expires mid-pull, and its successor does not)
        self.next_lifetimes: list[float] = []
        #: what the answer tells the client (expires_in); None: the lifetime
        self.stated_expiry: float | None = None
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lamina test token signer")])
        self._cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.bundle = work / "token-signer.crt"
        work.mkdir(parents=True, exist_ok=True)
        self.bundle.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server._serve(self)

            def do_POST(self) -> None:  # noqa: N802 - the refresh-token grant
                server._serve(self)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _sign(self, claims: dict[str, object]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(sig)}"

    def _serve(self, req: http.server.BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(req.path).query)
        user = None
        if req.command == "POST":
            length = int(req.headers.get("Content-Length") or 0)
            form = parse_qs(req.rfile.read(length).decode())
            query = {"scope": " ".join(form.get("scope", [])).split(), "grant": form.get("grant_type", [])}
            user = self.refresh_tokens.get((form.get("refresh_token") or [""])[0])
            if form.get("grant_type") != ["refresh_token"] or user is None:
                req.send_response(401)
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
        auth = req.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != pw:
                req.send_response(401)
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
            user = name
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            allowed = wanted if user else [a for a in wanted if a == "pull" and self.anonymous_pull]
            if kind == "repository" and allowed:
                access.append({"type": "repository", "name": repo, "actions": allowed})
        now = time.time()
        life = self.next_lifetimes.pop(0) if self.next_lifetimes else self.lifetime
        exp = now + life - 60  # the registry adds 60 s of leeway
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": int(exp),
                  "nbf": int(now) - 5, "iat": int(now), "jti": secrets.token_hex(8), "access": access}
        self.issued.append({"user": user, "scopes": query.get("scope", []), "exp": exp,
                            "grant": "refresh_token" if req.command == "POST" else "password"})
        body = json.dumps({"token": self._sign(claims),
                           "expires_in": int(self.stated_expiry or self.lifetime)}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


# -- the registry ----------------------------------------------------------------------------


class Registry:
    """``docker-registry serve`` on ``127.0.0.1:<free port>``."""

    def __init__(self, work: Path, *, tls: Cert | None = None, htpasswd_file: Path | None = None,
                 token: TokenServer | None = None, allow_urls: str | None = None) -> None:
        self.work = work
        #: a regex of foreign-layer URLs manifests may name (the registry refuses any by default)
        self.allow_urls = allow_urls
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.htpasswd_file = htpasswd_file
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = work / "registry.log"

    def config(self) -> str:
        lines = ["version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: true",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.work / 'data'}",
                 "  delete:", "    enabled: true", "http:", f"  addr: {self.host}",
                 "  headers:", "    X-Content-Type-Options: [nosniff]"]
        if self.allow_urls:
            lines += ["validation:", "  manifests:", "    urls:", "      allow:",
                      f"        - '{self.allow_urls}'"]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls.cert}", f"    key: {self.tls.key}"]
        if self.htpasswd_file:
            lines += ["auth:", "  htpasswd:", "    realm: lamina-test", f"    path: {self.htpasswd_file}"]
        elif self.token:
            lines += ["auth:", "  token:", f"    realm: {self.token.realm}", f"    service: {SERVICE}",
                      f"    issuer: {ISSUER}", f"    rootcertbundle: {self.token.bundle}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        self.work.mkdir(parents=True, exist_ok=True)
        cfg = self.work / "config.yml"
        cfg.write_text(self.config())
        self.proc = start_logged([REGISTRY_BIN, "serve", str(cfg)], self.log, dict(os.environ),
                                 banner=self.host)
        wait_until(self.proc, self._answers, timeout=30, what="docker-registry",
                   log_tail=lambda: self.log.read_text()[-3000:], give_up=self.stop)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def skopeo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run skopeo; a failure raises with its stderr."""
    res = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def skopeo_push_layout(layout: Path, tag: str, dest: str, *extra: str) -> None:
    skopeo("copy", "--dest-tls-verify=false", *extra, f"oci:{layout}:{tag}", f"docker://{dest}")


def raw_push(host: str, repo: str, tag: str, blobs: list[bytes], manifest: bytes, media_type: str) -> None:
    """Put blobs and a manifest into a plain registry with bare HTTP (no client under test)."""
    for data in blobs:
        conn = http.client.HTTPConnection(host, timeout=30)
        conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        resp = conn.getresponse()
        resp.read()
        loc = resp.getheader("Location") or ""
        path = loc.split(host, 1)[-1]
        sep = "&" if "?" in path else "?"
        conn.request("PUT", f"{path}{sep}digest={sha256(data)}", body=data,
                     headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201, resp.status
        conn.close()
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest, headers={"Content-Type": media_type})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 201, (resp.status, body)


@contextlib.contextmanager
def static_server(files: dict[str, bytes]) -> Iterator[str]:
    """An HTTP server on loopback serving ``files`` by path; yields its base URL."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            data = files.get(self.path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def manifest_digest(host: str, repo: str, ref: str) -> str:
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("HEAD", f"/v2/{repo}/manifests/{ref}", headers={
        "Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json, "
                  "application/vnd.docker.distribution.manifest.list.v2+json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.getheader("Docker-Content-Digest") or ""


# -- the fault proxy -------------------------------------------------------------------------


@dataclass
class Faults:
    #: blob digest -> bytes to send before cutting the connection (once per digest)
    cut_blob_at: dict[str, int] = field(default_factory=dict)
    #: (method, path regex) -> statuses to answer, one per matching request, before forwarding
    statuses: list[tuple[str, str, list[int]]] = field(default_factory=list)
    #: blob digest -> corrupt one byte of it in every answer
    corrupt_blob: set[str] = field(default_factory=set)
    #: seconds to sleep after each MiB of a blob sent
    blob_delay: float = 0.0
    #: blob digest -> seconds to sleep after each MiB of that blob sent (on top of blob_delay)
    slow_blob: dict[str, float] = field(default_factory=dict)
    #: blob digest -> seconds its client may leave the connection unread before the proxy
    #: drops it, as a registry or load balancer with an idle timeout does (once per digest)
    idle_cut: dict[str, float] = field(default_factory=dict)
    #: Retry-After sent with 429s: seconds, or "date+N" for an HTTP date N seconds ahead
    retry_after: str = "1"
    #: status -> registry error code ("NAME_UNKNOWN") for the JSON body of planned answers
    error_code: dict[int, str] = field(default_factory=dict)
    #: OCI-Chunk-Min-Length to announce on upload sessions (0: none)
    chunk_min_length: int = 0


class FaultProxy:
    """An HTTP reverse proxy in front of a registry that breaks what :class:`Faults` says."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        self.upstream = upstream
        self.faults = faults or Faults()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range)
        #: (method, path, status) of every answer forwarded or made up
        self.answers: list[tuple[str, str, int]] = []
        #: (upload session, body size) of every PATCH
        self.patch_sizes: list[tuple[str, int]] = []
        #: (digest, bytes sent) of every connection dropped because its client stopped reading
        self.idle_cuts: list[tuple[str, int]] = []
        #: (method, path, time.time()) of every request, as it arrived
        self.arrivals: list[tuple[str, str, float]] = []
        #: (method, path, time.time() of a 429, the time before which its Retry-After
        #: asked for no retry)
        self.retry_promises: list[tuple[str, str, float, float]] = []
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                proxy._handle(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET  # noqa: N815

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _planned_status(self, method: str, path: str) -> int | None:
        with self._lock:
            for m, rx, statuses in self.faults.statuses:
                if m == method and statuses and re.search(rx, path):
                    return statuses.pop(0)
        return None

    def _retry_after(self, method: str, path: str) -> str:
        """The Retry-After value to send now, remembering when it lets the client back."""
        import email.utils

        value = self.faults.retry_after
        now = time.time()
        if value.startswith("date+"):
            # an HTTP date has whole seconds: the client may come back at that second
            not_before = float(int(now + float(value[5:])))
            value = email.utils.formatdate(not_before, usegmt=True)
        else:
            not_before = now + float(value)
        with self._lock:
            self.retry_promises.append((method, path, now, not_before))
        return value

    def retry_waits(self) -> list[tuple[str, float, float]]:
        """(path, seconds the Retry-After asked for, seconds the client waited) of every
        429 the client came back after, the wait measured from the 429 to the next
        request for the same path."""
        out = []
        for method, path, sent_at, not_before in self.retry_promises:
            later = [t for m, p, t in self.arrivals if m == method and p == path and t > sent_at]
            if later:
                out.append((path, not_before - sent_at, min(later) - sent_at))
        return out

    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        method, path = req.command, req.path
        with self._lock:
            self.requests.append((method, path, req.headers.get("Range", "")))
            self.arrivals.append((method, path, time.time()))
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else None
        if method == "PATCH":
            with self._lock:
                self.patch_sizes.append((path.split("?")[0].rsplit("/", 1)[-1], length))
        status = self._planned_status(method, path)
        if status is not None:
            req.send_response(status)
            if status == 429:
                req.send_header("Retry-After", self._retry_after(method, path))
            code = self.faults.error_code.get(status)
            payload = json.dumps({"errors": [{"code": code, "message": f"{code} (fault proxy)"}]}).encode() \
                if code else b""
            if payload:
                req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(payload)))
            req.end_headers()
            req.wfile.write(payload)
            return
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "connection")}
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        with self._lock:
            self.answers.append((method, path, resp.status))
        m = re.search(r"/blobs/(sha256:[0-9a-f]{64})$", path)
        digest = m.group(1) if m and method == "GET" else None
        req.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("connection", "transfer-encoding"):
                continue
            if k.lower() == "location":
                v = v.replace(self.upstream, self.host)
            req.send_header(k, v)
        if method == "POST" and "/blobs/uploads/" in path and self.faults.chunk_min_length:
            req.send_header("OCI-Chunk-Min-Length", str(self.faults.chunk_min_length))
        if resp.getheader("Content-Length") is None and method != "HEAD":
            req.send_header("Connection", "close")
            req.close_connection = True
        req.end_headers()
        if method == "HEAD":
            resp.read()
            conn.close()
            return
        cut = None
        idle = None
        if digest is not None:
            with self._lock:
                cut = self.faults.cut_blob_at.pop(digest, None)
                idle = self.faults.idle_cut.pop(digest, None)
        if idle is not None:
            # a small send buffer, so that a client that stops reading blocks our writes
            # soon (its own receive buffer still holds what the kernel took)
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        delay = self.faults.blob_delay + (self.faults.slow_blob.get(digest, 0.0) if digest else 0.0)
        sent = 0
        offset = _range_start(req.headers.get("Range", ""))
        try:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                if digest is not None and digest in self.faults.corrupt_blob and sent == 0 and offset == 0:
                    mid = len(chunk) // 2
                    chunk = chunk[:mid] + bytes([chunk[mid] ^ 0xFF]) + chunk[mid + 1:]
                if cut is not None and sent + len(chunk) >= cut:
                    req.wfile.write(chunk[: cut - sent])
                    req.wfile.flush()
                    self._drop(req)
                    return
                if idle is not None:
                    if not self._send_or_idle(req, chunk, idle):
                        with self._lock:
                            self.idle_cuts.append((digest or "", sent))
                        self._drop(req)
                        return
                else:
                    req.wfile.write(chunk)
                sent += len(chunk)
                if digest is not None and delay:
                    time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):
            req.close_connection = True
        finally:
            conn.close()

    @staticmethod
    def _send_or_idle(req: http.server.BaseHTTPRequestHandler, chunk: bytes, idle: float) -> bool:
        """Send ``chunk`` in pieces; False if one piece did not go in ``idle`` seconds (the
        client stopped reading: the kernel's buffers on both sides are full)."""
        sock = req.connection
        sock.settimeout(idle)
        try:
            for at in range(0, len(chunk), 64 << 10):
                sock.sendall(chunk[at:at + (64 << 10)])
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)
        return True

    @staticmethod
    def _drop(req: http.server.BaseHTTPRequestHandler) -> None:
        with contextlib.suppress(OSError):
            req.connection.shutdown(socket.SHUT_RDWR)
        req.close_connection = True

    def blob_gets(self, digest: str) -> list[str]:
        """The Range headers of every GET of ``digest`` ("" when none)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith(digest)]


def _range_start(value: str) -> int:
    m = re.match(r"bytes=(\d+)-", value)
    return int(m.group(1)) if m else 0


class TmpWatch:
    """Samples a store's ``tmp/`` while a pull runs: what there is not a layer's staging.

    Looks every few milliseconds at the directory's entries and at this process's open
    files (``/proc/self/fd``), so an anonymous temporary file (``O_TMPFILE``, or one
    unlinked at once) under ``tmp/`` is seen too, not only named ones. Layers being made
    and their tar-split records pass through ``tmp/`` by design, under names
    :func:`lamina.fs.staging.in_progress` knows; anything else is a blob on disk.
    """

    def __init__(self, store_root: Path, interval: float = 0.002) -> None:
        self.tmp = os.path.realpath(store_root / "tmp")
        self.interval = interval
        self.seen: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from lamina.fs import staging

        while not self._stop.is_set():
            names: list[str] = []
            with contextlib.suppress(OSError):
                names += os.listdir(self.tmp)
            with contextlib.suppress(OSError):
                for fd in os.listdir("/proc/self/fd"):
                    with contextlib.suppress(OSError):
                        target = os.readlink(f"/proc/self/fd/{fd}")
                        if target.startswith(self.tmp + "/"):
                            names.append(target[len(self.tmp) + 1:])
            self.seen.update(n for n in names if not staging.in_progress(n.removesuffix(" (deleted)")))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> TmpWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def docker_config(path: Path, doc: dict[str, object]) -> Iterator[Path]:
    """A Docker config.json at ``path``/config.json, given to clients via DOCKER_CONFIG."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(doc))
    old = os.environ.get("DOCKER_CONFIG")
    os.environ["DOCKER_CONFIG"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("DOCKER_CONFIG", None)
        else:
            os.environ["DOCKER_CONFIG"] = old


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def have_registry() -> str | None:
    """None if docker-registry and skopeo are here, else what is missing."""
    missing = [p for p in (REGISTRY_BIN,) if not os.access(p, os.X_OK)]
    if not shutil.which("skopeo"):
        missing.append("skopeo")
    return ", ".join(missing) or None


def multi_platform_layout(dest: Path, images: dict[str, bytes | tuple[list[bytes], bytes]],
                          tag: str) -> Path:
    """An OCI layout whose tag names an index of one gzip image per platform.

    ``images``: platform ("linux/arm64/v8") -> (layer tars, config).
    """
    import gzip

    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> dict[str, object]:
        d = sha256(data)
        blobs[d] = data
        return {"digest": d, "size": len(data)}

    entries = []
    for plat, (layers, config) in images.items():  # type: ignore[misc]
        descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                  **put(gzip.compress(t, mtime=0))} for t in layers]
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
                               "layers": descs}).encode()
        parts = plat.split("/")
        platform = {"os": parts[0], "architecture": parts[1]}
        if len(parts) > 2:
            platform["variant"] = parts[2]
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest),
                        "platform": platform})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    top = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                                               **put(index),
                                               "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (dest / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps(top))
    for d, data in blobs.items():
        (dest / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
    return dest
