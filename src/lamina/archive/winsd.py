"""Windows security descriptors: the self-relative binary form and SDDL, both ways.

Why this exists: a Windows layer tar carries each file's access control as
``MSWINDOWS.rawsd`` (base64 of a self-relative ``SECURITY_DESCRIPTOR``). lamina keeps the
bytes as they came, but it must also *read* them (``lamina win inspect`` shows owner,
group and DACL) and *make* them (files written from Linux get a default descriptor on
export, or Windows will not run them). SDDL is the notation Windows people read and
write, so defaults are spelled in SDDL here and encoded, and decoded descriptors are
shown in SDDL.

Layout (little-endian; see the Windows layer format note §2.4)::

    u8 Revision(1) u8 Sbz1 u16 Control u32 OffsetOwner u32 OffsetGroup
    u32 OffsetSacl u32 OffsetDacl          (0 = absent; offsets from the start)
    SID: u8 Revision(1) u8 SubAuthorityCount, 6-byte authority (big-endian), u32[n]
    ACL: u8 AclRevision u8 Sbz1 u16 AclSize u16 AceCount u16 Sbz2, then ACEs
    ACE: u8 AceType u8 AceFlags u16 AceSize, then a body (for the common types:
         u32 Mask + SID)

Encoding packs owner, group, SACL, DACL in that order after the 20-byte header, which
reproduces the descriptors that ko, crane and BuildKit put into Windows layers.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from lamina.errors import InvalidArchive

# -- control flags --------------------------------------------------------------------

CONTROL_FLAGS: dict[int, str] = {
    0x0001: "SE_OWNER_DEFAULTED",
    0x0002: "SE_GROUP_DEFAULTED",
    0x0004: "SE_DACL_PRESENT",
    0x0008: "SE_DACL_DEFAULTED",
    0x0010: "SE_SACL_PRESENT",
    0x0020: "SE_SACL_DEFAULTED",
    0x0100: "SE_DACL_AUTO_INHERIT_REQ",
    0x0200: "SE_SACL_AUTO_INHERIT_REQ",
    0x0400: "SE_DACL_AUTO_INHERITED",
    0x0800: "SE_SACL_AUTO_INHERITED",
    0x1000: "SE_DACL_PROTECTED",
    0x2000: "SE_SACL_PROTECTED",
    0x4000: "SE_RM_CONTROL_VALID",
    0x8000: "SE_SELF_RELATIVE",
}
SE_DACL_PRESENT = 0x0004
SE_SACL_PRESENT = 0x0010
SE_DACL_PROTECTED = 0x1000
SE_SACL_PROTECTED = 0x2000
SE_DACL_AUTO_INHERITED = 0x0400
SE_SACL_AUTO_INHERITED = 0x0800
SE_SELF_RELATIVE = 0x8000

# -- SIDs -------------------------------------------------------------------------------

#: SDDL alias -> (SID string, account name), for the well-known SIDs of a Windows image
WELL_KNOWN_SIDS: dict[str, tuple[str, str]] = {
    "WD": ("S-1-1-0", "Everyone"),
    "CO": ("S-1-3-0", "CREATOR OWNER"),
    "CG": ("S-1-3-1", "CREATOR GROUP"),
    "OW": ("S-1-3-4", "OWNER RIGHTS"),
    "NU": ("S-1-5-2", "NT AUTHORITY\\NETWORK"),
    "IU": ("S-1-5-4", "NT AUTHORITY\\INTERACTIVE"),
    "SU": ("S-1-5-6", "NT AUTHORITY\\SERVICE"),
    "AN": ("S-1-5-7", "NT AUTHORITY\\ANONYMOUS LOGON"),
    "ED": ("S-1-5-9", "NT AUTHORITY\\ENTERPRISE DOMAIN CONTROLLERS"),
    "PS": ("S-1-5-10", "NT AUTHORITY\\SELF"),
    "AU": ("S-1-5-11", "NT AUTHORITY\\Authenticated Users"),
    "RC": ("S-1-5-12", "NT AUTHORITY\\RESTRICTED"),
    "SY": ("S-1-5-18", "NT AUTHORITY\\SYSTEM"),
    "LS": ("S-1-5-19", "NT AUTHORITY\\LOCAL SERVICE"),
    "NS": ("S-1-5-20", "NT AUTHORITY\\NETWORK SERVICE"),
    "BA": ("S-1-5-32-544", "BUILTIN\\Administrators"),
    "BU": ("S-1-5-32-545", "BUILTIN\\Users"),
    "BG": ("S-1-5-32-546", "BUILTIN\\Guests"),
    "PU": ("S-1-5-32-547", "BUILTIN\\Power Users"),
    "AO": ("S-1-5-32-548", "BUILTIN\\Account Operators"),
    "SO": ("S-1-5-32-549", "BUILTIN\\Server Operators"),
    "PO": ("S-1-5-32-550", "BUILTIN\\Print Operators"),
    "BO": ("S-1-5-32-551", "BUILTIN\\Backup Operators"),
    "RE": ("S-1-5-32-552", "BUILTIN\\Replicator"),
    "RD": ("S-1-5-32-555", "BUILTIN\\Remote Desktop Users"),
    "NO": ("S-1-5-32-556", "BUILTIN\\Network Configuration Operators"),
    "AC": ("S-1-15-2-1", "APPLICATION PACKAGE AUTHORITY\\ALL APPLICATION PACKAGES"),
    "LW": ("S-1-16-4096", "Mandatory Label\\Low Mandatory Level"),
    "ME": ("S-1-16-8192", "Mandatory Label\\Medium Mandatory Level"),
    "HI": ("S-1-16-12288", "Mandatory Label\\High Mandatory Level"),
    "SI": ("S-1-16-16384", "Mandatory Label\\System Mandatory Level"),
}
_SID_BY_STRING = {sid: alias for alias, (sid, _) in WELL_KNOWN_SIDS.items()}
#: names for SIDs that have no SDDL alias but show up in every Windows image
_EXTRA_NAMES = {
    "S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464": "NT SERVICE\\TrustedInstaller",
    "S-1-15-2-2": "APPLICATION PACKAGE AUTHORITY\\ALL RESTRICTED APPLICATION PACKAGES",
}


def sid_name(sid: str) -> str | None:
    """The account name of a well-known SID, or None."""
    alias = _SID_BY_STRING.get(sid)
    if alias is not None:
        return WELL_KNOWN_SIDS[alias][1]
    return _EXTRA_NAMES.get(sid)


def decode_sid(data: bytes, offset: int = 0) -> tuple[str, int]:
    """Return ("S-1-...", length in bytes) of the SID at ``offset``."""
    if offset + 8 > len(data):
        raise InvalidArchive(f"malformed security descriptor: SID at offset {offset} is truncated")
    revision, count = data[offset], data[offset + 1]
    if revision != 1:
        raise InvalidArchive(f"malformed security descriptor: SID revision {revision} at offset {offset}")
    end = offset + 8 + 4 * count
    if end > len(data):
        raise InvalidArchive(f"malformed security descriptor: SID at offset {offset} is truncated")
    authority = int.from_bytes(data[offset + 2 : offset + 8], "big")
    subs = struct.unpack_from(f"<{count}I", data, offset + 8)
    auth = str(authority) if authority < 2**32 else f"0x{authority:012X}"
    return "-".join(["S", "1", auth, *map(str, subs)]), end - offset


def encode_sid(sid: str) -> bytes:
    """Binary form of ``"S-1-5-32-544"`` or of an SDDL alias such as ``"BA"``."""
    if sid.upper() in WELL_KNOWN_SIDS:
        sid = WELL_KNOWN_SIDS[sid.upper()][0]
    parts = sid.split("-")
    if len(parts) < 3 or parts[0].upper() != "S" or parts[1] != "1":
        raise InvalidArchive(f"invalid SID {sid!r}")
    try:
        authority = int(parts[2], 0)
        subs = [int(p) for p in parts[3:]]
    except ValueError:
        raise InvalidArchive(f"invalid SID {sid!r}") from None
    if len(subs) > 15 or any(not 0 <= s < 2**32 for s in subs) or not 0 <= authority < 2**48:
        raise InvalidArchive(f"invalid SID {sid!r}")
    return bytes([1, len(subs)]) + authority.to_bytes(6, "big") + struct.pack(f"<{len(subs)}I", *subs)


# -- ACEs and access masks ----------------------------------------------------------------

ACE_TYPES: dict[int, str] = {
    0x00: "A", 0x01: "D", 0x02: "AU", 0x03: "AL",
    0x05: "OA", 0x06: "OD", 0x07: "OU", 0x08: "OL",
    0x09: "XA", 0x0A: "XD", 0x11: "ML", 0x12: "RA", 0x13: "SP",
}
ACE_TYPE_NAMES: dict[int, str] = {
    0x00: "allow", 0x01: "deny", 0x02: "audit", 0x03: "alarm",
    0x05: "allow-object", 0x06: "deny-object", 0x07: "audit-object", 0x08: "alarm-object",
    0x09: "allow-callback", 0x0A: "deny-callback", 0x11: "mandatory-label",
    0x12: "resource-attribute", 0x13: "scoped-policy-id",
}
#: ACE types whose body is u32 mask + SID (the object types carry GUIDs in between)
_SIMPLE_ACE = {0x00, 0x01, 0x02, 0x03, 0x09, 0x0A, 0x11, 0x13}

ACE_FLAGS: dict[int, str] = {
    0x01: "OI", 0x02: "CI", 0x04: "NP", 0x08: "IO", 0x10: "ID", 0x40: "SA", 0x80: "FA",
}
ACE_FLAG_NAMES: dict[str, str] = {
    "OI": "OBJECT_INHERIT", "CI": "CONTAINER_INHERIT", "NP": "NO_PROPAGATE_INHERIT",
    "IO": "INHERIT_ONLY", "ID": "INHERITED", "SA": "SUCCESSFUL_ACCESS", "FA": "FAILED_ACCESS",
}

#: SDDL right abbreviations that name a whole mask (file objects); checked first
_MASK_ALIASES: dict[str, int] = {
    "FA": 0x001F01FF, "FR": 0x00120089, "FW": 0x00120116, "FX": 0x001200A9,
}
#: SDDL rights that name single bits
_RIGHT_BITS: dict[str, int] = {
    "GA": 0x10000000, "GX": 0x20000000, "GW": 0x40000000, "GR": 0x80000000,
    "RC": 0x00020000, "SD": 0x00010000, "WD": 0x00040000, "WO": 0x00080000,
    "CC": 0x00000001, "DC": 0x00000002, "LC": 0x00000004, "SW": 0x00000008,
    "RP": 0x00000010, "WP": 0x00000020, "DT": 0x00000040, "LO": 0x00000080,
    "CR": 0x00000100,
}
#: readable names of file access bits, for display
FILE_RIGHTS: dict[int, str] = {
    0x00000001: "READ_DATA", 0x00000002: "WRITE_DATA", 0x00000004: "APPEND_DATA",
    0x00000008: "READ_EA", 0x00000010: "WRITE_EA", 0x00000020: "EXECUTE",
    0x00000040: "DELETE_CHILD", 0x00000080: "READ_ATTRIBUTES", 0x00000100: "WRITE_ATTRIBUTES",
    0x00010000: "DELETE", 0x00020000: "READ_CONTROL", 0x00040000: "WRITE_DAC",
    0x00080000: "WRITE_OWNER", 0x00100000: "SYNCHRONIZE", 0x01000000: "ACCESS_SYSTEM_SECURITY",
    0x10000000: "GENERIC_ALL", 0x20000000: "GENERIC_EXECUTE", 0x40000000: "GENERIC_WRITE",
    0x80000000: "GENERIC_READ",
}
_NAMED_MASKS = {0x001F01FF: "FILE_ALL_ACCESS", 0x00120089: "FILE_GENERIC_READ",
                0x00120116: "FILE_GENERIC_WRITE", 0x001200A9: "FILE_GENERIC_READ|EXECUTE"}


def mask_names(mask: int) -> list[str]:
    """Readable names for an access mask: a whole-mask name if it has one, else bits."""
    if mask in _NAMED_MASKS:
        return [_NAMED_MASKS[mask]]
    names = [name for bit, name in FILE_RIGHTS.items() if mask & bit]
    rest = mask & ~sum(FILE_RIGHTS)
    if rest:
        names.append(f"0x{rest:x}")
    return names


@dataclass
class Ace:
    """One access control entry. ``body`` holds what follows the mask for types that
    are not mask+SID (object ACEs), so they survive a decode/encode round trip."""

    type: int
    flags: int
    mask: int
    sid: str
    body: bytes | None = None

    def to_sddl(self) -> str:
        kind = ACE_TYPES.get(self.type, f"0x{self.type:x}")
        flags = "".join(abbr for bit, abbr in ACE_FLAGS.items() if self.flags & bit)
        return f"({kind};{flags};{_mask_sddl(self.mask)};;;{_sid_sddl(self.sid)})"

    def describe(self) -> dict[str, object]:
        flag_names = [ACE_FLAG_NAMES[abbr] for bit, abbr in ACE_FLAGS.items() if self.flags & bit]
        return {
            "type": ACE_TYPE_NAMES.get(self.type, f"0x{self.type:x}"),
            "flags": flag_names,
            "mask": f"0x{self.mask:08x}",
            "rights": mask_names(self.mask),
            "sid": self.sid,
            "name": sid_name(self.sid),
        }


@dataclass
class Acl:
    revision: int = 2
    aces: list[Ace] = field(default_factory=list)


@dataclass
class SecurityDescriptor:
    """A decoded descriptor; ``None`` for an absent owner, group or ACL."""

    control: int = SE_SELF_RELATIVE
    owner: str | None = None
    group: str | None = None
    sacl: Acl | None = None
    dacl: Acl | None = None

    def control_names(self) -> list[str]:
        return [name for bit, name in CONTROL_FLAGS.items() if self.control & bit]

    def to_sddl(self) -> str:
        out = []
        if self.owner is not None:
            out.append("O:" + _sid_sddl(self.owner))
        if self.group is not None:
            out.append("G:" + _sid_sddl(self.group))
        if self.control & SE_DACL_PRESENT:
            out.append("D:" + _acl_flags(self.control, dacl=True) + _acl_sddl(self.dacl))
        if self.control & SE_SACL_PRESENT:
            out.append("S:" + _acl_flags(self.control, dacl=False) + _acl_sddl(self.sacl))
        return "".join(out)


def _sid_sddl(sid: str) -> str:
    return _SID_BY_STRING.get(sid, sid)


def _mask_sddl(mask: int) -> str:
    for alias, value in _MASK_ALIASES.items():
        if mask == value:
            return alias
    bits = [(name, bit) for name, bit in _RIGHT_BITS.items() if mask & bit]
    if bits and sum(bit for _, bit in bits) == mask:
        return "".join(name for name, _ in bits)
    return f"0x{mask:x}"


def _acl_flags(control: int, *, dacl: bool) -> str:
    protected, auto = (SE_DACL_PROTECTED, SE_DACL_AUTO_INHERITED) if dacl else (
        SE_SACL_PROTECTED, SE_SACL_AUTO_INHERITED)
    return ("P" if control & protected else "") + ("AI" if control & auto else "")


def _acl_sddl(acl: Acl | None) -> str:
    if acl is None:
        return "NO_ACCESS_CONTROL"
    return "".join(ace.to_sddl() for ace in acl.aces)


# -- binary decode / encode ----------------------------------------------------------------

_HEADER = struct.Struct("<BBHIIII")


def decode(data: bytes) -> SecurityDescriptor:
    """Parse a self-relative security descriptor; InvalidArchive if it is malformed."""
    if len(data) < _HEADER.size:
        raise InvalidArchive(f"malformed security descriptor: {len(data)} bytes is too short")
    revision, _, control, o_owner, o_group, o_sacl, o_dacl = _HEADER.unpack_from(data)
    if revision != 1:
        raise InvalidArchive(f"malformed security descriptor: revision {revision}")
    if not control & SE_SELF_RELATIVE:
        raise InvalidArchive("malformed security descriptor: not self-relative (control lacks 0x8000)")
    sd = SecurityDescriptor(control=control)
    if o_owner:
        sd.owner, _ = decode_sid(data, o_owner)
    if o_group:
        sd.group, _ = decode_sid(data, o_group)
    if o_sacl:
        sd.sacl = _decode_acl(data, o_sacl)
    if o_dacl:
        sd.dacl = _decode_acl(data, o_dacl)
    return sd


def _decode_acl(data: bytes, offset: int) -> Acl:
    if offset + 8 > len(data):
        raise InvalidArchive(f"malformed security descriptor: ACL at offset {offset} is truncated")
    revision, _, size, count, _ = struct.unpack_from("<BBHHH", data, offset)
    if offset + size > len(data):
        raise InvalidArchive(f"malformed security descriptor: ACL at offset {offset} overruns the data")
    acl = Acl(revision=revision)
    pos = offset + 8
    for _ in range(count):
        if pos + 4 > offset + size:
            raise InvalidArchive("malformed security descriptor: ACE overruns its ACL")
        ace_type, flags, ace_size = struct.unpack_from("<BBH", data, pos)
        if ace_size < 8 or pos + ace_size > offset + size:
            raise InvalidArchive("malformed security descriptor: ACE overruns its ACL")
        (mask,) = struct.unpack_from("<I", data, pos + 4)
        if ace_type in _SIMPLE_ACE:
            sid, sid_len = decode_sid(data[: pos + ace_size], pos + 8)
            tail = data[pos + 8 + sid_len : pos + ace_size]
            acl.aces.append(Ace(ace_type, flags, mask, sid, tail or None))
        else:
            acl.aces.append(Ace(ace_type, flags, mask, "", data[pos + 8 : pos + ace_size]))
        pos += ace_size
    return acl


def _encode_acl(acl: Acl) -> bytes:
    body = bytearray()
    for ace in acl.aces:
        if ace.type in _SIMPLE_ACE:
            rest = encode_sid(ace.sid) + (ace.body or b"")
        else:
            rest = ace.body or b""
        body += struct.pack("<BBHI", ace.type, ace.flags, 8 + len(rest), ace.mask) + rest
    return struct.pack("<BBHHH", acl.revision, 0, 8 + len(body), len(acl.aces), 0) + bytes(body)


def encode(sd: SecurityDescriptor) -> bytes:
    """Self-relative bytes: header, owner, group, SACL, DACL (the order Linux-side layer
    writers use)."""
    parts: list[bytes] = []
    offsets = [0, 0, 0, 0]
    pos = _HEADER.size
    for i, blob in enumerate((
        encode_sid(sd.owner) if sd.owner is not None else None,
        encode_sid(sd.group) if sd.group is not None else None,
        _encode_acl(sd.sacl) if sd.sacl is not None else None,
        _encode_acl(sd.dacl) if sd.dacl is not None else None,
    )):
        if blob is not None:
            offsets[i] = pos
            parts.append(blob)
            pos += len(blob)
    control = sd.control | SE_SELF_RELATIVE
    return _HEADER.pack(1, 0, control, *offsets) + b"".join(parts)


# -- SDDL parsing --------------------------------------------------------------------------

_SDDL_PART = re.compile(r"([OGDS]):")
_ACE_RE = re.compile(r"\(([^)]*)\)")
_ACE_TYPE_BY_ABBR = {abbr: t for t, abbr in ACE_TYPES.items()}
_ACE_FLAG_BY_ABBR = {abbr: bit for bit, abbr in ACE_FLAGS.items()}


def from_sddl(text: str) -> SecurityDescriptor:
    """Parse the SDDL subset layer tools use: O:, G:, D:/S: with P/AI flags and
    (type;flags;rights;;;sid) ACEs, rights as aliases or hex."""
    sd = SecurityDescriptor(control=SE_SELF_RELATIVE)
    pieces = _SDDL_PART.split(text.strip())
    if pieces[0].strip():
        raise InvalidArchive(f"invalid SDDL {text!r}: unexpected {pieces[0]!r}")
    for key, value in zip(pieces[1::2], pieces[2::2], strict=True):
        value = value.strip()
        if key in "OG":
            setattr(sd, "owner" if key == "O" else "group", value)
            encode_sid(value)  # validate now, with the SDDL in the message
            continue
        head = value.split("(", 1)[0]
        if key == "D":
            sd.control |= SE_DACL_PRESENT
            if "P" in head.replace("NO_ACCESS_CONTROL", ""):
                sd.control |= SE_DACL_PROTECTED
            if "AI" in head:
                sd.control |= SE_DACL_AUTO_INHERITED
        else:
            sd.control |= SE_SACL_PRESENT
            if "P" in head.replace("NO_ACCESS_CONTROL", ""):
                sd.control |= SE_SACL_PROTECTED
            if "AI" in head:
                sd.control |= SE_SACL_AUTO_INHERITED
        acl = None if "NO_ACCESS_CONTROL" in head else Acl(aces=[_parse_ace(a, text) for a in _ACE_RE.findall(value)])
        if key == "D":
            sd.dacl = acl
        else:
            sd.sacl = acl
    return sd


def _parse_ace(body: str, text: str) -> Ace:
    fields = body.split(";")
    if len(fields) != 6 or fields[0] not in _ACE_TYPE_BY_ABBR:
        raise InvalidArchive(f"invalid SDDL {text!r}: ACE ({body})")
    flags = 0
    f = fields[1]
    while f:
        if f[:2] not in _ACE_FLAG_BY_ABBR:
            raise InvalidArchive(f"invalid SDDL {text!r}: ACE flag {f[:2]!r}")
        flags |= _ACE_FLAG_BY_ABBR[f[:2]]
        f = f[2:]
    return Ace(_ACE_TYPE_BY_ABBR[fields[0]], flags, _parse_mask(fields[2], text), _sid_from(fields[5]))


def _sid_from(value: str) -> str:
    if value.upper() in WELL_KNOWN_SIDS:
        return WELL_KNOWN_SIDS[value.upper()][0]
    encode_sid(value)
    return value


def _parse_mask(rights: str, text: str) -> int:
    if rights.lower().startswith("0x"):
        return int(rights, 16)
    if rights in _MASK_ALIASES:
        return _MASK_ALIASES[rights]
    mask = 0
    while rights:
        if rights[:2] not in _RIGHT_BITS:
            raise InvalidArchive(f"invalid SDDL {text!r}: right {rights[:2]!r}")
        mask |= _RIGHT_BITS[rights[:2]]
        rights = rights[2:]
    return mask


def sddl_to_bytes(text: str) -> bytes:
    """Encode an SDDL string (owner/group SIDs canonicalised) as self-relative bytes."""
    sd = from_sddl(text)
    if sd.owner is not None:
        sd.owner = _sid_from(sd.owner)
    if sd.group is not None:
        sd.group = _sid_from(sd.group)
    return encode(sd)


#: The descriptors given on export to files and directories written from Linux (no
#: recorded descriptor): Administrators and SYSTEM full control, Users read and execute,
#: as BuildKit gives them; directories also let Users create entries and pass rights to
#: their children. Without a descriptor Windows cannot run binaries from the layer.
DEFAULT_FILE_SDDL = "O:BAG:SYD:(A;;FA;;;BA)(A;;FA;;;SY)(A;;0x1200a9;;;BU)"
DEFAULT_DIR_SDDL = (
    "O:BAG:SYD:(A;OICI;FA;;;BA)(A;OICI;FA;;;SY)(A;;FA;;;BA)(A;OICIIO;GA;;;CO)"
    "(A;OICI;0x1200a9;;;BU)(A;CI;LC;;;BU)(A;CI;DC;;;BU)"
)
