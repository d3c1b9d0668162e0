"""The one tar codec: every tar lamina reads or writes goes through this package.

Formats only, no files: it knows no layer, driver or store (Windows layer records
live beside it in :mod:`lamina.archive.wintar`, image archives in :mod:`lamina.images`).

- :mod:`.format`: the 512-byte block, its fields, type flags and numbers;
- :mod:`.pax`: PAX records, and the numbers and times in them (Go's rules);
- :mod:`.reader` (on :mod:`.buffer`): a streaming reader that folds PAX and GNU meta
  headers into each entry (:mod:`.entry`) and can hand back the raw bytes around it
  (tar-split needs them);
- :mod:`.overrides`: which name an entry has when its headers give several (Go's
  rules), and the conflicts between readers that are refused instead;
- :mod:`.writer`: header blocks built by hand (ustar, PAX records when needed, GNU for
  image archives);
- :mod:`.split`: tar-split, Docker's record of a tar's non-content bytes, written while
  a tar is read (inline by apply, or through :class:`.split.RecordingReader`) and
  replayed to rebuild the tar byte for byte;
- :mod:`.crc64`: the CRC-64 tar-split keeps per file.

Imports point one way: these modules know no layer, driver, store or face.
"""
