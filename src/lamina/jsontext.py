"""JSON that came from outside, parsed with one typed error and a plain message.

Why a module of its own: ``json.loads`` lets two failures of hostile input through as
something else. A document nested a hundred thousand deep (``[[[[...``) raises
RecursionError, which every face used to report as an internal error; a number of a
hundred thousand digits raises a ValueError whose text tells the *user* to call
``sys.set_int_max_str_digits()``. Every face that reads JSON from outside (the plugin's
request bodies, image archives, registry manifests) parses here and words the refusal
its own way around :class:`JSONTextError`.
"""

from __future__ import annotations

import json
import sys
from typing import Any


class JSONTextError(ValueError):
    """Text that is not JSON this program will read; the message says why, plainly."""


def loads(data: bytes | str) -> Any:
    """``json.loads``, with every refusal a :class:`JSONTextError`."""
    try:
        return json.loads(data)
    except RecursionError:
        raise JSONTextError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise JSONTextError(f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise JSONTextError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # the int-digits guard (CVE-2020-10735)
            raise JSONTextError(f"a number has more than {sys.get_int_max_str_digits()} digits") from None
        raise JSONTextError(str(e)) from None


__all__ = ["JSONTextError", "loads"]
