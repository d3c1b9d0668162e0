"""Image references in Docker's grammar: ``[registry[:port]/]repository[:tag][@digest]``.

Why our own parser: the reference says where to connect and what to ask for, so it must
mean exactly what it means to ``docker pull``. The grammar (distribution/reference)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path
    domain     := host [ ":" port ]       host: DNS labels, IPv4, or "[" IPv6 "]"
    path       := component ( "/" component )*
    component  := [a-z0-9]+ ( ( [._] | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex        (sha256: 64 hex digits, sha512: 128)

Normalisation, as Docker does it: the part before the first ``/`` is a registry only if
it holds a ``.`` or a ``:``, is ``localhost``, or has upper-case letters; otherwise the
whole name is a Docker Hub repository (``docker.io``), and a one-component Hub name gets
``library/``. ``index.docker.io`` is an old spelling of ``docker.io``. A reference with
neither tag nor digest means ``:latest``. The repository must be lower case and the
whole name at most 255 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lamina.errors import ImageError

DOCKER_HUB = "docker.io"
#: where Docker Hub's registry API answers
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
_LEGACY_HUB = "index.docker.io"
_MAX_NAME = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")


class ReferenceError(ImageError):
    """A string that is not an image reference."""


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised reference. ``str()`` gives Docker's full form."""

    #: registry host[:port] as written (``docker.io`` for Hub)
    registry: str
    #: repository path (``library/busybox``)
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def api_host(self) -> str:
        """The host[:port] to connect to (Hub's API lives on another name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        """The host without port or IPv6 brackets."""
        host = self.registry
        if host.startswith("["):
            return host[1:host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest if there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def familiar(self) -> str:
        """The short ``name:tag`` lamina's image records use (``busybox:latest``)."""
        name = f"{self.registry}/{self.repository}"
        if self.registry == DOCKER_HUB:
            name = self.repository.removeprefix("library/") if self.repository.count("/") == 1 \
                and self.repository.startswith("library/") else self.repository
        return f"{name}:{self.tag or DEFAULT_TAG}"

    def with_tag(self, tag: str | None, digest: str | None = None) -> Reference:
        return Reference(self.registry, self.repository, tag, digest)


def parse(text: str, *, default_tag: bool = True) -> Reference:
    """Parse ``text`` as Docker does (``ParseNormalizedNamed``); ReferenceError if invalid.

    ``default_tag``: give ``latest`` to a reference with neither tag nor digest.
    """
    ref = text.strip()
    if not ref:
        raise ReferenceError("invalid reference '': empty")
    name, digest = ref, None
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if not _DIGEST_RE.fullmatch(digest):
            raise ReferenceError(f"invalid reference {text!r}: bad digest {digest!r} "
                                 "(expected sha256:<64 hex digits>)")
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise ReferenceError(f"invalid reference {text!r}: bad tag {tag!r}")
    registry, path = _split_domain(name, text)
    if not _PATH_RE.fullmatch(path):
        what = "repository name must be lowercase" if path.lower() != path else "bad repository name"
        raise ReferenceError(f"invalid reference {text!r}: {what}")
    if len(f"{registry}/{path}") > _MAX_NAME:
        raise ReferenceError(f"invalid reference {text!r}: name longer than {_MAX_NAME} characters")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def _split_domain(name: str, text: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    is_domain = sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first)
    if not is_domain:
        registry, path = DOCKER_HUB, name
    else:
        if not _HOST_RE.fullmatch(first):
            raise ReferenceError(f"invalid reference {text!r}: bad registry {first!r}")
        registry, path = first, rest
    if registry == _LEGACY_HUB:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return registry, path


def error_line(ref: Reference, msg: str) -> str:
    """An error line that names ``ref`` once: ``msg`` if it does already, else ``ref``
    before ``msg`` less the registry or repository ``msg`` starts with (the layers below
    name what they know, so ``127.0.0.1:5000/t/app: layer 1`` becomes
    ``127.0.0.1:5000/t/app:1: layer 1``, not both)."""
    what = str(ref)
    if what in msg:
        return msg
    for prefix in (f"{ref.registry}/{ref.repository}: ", f"{ref.registry}: ", f"{ref.repository}: "):
        msg = msg.removeprefix(prefix)
    return f"{what}: {msg}"
