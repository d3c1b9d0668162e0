"""Where a user's registry credentials come from: flags, or Docker's ``config.json``.

Why Docker's file: users have logged in with ``docker login`` (or ``skopeo login``,
podman, a cloud's helper) and expect every client to use that. The file is
``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``; for a registry host it
gives, in Docker's order of precedence:

1. ``credHelpers[host]``: run ``docker-credential-<helper> get`` with the server on
   stdin; it prints ``{"Username", "Secret"}`` (Username ``<token>``: Secret is an
   identity token, exchanged for access tokens with OAuth2's refresh-token grant).
2. ``credsStore``: the same with one helper for every host.
3. ``auths[host].auth``: base64 of ``user:password`` (or ``identitytoken``).

Keys in ``auths`` are written many ways (``host``, ``https://host``, ``https://host/v1/``),
so they are compared by host alone. Docker Hub's key is ``https://index.docker.io/v1/``.
A helper that does not know the host answers "credentials not found": no credentials,
not an error. Nothing here is ever logged.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import ImageError

HUB_KEY = "https://index.docker.io/v1/"
_HELPER_TIMEOUT = 60


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    #: an OAuth2 refresh token (``docker login`` to some registries stores one)
    identity_token: str = ""

    def __repr__(self) -> str:  # never show secrets in a traceback or a log
        return f"Credentials(username={self.username!r}, ...)"

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token)


def config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _host_of(key: str) -> str:
    key = key.strip()
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
    return key.split("/", 1)[0]


def _lookup_keys(registry: str) -> set[str]:
    if registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return {"index.docker.io", "docker.io", "registry-1.docker.io"}
    return {registry}


@dataclass(frozen=True)
class Found:
    """What a look in config.json found for one registry."""

    credentials: Credentials | None
    #: where we looked and found nothing (empty when credentials were found): the error
    #: a registry's demand for credentials becomes says it, so a user whose helper has
    #: no entry for the host learns that rather than only "access denied"
    missing: str = ""


def load(registry: str, path: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (``host[:port]``, ``docker.io`` for Hub) or None."""
    return find(registry, path).credentials


def find(registry: str, path: Path | None = None) -> Found:
    """Credentials for ``registry``, or where none were found (:class:`Found`)."""
    path = path or config_path()
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return Found(None, f"no credentials for {registry}: {path} does not exist")
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read docker credentials {path}: {e}") from e
    if not isinstance(doc, dict):
        raise ImageError(f"cannot read docker credentials {path}: not a JSON object")
    keys = _lookup_keys(registry)
    server = HUB_KEY if "docker.io" in keys else registry
    looked: list[str] = []
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _host_of(key) in keys and isinstance(helper, str) and helper:
                creds = run_helper(helper, server)
                return Found(creds, "" if creds else
                             f"no credentials for {server}: credential helper docker-credential-{helper} "
                             f"(credHelpers in {path}) has none")
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        creds = run_helper(store, server)
        if creds is not None:
            return Found(creds)
        looked.append(f"credential helper docker-credential-{store} (credsStore in {path}) has none")
    auths = doc.get("auths")
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if _host_of(key) in keys and isinstance(entry, dict):
                creds = _from_auth_entry(entry, path, key)
                if creds is not None:
                    return Found(creds)
    looked.append(f"{path} has no auths entry for it")
    return Found(None, f"no credentials for {server}: {', and '.join(looked)}")


def _from_auth_entry(entry: dict[str, object], path: Path, key: str) -> Credentials | None:
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    user = pw = ""
    if isinstance(auth, str) and auth:
        try:
            user, sep, pw = base64.b64decode(auth, validate=False).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"{path}: auths[{key!r}].auth is not base64 of user:password") from e
        if not sep:
            raise ImageError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
    elif isinstance(entry.get("username"), str):
        user, pw = str(entry.get("username")), str(entry.get("password") or "")
    creds = Credentials(user, pw, token if isinstance(token, str) else "")
    return None if creds.empty else creds


def run_helper(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<helper>`` for ``server``'s credentials (None: it has none)."""
    prog = f"docker-credential-{helper}"
    try:
        res = subprocess.run([prog, "get"], input=server.encode(), capture_output=True,
                             timeout=_HELPER_TIMEOUT, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"credential helper {prog} (from {config_path()}) is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"credential helper {prog} did not answer in {_HELPER_TIMEOUT} s") from e
    out = res.stdout.decode("utf-8", "replace").strip()
    if res.returncode != 0:
        if "credentials not found" in out.lower() or "credentials not found" in res.stderr.decode(
                "utf-8", "replace").lower():
            return None
        msg = (out or res.stderr.decode("utf-8", "replace").strip()).splitlines()[:1]
        raise ImageError(f"credential helper {prog} failed for {server}: {msg[0] if msg else res.returncode}")
    try:
        doc = json.loads(out)
        user, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    except (ValueError, AttributeError) as e:
        raise ImageError(f"credential helper {prog} printed something that is not its JSON") from e
    if user == "<token>":
        return Credentials(identity_token=secret)
    creds = Credentials(user, secret)
    return None if creds.empty else creds
