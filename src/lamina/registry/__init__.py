"""lamina as a registry client: ``pull`` images in, ``push`` them out (OCI distribution).

The modules, one idea each, from the wire up: :mod:`reference` (Docker's reference
grammar), :mod:`credentials` (flags and Docker's config.json), :mod:`auth` (the
challenge, basic and bearer tokens), :mod:`transport` (HTTP, TLS, retries),
:mod:`blobs` (verified and resumable blob reads), :mod:`manifests` (manifests,
indexes, platforms), :mod:`prefetch` (a registry as an image source, blobs fetched
ahead), :mod:`distribution` (what a pull remembers for a push), :mod:`upload` (blob
uploads), :mod:`pull` and :mod:`push`. The faces (``lamina image pull|push``) sit in
:mod:`lamina.registry.cli`; nothing here imports them.
"""

from __future__ import annotations

from lamina.registry.credentials import Credentials
from lamina.registry.manifests import Platform
from lamina.registry.pull import PullEvents, PullResult, pull
from lamina.registry.push import PushEvents, PushResult, push
from lamina.registry.reference import Reference, ReferenceError, parse
from lamina.registry.transport import ClientOptions, RegistryError

__all__ = ["ClientOptions", "Credentials", "Platform", "PullEvents", "PullResult", "Reference",
           "PushEvents", "PushResult", "ReferenceError", "RegistryError", "parse", "pull", "push"]
