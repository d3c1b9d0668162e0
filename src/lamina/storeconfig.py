"""``ROOT/lamina.json``: the store's format version and the driver it was made with.

Why it is recorded: the layers on disk are in one driver's shape, so a store opened
later with another driver would misread them; the first open records the driver (the
one asked for, or the default), every later one must agree or name none.
"""

from __future__ import annotations

import json
from pathlib import Path

from lamina.drivers.registry import default_driver, driver_class
from lamina.errors import DriverMismatch, StoreCorrupt
from lamina.fs.durable import atomic_write
from lamina.fs.locks import FileLock
from lamina.fs.private import PRIVATE_FILE

FORMAT_VERSION = 1
CONFIG_NAME = "lamina.json"


def settle_driver(root: Path, asked: str | None) -> str:
    """The store's driver: the recorded one (``asked`` must agree), or, for a new store,
    ``asked`` or the default, recorded now."""
    cfg_path = root / CONFIG_NAME
    with FileLock(root / "locks" / ".config.lock"):
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text())
                recorded = cfg["driver"]
            except (ValueError, KeyError) as e:
                raise StoreCorrupt(f"{cfg_path}: unreadable store configuration ({e})") from e
            if cfg.get("format", 0) > FORMAT_VERSION:
                raise StoreCorrupt(f"{cfg_path}: store format {cfg['format']} is newer than this lamina")
            if asked and asked != recorded:
                raise DriverMismatch(f"store {root} was made with driver {recorded}, not {asked}")
            return str(recorded)
        name = asked or default_driver(root)
        driver_class(name)  # unknown names fail before anything is recorded
        atomic_write(cfg_path, json.dumps({"format": FORMAT_VERSION, "driver": name}).encode() + b"\n",
                     mode=PRIVATE_FILE)
        return name
