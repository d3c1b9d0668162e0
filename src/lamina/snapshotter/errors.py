"""The snapshotter's errors, each one of the kinds containerd's errdefs knows.

containerd turns a gRPC status code back into its error class (``errdefs.FromGRPC``) and
acts on the class: an AlreadyExists from Prepare means "someone made it first", a
FailedPrecondition from Remove during garbage collection means "skip it, it has
children". So every failure here carries the code containerd would have used for it
(:func:`lamina.snapshotter.server.grpc_code`), not a generic Unknown.
"""

from __future__ import annotations

from lamina.errors import LaminaError


class SnapshotNotFound(LaminaError):
    """No snapshot has that key or name (containerd's ErrNotFound)."""


class SnapshotExists(LaminaError):
    """The key or name is taken; keys and names share one space (ErrAlreadyExists)."""


class FailedPrecondition(LaminaError):
    """The snapshot is not in a state for this call: not active, has children (ErrFailedPrecondition)."""


class SnapshotterClosed(LaminaError):
    """The snapshotter was closed: it takes no more calls (ErrUnavailable)."""


class InvalidArgument(LaminaError, ValueError):
    """The request itself is wrong: an empty key, a parent that is not committed, an
    immutable field to update (ErrInvalidArgument)."""
