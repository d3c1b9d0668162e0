"""``lamina win inspect LAYER PATH``: a file's Windows metadata, decoded for people.

A Windows layer keeps each file's attributes, security descriptor, creation time and
extended attributes as records (xattrs on the file, see
:mod:`lamina.drivers.windowsfilter_meta`). Numbers and base64 tell a person little;
this module shows attribute names, owner, group and each ACE with account names and
rights, the SDDL, and the four Windows times. A file written from Linux has no
records: it is shown with the defaults an export would give it, and says so.

Two entry points for the CLI: :func:`inspect` (mounts the layer through the store) and
:func:`format_inspect` (the text). :func:`inspect_path` works on any mounted view.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lamina.archive import winsd, wintar
from lamina.archive.tar.pax import parse_time
from lamina.archive.winexport import default_security_descriptor, windows_attributes
from lamina.drivers.windowsfilter_meta import ATIME, CTIME, LINKPATH, read_meta
from lamina.errors import InvalidArchive, InvalidOption

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def inspect(store: Any, layer_id: str, path: str) -> dict[str, Any]:
    """Decode the Windows metadata of ``path`` in layer ``layer_id`` of ``store``.

    ``path`` may be a Windows path (``C:\\Windows\\System32``), a path in the view
    (``/Windows/System32``) or a tar name (``Files/Windows/System32``).
    """
    with store.mounted(layer_id) as view:
        return inspect_path(Path(view), path)


def view_parts(path: str) -> list[str]:
    """The components of ``path`` inside the view (see :func:`inspect`)."""
    text = path.replace("\\", "/")
    if len(text) >= 2 and text[1] == ":":
        text = text[2:]
    elif text.startswith(wintar.FILES + "/") or text == wintar.FILES:
        text = text[len(wintar.FILES):]
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidOption(f"path {path!r}: '..' is not allowed")
    return parts


def _resolve(view: Path, parts: list[str], shown: str) -> Path:
    """Walk ``parts`` from ``view`` without following symlinks, each name exact or
    else case-blind (as Windows would find it)."""
    current = view
    for i, part in enumerate(parts):
        candidate = current / part
        if not os.path.lexists(candidate):
            folded = part.casefold()
            match = next((n for n in os.listdir(current) if n.casefold() == folded), None)
            if match is None:
                raise FileNotFoundError(f"{shown}: no such file in the layer")
            candidate = current / match
        if i < len(parts) - 1 and (candidate.is_symlink() or not candidate.is_dir()):
            raise FileNotFoundError(f"{shown}: {'/'.join(parts[: i + 1])} is not a folder")
        current = candidate
    return current


def _time(ns: int) -> str:
    """ISO 8601 in UTC at Windows' 100 ns resolution."""
    secs, rest = divmod(ns, 1_000_000_000)
    stamp = _EPOCH + timedelta(seconds=secs)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S") + f".{rest // 100:07d}Z"


def _recorded_time(meta: dict[str, str], key: str, fallback: int) -> int:
    try:
        return parse_time(meta[key]) if key in meta else fallback
    except ValueError:
        return fallback


def _describe_sd(raw: bytes) -> dict[str, Any]:
    sd = winsd.decode(raw)

    def who(sid: str | None) -> dict[str, Any] | None:
        return None if sid is None else {"sid": sid, "name": winsd.sid_name(sid)}

    def acl(a: winsd.Acl | None) -> list[dict[str, object]] | None:
        return None if a is None else [ace.describe() for ace in a.aces]

    return {
        "sddl": sd.to_sddl(),
        "control": sd.control_names(),
        "owner": who(sd.owner),
        "group": who(sd.group),
        "dacl": acl(sd.dacl),
        "sacl": acl(sd.sacl),
    }


def inspect_path(view: Path, path: str) -> dict[str, Any]:
    """Decode the metadata of ``path`` inside a mounted view (or a ``Files/`` folder)."""
    parts = view_parts(path)
    target = _resolve(view, parts, path)
    st = target.lstat()
    meta = read_meta(target)
    kind = ("directory" if stat.S_ISDIR(st.st_mode) else
            ("junction" if wintar.MOUNTPOINT in meta else "symlink") if stat.S_ISLNK(st.st_mode) else
            "file" if stat.S_ISREG(st.st_mode) else "other")
    attrs = windows_attributes(meta, st)
    recorded = bool(meta)
    sd: dict[str, Any] | None
    sd_source = "recorded"
    if wintar.RAWSD in meta:
        try:
            sd = _describe_sd(base64.b64decode(meta[wintar.RAWSD], validate=True))
        except (binascii.Error, ValueError, InvalidArchive) as e:
            sd = {"error": f"undecodable {wintar.RAWSD}: {e}"}
    elif wintar.SDDL in meta:
        sd = {"sddl": meta[wintar.SDDL], "control": [], "owner": None, "group": None, "dacl": None, "sacl": None}
    else:
        sd = _describe_sd(default_security_descriptor(kind == "directory"))
        sd_source = "default (no descriptor recorded: the file was written from Linux)"
    result: dict[str, Any] = {
        "path": "C:\\" + "\\".join(target.relative_to(view).parts),
        "name": "/".join((wintar.FILES, *target.relative_to(view).parts)),
        "type": kind,
        "size": st.st_size if kind == "file" else 0,
        "recorded": recorded,
        "attributes": {"value": attrs, "hex": f"0x{attrs:x}", "names": wintar.attribute_names(attrs)},
        "security_descriptor": sd,
        "security_descriptor_source": sd_source,
        "times": {
            "creation": _time(_recorded_time(meta, wintar.CREATIONTIME, st.st_mtime_ns)),
            "last_write": _time(st.st_mtime_ns),
            "last_access": _time(_recorded_time(meta, ATIME, st.st_atime_ns)),
            "change": _time(_recorded_time(meta, CTIME, st.st_ctime_ns)),
        },
        "extended_attributes": {
            key[len(wintar.EA_PREFIX):]: _ea(value) for key, value in sorted(meta.items())
            if key.startswith(wintar.EA_PREFIX)
        },
        "streams": _streams(target),
        "records": {k: v for k, v in sorted(meta.items()) if k.startswith(wintar.WINDOWS_RECORD_PREFIXES)},
    }
    if kind in ("symlink", "junction"):
        result["link_target"] = meta.get(LINKPATH) or os.readlink(target)
    return result


def _ea(value: str) -> dict[str, Any]:
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        return {"size": None, "base64": value, "text": None}
    text = raw.decode("utf-8", "replace") if raw.isascii() else None
    return {"size": len(raw), "base64": value, "text": text}


def _streams(target: Path) -> list[dict[str, Any]]:
    if target.is_symlink() or target.name == "":
        return []
    prefix = target.name + ":"
    out = []
    for entry in sorted(os.scandir(target.parent), key=lambda e: e.name):
        if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
            out.append({"name": entry.name[len(prefix):], "size": entry.stat(follow_symlinks=False).st_size})
    return out


def _who(w: dict[str, Any] | None) -> str:
    if w is None:
        return "(none)"
    return f"{w['sid']} ({w['name']})" if w.get("name") else w["sid"]


def format_inspect(d: dict[str, Any]) -> str:
    """The text ``lamina win inspect`` prints."""
    lines = [f"{d['path']}  ({d['name']})"]
    size = f", {d['size']} bytes" if d["type"] == "file" else ""
    lines.append(f"type        {d['type']}{size}")
    if "link_target" in d:
        lines.append(f"target      {d['link_target']}")
    attrs = d["attributes"]
    lines.append(f"attributes  {attrs['hex']}  {' '.join(attrs['names']) or '(none)'}")
    sd = d["security_descriptor"]
    lines.append(f"security    {d['security_descriptor_source']}")
    if sd is not None and "error" in sd:
        lines.append(f"            {sd['error']}")
    elif sd is not None:
        lines.append(f"owner       {_who(sd['owner'])}")
        lines.append(f"group       {_who(sd['group'])}")
        if sd["dacl"] is None:
            lines.append("DACL        (none: everyone has full access)")
        else:
            lines.append(f"DACL        {len(sd['dacl'])} entries")
            for ace in sd["dacl"]:
                flags = f"  [{' '.join(ace['flags'])}]" if ace["flags"] else ""
                name = f" ({ace['name']})" if ace["name"] else ""
                lines.append(f"  {ace['type']:<6} {'|'.join(ace['rights'])}  {ace['sid']}{name}{flags}")
        if sd.get("sacl"):
            lines.append(f"SACL        {len(sd['sacl'])} entries")
        lines.append(f"SDDL        {sd['sddl']}")
    times = d["times"]
    for label, key in (("created", "creation"), ("written", "last_write"),
                       ("accessed", "last_access"), ("changed", "change")):
        lines.append(f"{label:<12}{times[key]}")
    for s in d["streams"]:
        lines.append(f"stream      {s['name']} ({s['size']} bytes)")
    for name, ea in d["extended_attributes"].items():
        text = f" {ea['text']!r}" if ea.get("text") else ""
        lines.append(f"EA          {name} ({ea['size']} bytes){text}")
    return "\n".join(lines)
