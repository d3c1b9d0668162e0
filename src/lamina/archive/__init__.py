"""The archive engine: layer tars in and out, whiteouts, changes, sizes, tar-split.

It knows no driver and no store: it works on directories and streams. Drivers pick the
whiteout style they need (see :mod:`lamina.archive.whiteout`).
"""
