"""The unit of a changes list, with Docker's numeric kinds (pkg/archive/changes.go)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ChangeKind(IntEnum):
    """Docker's ChangeType values; they go on the wire as integers."""

    MODIFY = 0
    ADD = 1
    DELETE = 2

    @property
    def letter(self) -> str:
        """The letter ``docker diff`` prints: C, A or D."""
        return "CAD"[self.value]


@dataclass(frozen=True, order=True)
class Change:
    """One changed path. ``path`` is absolute inside the layer ("/etc/hosts")."""

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind.letter} {self.path}"

    def to_json(self) -> dict[str, object]:
        """Docker's wire form: ``{"Path": ..., "Kind": 0|1|2}``."""
        return {"Path": self.path, "Kind": int(self.kind)}
