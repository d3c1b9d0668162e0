"""Reading blobs from a registry: whole small ones verified, big ones as resumable streams.

A layer blob is read as a stream (:class:`BlobReader`) that never hands out more bytes
than its descriptor's size, and that, when the connection breaks in the middle (reset,
cut, a short body), asks again with ``Range: bytes=N-`` from the first byte it has not
yet handed out, so the bytes already applied are not fetched twice. A registry that
ignores Range (answers 200 with the whole blob) is read from the start and the bytes
already handed out are skipped. The stream does not hash: the image loader hashes what
it reads and compares it with the digest once the layer is applied (a mismatch then
removes the layer), so a blob is hashed once.

Small blobs (configs) are read whole and verified here before anything uses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re

from lamina.registry.transport import (
    NET_ERRORS,
    RegistryClient,
    RegistryError,
    Response,
    error_detail,
)

log = logging.getLogger(__name__)

#: the largest config (or other JSON blob) read into memory
MAX_SMALL_BLOB = 64 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def scope_pull(repository: str) -> tuple[str, ...]:
    return (f"repository:{repository}:pull",)


def blob_error(resp: Response, repository: str, digest: str) -> RegistryError:
    body = b""
    try:
        body = resp.raw.read(64 << 10)
    except NET_ERRORS:
        pass
    resp.close()
    detail = error_detail(body)
    if resp.status == 404:
        return RegistryError(f"{repository}: blob {digest} not found in the registry", 404)
    if resp.status in (401, 403):
        return RegistryError(f"{repository}: not allowed to read blob {digest} "
                             f"(HTTP {resp.status}{': ' + detail if detail else ''})", resp.status)
    return RegistryError(f"{repository}: blob {digest}: HTTP {resp.status}"
                         f"{': ' + detail if detail else ''}", resp.status)


def fetch_small_blob(client: RegistryClient, repository: str, digest: str,
                     size: int | None, what: str) -> bytes:
    """A whole blob (a config), checked against its digest and size."""
    if size is not None and size > MAX_SMALL_BLOB:
        raise RegistryError(f"{what} {digest} is {size} bytes; refusing more than {MAX_SMALL_BLOB}")
    with BlobReader(client, repository, digest, size if size is not None else MAX_SMALL_BLOB,
                    exact=size is not None) as r:
        data = r.read()
    algorithm, _, _hex = digest.partition(":")
    got = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    if got != digest:
        raise RegistryError(f"{what} {digest}: the registry sent bytes with digest {got}")
    if size is not None and len(data) != size:
        raise RegistryError(f"{what} {digest}: {len(data)} bytes, the manifest says {size}")
    return data


class BlobReader(io.RawIOBase):
    """A raw stream of one blob, resumed by Range when the connection fails.

    ``size`` bounds what is read: a registry that sends more is cut off (the digest check
    would refuse it anyway), one that sends less is asked for the rest. ``exact``: the
    blob must be exactly ``size`` bytes (known from a descriptor).
    """

    def __init__(self, client: RegistryClient, repository: str, digest: str, size: int,
                 *, start: int = 0, exact: bool = True, urls: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.client = client
        self.repository = repository
        self.digest = digest
        self.size = size
        self.exact = exact
        self.pos = start
        #: where a foreign (non-distributable) layer lives if the registry lacks it
        self.urls = urls
        self._url: str | None = None
        #: how many times the stream was resumed after a failure (tests read it)
        self.resumes = 0
        self._resp: Response | None = None
        self._failures = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Accept": "*/*"}
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
        resp = self.client.request("GET", self._url or f"/v2/{self.repository}/blobs/{self.digest}",
                                   scopes=scope_pull(self.repository), headers=headers,
                                   what=f"{self.repository}: blob {self.digest}")
        if resp.status == 404 and self._url is None and self.urls:
            # a foreign layer (Windows base layers): the registry may not hold it; its
            # descriptor says where it does (no credentials go there; the digest is
            # checked all the same)
            resp.close()
            for url in self.urls:
                if not url.startswith(("https://", "http://")):
                    continue
                self._url = url
                try:
                    return self._open()
                except RegistryError as e:
                    log.info("foreign layer %s not at %s: %s", self.digest, url, e)
            self._url = None
            raise RegistryError(f"{self.repository}: foreign layer {self.digest} found neither in "
                                f"the registry nor at {', '.join(self.urls)}", 404)
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.header("Content-Range"))
            if not m or int(m.group(1)) != self.pos:
                resp.close()
                raise RegistryError(f"{self.repository}: blob {self.digest}: the registry answered "
                                    f"Range {self.pos}- with {resp.header('Content-Range')!r}")
        elif resp.status == 200:
            if self.pos:  # no Range support: skip what we already have
                self._skip(resp, self.pos)
        elif resp.status == 416 and self.pos >= self.size:
            resp.close()
            self._ended = True
            return
        else:
            raise blob_error(resp, self.repository, self.digest)
        self._resp = resp

    @staticmethod
    def _skip(resp: Response, n: int) -> None:
        buf = bytearray(min(n, 1 << 20))
        while n:
            got = resp.raw.readinto(memoryview(buf)[: min(n, len(buf))])
            if not got:
                raise ConnectionResetError("blob ended while skipping to the resume point")
            n -= got

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        left = self.size - self.pos
        if left <= 0 or self._ended:
            self._finish()
            return 0
        view = memoryview(b)
        if len(view) > left:
            view = view[:left]
        while True:
            try:
                if self._resp is None:
                    self._open()
                    if self._ended:
                        return 0
                assert self._resp is not None
                n = self._resp.raw.readinto(view)
                if n == 0:
                    if not self.exact:
                        self._ended = True
                        self._finish()
                        return 0
                    raise ConnectionResetError(f"the answer ended {left} bytes short")
            except NET_ERRORS as e:
                self._drop()
                self._failures += 1
                if self._failures > self.client.options.retries:
                    raise RegistryError(f"{self.repository}: blob {self.digest}: download failed at "
                                        f"byte {self.pos} of {self.size} after {self._failures} tries "
                                        f"({e})") from e
                self.resumes += 1
                self.client._pause(self._failures - 1, None,
                                   f"blob {self.digest[:19]} cut at byte {self.pos} ({e}); resuming")
                continue
            self.pos += n
            if self.pos >= self.size:
                self._finish()
            return n

    def _finish(self) -> None:
        if self._resp is not None:
            resp, self._resp = self._resp, None
            if self.exact and not resp.raw.isclosed():
                # a longer body than the descriptor says: do not read the rest
                resp.raw.close()
            resp.close()

    def _drop(self) -> None:
        if self._resp is not None:
            resp, self._resp = self._resp, None
            with contextlib.suppress(*NET_ERRORS):
                resp.raw.close()
            resp.close()

    def close(self) -> None:
        self._drop()
        super().close()

