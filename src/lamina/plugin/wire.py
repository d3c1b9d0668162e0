"""The graph-driver plugin protocol on the wire: exact field names, in and out.

Why a module of its own: the names here are what dockerd's ``daemon/graphdriver/proxy.go``
really sends and parses, which is not always what Docker's plugin documentation says
(``shared/reference/graphdriver-protocol.md`` §1.4). Keeping every name in one place
makes each such point visible and testable:

* ``Capabilities`` is answered *nested*, ``{"Capabilities": {"ReproducesExactDiffs": …}}``;
  the documented top-level ``{"ReproducesExactDiffs": …}`` is ignored by dockerd.
* Init's ID maps use the snake_case keys of Go's ``idtools.IDMap`` struct tags,
  ``container_id``/``host_id``/``size``, not the documented ``ContainerID``/``HostID``/
  ``Size`` (Go's case-insensitive matching cannot bridge the underscore).
* dockerd asks with ``Accept: application/vnd.docker.plugins.v1.2+json``, sets no
  Content-Type and never looks at ours; nothing here depends on either header.
* Every request field is ``omitempty``: an absent ``Parent`` is a base layer, ``{}`` is a
  whole request for Status, Cleanup and Capabilities, and Plugin.Activate has no body.

Request keys are matched as Go's ``encoding/json`` does (exact name first, then
case-insensitively), since that is the contract dockerd's own Go plugins get.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina import jsontext
from lamina.archive.change import Change
from lamina.errors import LaminaError

#: the Content-Type we answer with (the one Docker's plugin documentation names)
MEDIA_TYPE = "application/vnd.docker.plugins.v1+json"
#: what dockerd sends in Accept since 2016; accepted like any other value
DOCKERD_ACCEPT = "application/vnd.docker.plugins.v1.2+json"
#: the handshake answer: this socket implements the GraphDriver interface
ACTIVATE_RESPONSE: dict[str, Any] = {"Implements": ["GraphDriver"]}

#: every endpoint dockerd may call, in the order of proxy.go; all are POST
ENDPOINTS = (
    "/Plugin.Activate",
    "/GraphDriver.Init",
    "/GraphDriver.Capabilities",
    "/GraphDriver.Create",
    "/GraphDriver.CreateReadWrite",
    "/GraphDriver.Remove",
    "/GraphDriver.Get",
    "/GraphDriver.Put",
    "/GraphDriver.Exists",
    "/GraphDriver.Status",
    "/GraphDriver.GetMetadata",
    "/GraphDriver.Cleanup",
    "/GraphDriver.Diff",
    "/GraphDriver.Changes",
    "/GraphDriver.ApplyDiff",
    "/GraphDriver.DiffSize",
)


class BadRequest(LaminaError):
    """A request body dockerd would never send: not JSON, wrong types, missing keys."""


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request; an empty body (Plugin.Activate) is ``{}``."""
    if not raw.strip():
        return {}
    try:
        body = jsontext.loads(raw)
    except jsontext.JSONTextError as e:  # nested too deeply, a number too long: plainly
        raise BadRequest(f"request body is not JSON: {e}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"request body is a JSON {type(body).__name__}, not an object")
    return body


def lookup(obj: Mapping[str, Any], name: str) -> Any:
    """``obj[name]`` as Go's encoding/json finds it: exact key, else case-insensitive."""
    if name in obj:
        return obj[name]
    folded = name.casefold()
    for key, value in obj.items():
        if key.casefold() == folded:
            return value
    return None


def _string(obj: Mapping[str, Any], name: str, where: str) -> str:
    value = lookup(obj, name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{where}: {name} must be a string, not {type(value).__name__}")
    return value


def _string_map(obj: Mapping[str, Any], name: str, where: str) -> dict[str, str]:
    value = lookup(obj, name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise BadRequest(f"{where}: {name} must be an object of strings")
    return dict(value)


@dataclass(frozen=True)
class LayerRequest:
    """The body of every per-layer call (Go's ``graphDriverRequest``)."""

    id: str
    #: "" when the key is absent or empty: no parent (Create) / against nothing (Diff...)
    parent: str = ""
    mount_label: str = ""
    storage_opt: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: Mapping[str, Any], endpoint: str) -> LayerRequest:
        layer_id = _string(body, "ID", endpoint)
        if not layer_id:
            raise BadRequest(f"{endpoint}: request has no ID")
        return cls(
            id=layer_id,
            parent=_string(body, "Parent", endpoint),
            mount_label=_string(body, "MountLabel", endpoint),
            storage_opt=_string_map(body, "StorageOpt", endpoint),
        )


IDMapping = tuple[int, int, int]


def _id_maps(body: Mapping[str, Any], name: str) -> list[IDMapping]:
    """Init's ``UIDMaps``/``GIDMaps``: a list of snake_case ``{container_id, host_id, size}``."""
    value = lookup(body, name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"Init: {name} must be a list")
    maps = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise BadRequest(f"Init: {name}[{i}] must be an object")
        triple = []
        for key in ("container_id", "host_id", "size"):
            v = lookup(entry, key)
            if v is None:
                raise BadRequest(
                    f"Init: {name}[{i}] has no {key!r} (dockerd sends snake_case keys "
                    f"container_id, host_id, size; got {sorted(entry)})")
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise BadRequest(f"Init: {name}[{i}].{key} must be a non-negative integer")
            triple.append(v)
        maps.append((triple[0], triple[1], triple[2]))
    return maps


@dataclass(frozen=True)
class InitRequest:
    """``/GraphDriver.Init``: where the store lives and how dockerd configured it."""

    home: str
    #: dockerd's ``--storage-opt`` values, as given ("key=value")
    opts: list[str] = field(default_factory=list)
    uid_maps: list[IDMapping] = field(default_factory=list)
    gid_maps: list[IDMapping] = field(default_factory=list)

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> InitRequest:
        home = _string(body, "Home", "Init")
        if not home:
            raise BadRequest("Init: request has no Home")
        opts = lookup(body, "Opts")
        if opts is None:
            opts = []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise BadRequest("Init: Opts must be a list of strings")
        return cls(home=home, opts=list(opts), uid_maps=_id_maps(body, "UIDMaps"),
                   gid_maps=_id_maps(body, "GIDMaps"))

    def options(self) -> dict[str, str]:
        """``Opts`` split at the first '=' (what ``lamina.open`` takes)."""
        out = {}
        for opt in self.opts:
            key, sep, value = opt.partition("=")
            if not sep or not key.strip():
                raise BadRequest(f"Init: storage option {opt!r} is not KEY=VALUE")
            out[key.strip()] = value.strip()
        return out

    def to_json(self) -> dict[str, Any]:
        """The request as dockerd sends it (for the plugin's saved state)."""
        def maps(m: Sequence[IDMapping]) -> list[dict[str, int]]:
            return [{"container_id": c, "host_id": h, "size": s} for c, h, s in m]

        return {"Home": self.home, "Opts": self.opts, "UIDMaps": maps(self.uid_maps),
                "GIDMaps": maps(self.gid_maps)}


# -- responses ---------------------------------------------------------------------------


def error(message: str) -> dict[str, Any]:
    return {"Err": message}


def ok() -> dict[str, Any]:
    return {"Err": ""}


def capabilities(reproduces_exact_diffs: bool) -> dict[str, Any]:
    """Nested under ``Capabilities``: the proxy decodes that field of its response struct."""
    return {"Capabilities": {"ReproducesExactDiffs": reproduces_exact_diffs}}


def directory(path: str) -> dict[str, Any]:
    return {"Dir": path, "Err": ""}


def exists(flag: bool) -> dict[str, Any]:
    return {"Exists": flag}


def status(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    return {"Status": [[k, v] for k, v in pairs]}


def metadata(meta: Mapping[str, str]) -> dict[str, Any]:
    return {"Metadata": dict(meta), "Err": ""}


def changes(items: Iterable[Change]) -> dict[str, Any]:
    """``Kind`` is Docker's integer ChangeType: 0 Modify, 1 Add, 2 Delete."""
    return {"Changes": [{"Path": c.path, "Kind": int(c.kind)} for c in items], "Err": ""}


def size(n: int) -> dict[str, Any]:
    return {"Size": int(n), "Err": ""}
