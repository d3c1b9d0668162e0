"""Putting blobs into a registry: existence checks, cross-repository mounts, uploads.

The OCI distribution spec's ways, cheapest first:

* ``HEAD /v2/R/blobs/D``: the repository already has the blob; nothing to send.
* ``POST /v2/R/blobs/uploads/?mount=D&from=S``: the registry has it in repository S
  (which we may read), and links it into R (``201``). A registry that cannot mount
  answers ``202`` with an upload session instead, which we cancel.
* monolithic: ``POST`` to open a session, ``PUT LOCATION?digest=D`` with the bytes. For
  blobs held in memory (configs, manifests' neighbours).
* chunked: ``POST``, then ``PATCH`` chunks in order (``Content-Range: start-end``), each
  at least the ``OCI-Chunk-Min-Length`` the registry asked for (but the last), then
  ``PUT LOCATION?digest=D``. For layers, whose compressed bytes and digest exist only
  as they are made: a chunk is built in memory, so the stream is never spooled whole.

A chunk the connection lost on the way is not sent again blindly (the registry may
hold part of it): we ask the session how far it got (``GET LOCATION`` → ``Range:
0-N``) and send the rest of the chunk from there.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lamina.registry.transport import RegistryClient, RegistryError, Response, error_detail

log = logging.getLogger(__name__)

#: chunk size when the registry sets no minimum
DEFAULT_CHUNK = 16 << 20
_RANGE = re.compile(r"(?:bytes=)?0-(\d+)")


def scope_push(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def _fail(resp: Response, what: str) -> RegistryError:
    try:
        body = resp.raw.read(64 << 10)
    except OSError:
        body = b""
    resp.close()
    detail = error_detail(body)
    return RegistryError(f"{what}: HTTP {resp.status}{': ' + detail if detail else ''}", resp.status)


def blob_exists(client: RegistryClient, repository: str, digest: str,
                scopes: tuple[str, ...]) -> int | None:
    """The size of blob ``digest`` in ``repository`` if the registry has it there."""
    resp = client.request("HEAD", f"/v2/{repository}/blobs/{digest}", scopes=scopes,
                          what=f"{repository}: blob {digest}")
    resp.close()
    if resp.status == 200:
        try:
            return int(resp.header("Content-Length", "-1"))
        except ValueError:
            return -1
    if resp.status == 404:
        return None
    if resp.status in (401, 403):
        raise RegistryError(f"{repository}: not allowed to push (HTTP {resp.status}); "
                            "wrong credentials, or no push access to the repository", resp.status)
    raise RegistryError(f"{repository}: HEAD blob {digest}: HTTP {resp.status}", resp.status)


def _location(client: RegistryClient, resp: Response, what: str) -> str:
    loc = resp.header("Location")
    if not loc:
        raise RegistryError(f"{what}: the registry opened an upload without a Location")
    return urllib.parse.urljoin(client.url("/"), loc)


def _with_query(url: str, **params: str) -> str:
    sep = "&" if urllib.parse.urlsplit(url).query else "?"
    return url + sep + urllib.parse.urlencode(params)


def mount(client: RegistryClient, repository: str, digest: str, source: str,
          scopes: tuple[str, ...]) -> bool:
    """Link blob ``digest`` from ``source`` into ``repository``; False if the registry won't."""
    what = f"{repository}: mount {digest} from {source}"
    resp = client.request("POST", f"/v2/{repository}/blobs/uploads/?"
                          + urllib.parse.urlencode({"mount": digest, "from": source}),
                          scopes=scopes, what=what)
    if resp.status == 201:
        resp.close()
        return True
    if resp.status == 202:  # no mount: a plain upload session we do not want
        loc = _location(client, resp, what)
        resp.close()
        client.request("DELETE", loc, scopes=scopes, what=what).close()
        return False
    if resp.status in (401, 403, 404):
        resp.close()
        return False
    raise _fail(resp, what)


@dataclass
class UploadStats:
    chunks: int = 0
    bytes: int = 0
    #: the smallest chunk size the registry asked for (0: none)
    min_chunk: int = 0


def _start(client: RegistryClient, repository: str, scopes: tuple[str, ...],
           what: str) -> tuple[str, int]:
    resp = client.request("POST", f"/v2/{repository}/blobs/uploads/", scopes=scopes, what=what)
    if resp.status != 202:
        raise _fail(resp, what)
    loc = _location(client, resp, what)
    try:
        min_len = int(resp.header("OCI-Chunk-Min-Length", "0") or 0)
    except ValueError:
        min_len = 0
    resp.close()
    return loc, min_len


def _finish(client: RegistryClient, loc: str, digest: str, scopes: tuple[str, ...], what: str,
            body: bytes = b"") -> None:
    resp = client.request("PUT", _with_query(loc, digest=digest), scopes=scopes,
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Length": str(len(body))}, body=body, what=what)
    if resp.status not in (201, 204):
        raise _fail(resp, what)
    got = resp.header("Docker-Content-Digest")
    resp.close()
    if got and got != digest:
        raise RegistryError(f"{what}: the registry stored digest {got}, we sent {digest}")


def upload_bytes(client: RegistryClient, repository: str, data: bytes, digest: str,
                 scopes: tuple[str, ...], what: str) -> None:
    """A blob held in memory, in one PUT."""
    loc, _min = _start(client, repository, scopes, what)
    _finish(client, loc, digest, scopes, what, data)


def upload_stream(client: RegistryClient, repository: str, chunks: Iterable[bytes],
                  scopes: tuple[str, ...], what: str, *, chunk_size: int = DEFAULT_CHUNK,
                  on_sent: Callable[[int], None] | None = None,
                  stats: UploadStats | None = None) -> tuple[str, int]:
    """A blob made as it goes, in chunks; returns (digest, size)."""
    loc, min_len = _start(client, repository, scopes, what)
    size = max(chunk_size, min_len)
    if stats is not None:
        stats.min_chunk = min_len
    h = hashlib.sha256()
    offset = 0
    buf = bytearray()

    def send(chunk: bytes) -> None:
        nonlocal loc, offset
        loc = _patch(client, loc, chunk, offset, scopes, what)
        offset += len(chunk)
        if stats is not None:
            stats.chunks += 1
            stats.bytes += len(chunk)
        if on_sent is not None:
            on_sent(len(chunk))

    for piece in chunks:
        h.update(piece)
        buf += piece
        while len(buf) >= size:
            send(bytes(buf[:size]))
            del buf[:size]
    if buf or offset == 0:
        send(bytes(buf))
    digest = "sha256:" + h.hexdigest()
    _finish(client, loc, digest, scopes, what)
    return digest, offset


def _patch(client: RegistryClient, loc: str, chunk: bytes, offset: int,
           scopes: tuple[str, ...], what: str) -> str:
    """Send ``chunk`` at ``offset``; return the next Location. Resumes a lost chunk."""
    sent_from = 0
    for attempt in range(client.options.retries + 1):
        part = chunk[sent_from:]
        start = offset + sent_from
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(part))}
        if part:
            headers["Content-Range"] = f"{start}-{start + len(part) - 1}"
        try:
            resp = client.request("PATCH", loc, scopes=scopes, headers=headers, body=part,
                                  what=what, retries=0)
        except RegistryError as e:
            if attempt >= client.options.retries:
                raise
            client._pause(attempt, None, f"upload chunk at {start}: {e}")
            got = _status(client, loc, scopes, what)
            if got is None or got < offset or got > offset + len(chunk):
                raise RegistryError(f"{what}: the upload session lost its place ({got})") from e
            sent_from = got - offset
            continue
        if resp.status == 202:
            nxt = _location(client, resp, what)
            resp.close()
            return nxt
        if resp.status == 416 and attempt < client.options.retries:
            resp.close()
            got = _status(client, loc, scopes, what)
            if got is None or got < offset or got > offset + len(chunk):
                raise RegistryError(f"{what}: the upload session lost its place ({got})")
            sent_from = got - offset
            continue
        raise _fail(resp, what)
    raise RegistryError(f"{what}: chunk at {offset} not accepted")


def _status(client: RegistryClient, loc: str, scopes: tuple[str, ...], what: str) -> int | None:
    """How many bytes the upload session at ``loc`` holds."""
    resp = client.request("GET", loc, scopes=scopes, what=what)
    rng = resp.header("Range")
    resp.close()
    if resp.status not in (202, 204):
        return None
    if not rng:
        return 0
    m = _RANGE.fullmatch(rng.strip())
    return int(m.group(1)) + 1 if m else None


def put_manifest(client: RegistryClient, repository: str, reference: str, data: bytes,
                 media_type: str, scopes: tuple[str, ...], what: str) -> str:
    """PUT a manifest under a tag or digest; return its digest."""
    resp = client.request("PUT", f"/v2/{repository}/manifests/{reference}", scopes=scopes,
                          headers={"Content-Type": media_type, "Content-Length": str(len(data))},
                          body=data, what=what)
    if resp.status not in (200, 201):
        raise _fail(resp, f"{what}: manifest")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    got = resp.header("Docker-Content-Digest")
    resp.close()
    if got and got != digest:
        raise RegistryError(f"{what}: the registry stored manifest digest {got}, we sent {digest}")
    return digest
