"""Content digests and chain IDs.

Why digests are checked while streaming and not before: a layer blob can be gigabytes,
and reading it twice (once to verify, once to apply) would double the cost of a load.
The loader therefore applies the layer through :class:`lamina.streams.HashingReader` and compares the
digests once the stream has been read to its end; a mismatch removes what was applied.

Chain IDs follow Docker's rule (``layer/layer.go``): the chain ID of the first layer is
its DiffID, and each next one is the sha256 of ``"<parent chain ID> <DiffID>"`` (both
written as ``sha256:<hex>``). Two images that share a base share its chain IDs, which is
why lamina names layers by chain ID: a shared layer is stored once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

from lamina.errors import ImageError

#: the algorithms OCI allows in a digest, with the hex length each must have
_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"(sha256|sha512):([0-9a-f]+)")


def check_digest(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is ``sha256:<64 hex>`` (or sha512), else raise ImageError.

    Digests from an archive name files inside it and layers in the store, so they are
    checked before use like any other untrusted name.
    """
    if isinstance(value, str):
        m = _DIGEST_RE.fullmatch(value)
        if m and len(m.group(2)) == _ALGORITHMS[m.group(1)]:
            return value
    raise ImageError(f"invalid {what} {value!r}: expected sha256:<64 hex digits>")


def split_digest(digest: str) -> tuple[str, str]:
    """``"sha256:ab.."`` -> ``("sha256", "ab..")`` (the digest must already be checked)."""
    algorithm, _, hexpart = digest.partition(":")
    return algorithm, hexpart


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Docker's chain IDs (``sha256:<hex>``) for a list of DiffIDs, bottom layer first."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append(sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def layer_id(chain_id: str) -> str:
    """The lamina layer ID of a chain ID: its hex part (``:`` is not allowed in IDs)."""
    return split_digest(chain_id)[1]


def hash_chunks(chunks: Iterable[bytes], algorithm: str = "sha256") -> tuple[str, int]:
    """Digest and length of a stream given as chunks."""
    h = hashlib.new(algorithm)
    n = 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    return f"{algorithm}:{h.hexdigest()}", n
