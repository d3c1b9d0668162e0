"""The DiffID reader: the digest of exactly what was read, however it was read."""

from __future__ import annotations

import hashlib
import io
import os
import threading

from lamina.streams import HashingReader


def test_digest_of_mixed_reads_and_drain() -> None:
    data = os.urandom(5 * (1 << 20) + 12345)  # several batches for the hashing thread
    r = HashingReader(io.BytesIO(data))
    assert r.read(100) == data[:100]
    buf = bytearray(777_777)
    got = r.readinto(buf)
    assert bytes(buf[:got]) == data[100 : 100 + got]
    r.drain()
    assert r.count == len(data)
    assert r.digest() == "sha256:" + hashlib.sha256(data).hexdigest()
    assert r.digest() == r.digest()


def test_small_input_hashes_without_a_thread() -> None:
    before = threading.active_count()
    r = HashingReader(io.BytesIO(b"tiny"))
    r.drain()
    assert threading.active_count() == before
    assert r.digest() == "sha256:" + hashlib.sha256(b"tiny").hexdigest()


def test_close_stops_the_thread_of_a_failed_apply() -> None:
    r = HashingReader(io.BytesIO(os.urandom(3 << 20)))
    r.read(3 << 20)
    r.close()
    assert not any(t.name == "lamina-diffid" and t.is_alive() for t in threading.enumerate())
