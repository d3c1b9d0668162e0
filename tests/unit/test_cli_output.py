"""The CLI's one-line errors (lamina.cli.output.one_line)."""

from __future__ import annotations

from lamina.cli.output import one_line
from lamina.errors import LayerBusy


def test_a_system_error_carries_the_notes_that_name_its_culprit() -> None:
    err = PermissionError(13, "Permission denied", "shut")
    err.add_note("while applying tar entry 'shut/new'")
    err.add_note("layer q not made")
    assert one_line(err) == ("[Errno 13] Permission denied: 'shut' "
                             "(while applying tar entry 'shut/new'; layer q not made)")


def test_lamina_errors_say_it_all_on_one_line() -> None:
    err = LayerBusy("layer x is in use\n   by another operation")
    err.add_note("a note for --debug only")
    assert one_line(err) == "layer x is in use by another operation"
    assert one_line(OSError()) == "OSError"
