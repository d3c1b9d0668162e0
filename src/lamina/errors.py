"""Every error lamina raises on purpose, under one root class.

Why typed errors: the CLI turns each into one line and exit code 1, the Docker plugin
turns each into ``{"Err": ...}``, and callers of the Python API can catch the kind they
care about (``except LayerNotFound``) without parsing messages. The message always names
the culprit (a layer ID, a tar entry, a path) because that is what the user must fix.
"""

from __future__ import annotations

import errno as _errno


class LaminaError(Exception):
    """Base of every deliberate lamina error. ``str(err)`` is one line for the user."""

    #: process exit status the CLI uses for this kind of error
    exit_code: int = 1


class InvalidLayerID(LaminaError, ValueError):
    """A layer ID that breaks the naming rule; refused before it touches the disk."""


class LayerNotFound(LaminaError, KeyError):
    """No complete layer has this ID."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0]) if self.args else "layer not found"


class LayerExists(LaminaError):
    """A layer with this ID already exists (or is being made)."""


class ParentNotFound(LaminaError):
    """The parent named for a new layer does not exist."""


class LayerBusy(LaminaError):
    """The layer is mounted, or another process is changing it."""


class LoopImageBusy(LayerBusy):
    """A sized layer's filesystem image is on loop devices lamina cannot use safely (two
    at once, or one that neither works nor goes away): attaching it again would put
    two filesystems on one file."""


class LayerNamedBySnapshot(LayerBusy):
    """The layer is a containerd snapshot (``key``): only the snapshotter removes it
    (containerd's Remove or garbage collector), or containerd would be left with a
    snapshot whose layer is gone under a container or image."""

    def __init__(self, layer_id: str, key: str, kind: str) -> None:
        self.layer_id, self.key, self.kind = layer_id, key, kind
        super().__init__(f"layer {layer_id} is the {kind} containerd snapshot {key!r}; remove it through "
                         f"containerd (ctr snapshots rm, or its garbage collector), not as a layer")


class MountKept(LaminaError):
    """Something the store mounted could not be released because it is still in use
    (``cleanup`` with ``unmount_all``); it was left mounted. ``kept`` names each such
    mount, one line each; ``done`` is what the cleanup did mend meanwhile."""

    def __init__(self, message: str, kept: list[str] | None = None, done: list[str] | None = None) -> None:
        super().__init__(message)
        self.kept = list(kept) if kept is not None else [message]
        self.done = list(done or [])


class LayerHasChildren(LaminaError):
    """The layer cannot be removed while other layers are built on it."""


class ChainTooDeep(LaminaError):
    """A layer's chain is deeper than the driver (or the kernel) can mount."""


class InvalidArchive(LaminaError):
    """A layer tar is malformed or hostile; ``entry`` names the tar entry at fault."""

    def __init__(self, message: str, entry: str | None = None) -> None:
        self.entry = entry
        super().__init__(f"{entry}: {message}" if entry is not None else message)


class DiffIDMismatch(LaminaError):
    """A layer tar hashed to another DiffID than the one it was applied against; the
    layer was not kept. ``expected`` and ``actual`` are the two digests."""

    def __init__(self, layer_id: str, expected: str, actual: str) -> None:
        self.layer_id, self.expected, self.actual = layer_id, expected, actual
        super().__init__(f"layer {layer_id}: DiffID mismatch: expected {expected}, the tar is {actual}; "
                         "the layer was not kept")


class QuotaExceeded(LaminaError, OSError):
    """A write went past a read-write layer's size limit."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, _errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


class NoSpace(LaminaError, OSError):
    """The store's filesystem (or a layer's size limit) ran out of blocks or inodes.

    An OSError too, with the original errno (ENOSPC or EDQUOT), so code that handles
    "disk full" generically still does.
    """

    def __init__(self, message: str, err: int = _errno.ENOSPC) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class QuotaNotSupported(LaminaError):
    """The driver or backing filesystem cannot enforce a size limit."""


class UnsupportedFilesystem(LaminaError):
    """The backing filesystem cannot host this driver (no d_type, overlay on overlay, ...)."""


class DriverUnavailable(LaminaError):
    """The driver cannot run here (kernel feature missing, not root, ...)."""


class DriverMismatch(LaminaError):
    """The store was made with another driver than the one asked for."""


class InvalidOption(LaminaError, ValueError):
    """A storage option (size, driver option) that cannot be parsed or used."""


class LayerUnreadable(LaminaError):
    """A layer's files could not be read, copied or removed (a mode or owner this
    process cannot get past); the message names the layer and the path."""


class StoreCorrupt(LaminaError):
    """The store's records disagree with what is on disk in a way cleanup cannot mend."""


class ImageError(LaminaError):
    """An image archive is malformed, or a digest or DiffID does not match."""
