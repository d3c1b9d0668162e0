"""Image names (``repo:tag``) in Docker's familiar form.

Why normalise: ``docker save`` writes ``busybox:latest``, an OCI layout written by
containerd says ``docker.io/library/busybox:latest``, and a user types ``busybox``. All
three must find the same image record, so names are stored in the short ("familiar")
form Docker prints, with the tag always present.
"""

from __future__ import annotations

import re

from lamina.errors import ImageError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)"
_NAME_RE = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DEFAULT_DOMAINS = ("docker.io/", "index.docker.io/")
DEFAULT_TAG = "latest"


def split_tag(ref: str) -> tuple[str, str | None]:
    """``"a/b:1"`` -> ``("a/b", "1")``; a ``:`` inside the domain's port is not a tag."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, None


def normalize(ref: str) -> str:
    """The familiar ``name:tag`` of a reference; ImageError if it is not a valid name."""
    if "@" in ref:
        raise ImageError(f"invalid image name {ref!r}: digest references are not names; use the image ID")
    name, tag = split_tag(ref.strip())
    if tag is None:
        tag = DEFAULT_TAG
    if len(name) > 255 or not _NAME_RE.fullmatch(name) or not _TAG_RE.fullmatch(tag):
        raise ImageError(f"invalid image name {ref!r}: expected [registry/]repository[:tag] in lower case")
    for prefix in _DEFAULT_DOMAINS:
        if name.startswith(prefix):
            name = name[len(prefix):]
            if name.startswith("library/") and name.count("/") == 1:
                name = name[len("library/"):]
            break
    return f"{name}:{tag}"


def try_normalize(ref: str) -> str | None:
    """:func:`normalize`, or None for something that is not a valid name."""
    try:
        return normalize(ref)
    except ImageError:
        return None
