"""The pull pipeline's memory bound: blobs ahead of their turn wait in the registry, not on disk.

A pull downloads several blobs at once while it applies them one by one in chain order.
What arrives ahead of its turn is held in memory within a budget; past it, those
downloads stop reading their sockets (TCP's flow control holds the rest in the registry)
and nothing is written under the store's ``tmp/``. The image here has blobs several
times larger than the budgets the tests set, and the head blob is slowed down at the
registry (through :class:`registry_support.FaultProxy`) so the blobs behind it do
arrive early.
"""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import lamina
from conftest import skip_or_fail
from images_support import Image, layer_tar, oci_layout
from lamina.registry import ClientOptions, prefetch, pull
from lamina.registry.prefetch import HEAD_BYTES, HEAD_MEMORY
from lamina.store import Store
from registry_support import (
    FaultProxy,
    Faults,
    Registry,
    TmpWatch,
    have_registry,
    skopeo,
    skopeo_push_layout,
)

MiB = 1 << 20


@dataclass
class Big:
    image: Image
    host: str
    #: the layer blobs' digests, in chain order
    digests: list[str]
    sizes: list[int]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Big]:
    """A registry holding big/app:1: three gzip layers of random bytes (3, 12 and 4 MiB),
    so each is many times the budgets below and gzip does not shrink them."""
    missing = have_registry()
    if missing:
        skip_or_fail(f"needs {missing} (scripts/system-deps.sh installs them)")
    work = tmp_path_factory.mktemp("bigimg")
    layers = [layer_tar({"first.bin": os.urandom(3 * MiB)}),
              layer_tar({"second.bin": os.urandom(12 * MiB)}),
              layer_tar({"third.bin": os.urandom(4 * MiB)})]
    img = Image(layers=layers, names=["app:1"])
    layout = oci_layout(work / "layout", [img])
    with Registry(work / "reg") as reg:
        skopeo_push_layout(layout, "app:1", f"{reg.host}/big/app:1")
        raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                                f"docker://{reg.host}/big/app:1").stdout)
        yield Big(img, reg.host, [layer["digest"] for layer in raw["layers"]],
                  [layer["size"] for layer in raw["layers"]])


class PipelineMemory:
    """The most memory that lamina.registry.prefetch's own lines held at once, sampled.

    tracemalloc attributes each block to the line that allocated it, so filtering on the
    module counts the blob buffers the pipeline holds, and not the loader's
    decompression or the fault proxy's buffers, which run in this process too.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._filter = [tracemalloc.Filter(True, prefetch.__file__)]

    def _run(self) -> None:
        while not self._stop.is_set():
            snap = tracemalloc.take_snapshot().filter_traces(self._filter)
            self.peak = max(self.peak, sum(t.size for t in snap.traces))
            self._stop.wait(self.interval)

    def __enter__(self) -> PipelineMemory:
        tracemalloc.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        tracemalloc.stop()


def _store(path: Path) -> Store:
    return lamina.open(path, driver="vfs")


def test_budget_smaller_than_the_blobs(big: Big, tmp_path: Path) -> None:
    """A 512 KiB budget against blobs of 3-12 MiB: the pull completes and verifies,
    the downloads ahead of their turn pause instead of spilling, nothing but layers'
    staging ever appears under tmp/, and memory stays near the budget."""
    budget = 512 << 10
    store = _store(tmp_path / "s")
    # the first blob trickles in (0.25 s per MiB), so the two behind it arrive early
    faults = Faults(slow_blob={big.digests[0]: 0.25})
    with FaultProxy(big.host, faults) as proxy, TmpWatch(store.root) as watch, \
            PipelineMemory() as traced:
        res = pull(store, f"{proxy.host}/big/app:1", memory=budget, parallel=3)
    assert res.image_id == big.image.id and res.layers_pulled == 3
    assert res.bytes_downloaded == sum(big.sizes)
    assert watch.samples > 10 and watch.seen == set(), watch.seen
    assert not list((store.root / "tmp").iterdir())
    # the later downloads did stop reading, and what was held stayed within the budget
    # plus the head's allowance (the budget itself, when that is under HEAD_MEMORY)
    assert res.pauses > 0
    assert res.peak_memory <= budget + min(HEAD_MEMORY, budget), res.peak_memory
    # measured apart from the pipeline's own count: what its code allocated and still
    # held (the blob buffers) stayed within the same bound, plus the kept heads
    # (and the pipeline's own small objects: deques, views, threads; under 64 KiB)
    assert 0 < traced.peak <= budget + min(HEAD_MEMORY, budget) + 3 * HEAD_BYTES + (64 << 10), \
        traced.peak
    # each blob was fetched once: pausing cost no new request
    assert [len(proxy.blob_gets(d)) for d in big.digests] == [1, 1, 1]


def test_default_budget_holds_these_blobs_without_pausing(big: Big, tmp_path: Path) -> None:
    res = pull(_store(tmp_path / "s"), f"{big.host}/big/app:1")
    assert res.image_id == big.image.id
    assert res.pauses == 0 and 0 < res.peak_memory <= sum(big.sizes)


def _small_receive_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the client's plain-HTTP sockets 64 KiB receive buffers, set before connecting.

    On loopback the kernel grows a receive buffer up to ``tcp_rmem``'s maximum (32 MiB
    on this machine), so a paused download's kernel would take in a whole test blob and
    the proxy would never see its client stop; with a small buffer the pause shows at
    once, as on a long path, where the registry's send window then holds the data.
    """
    import http.client
    import socket

    def connect(self: http.client.HTTPConnection) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.settimeout(self.timeout)  # type: ignore[arg-type]
        sock.connect((self.host, self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    monkeypatch.setattr(http.client.HTTPConnection, "connect", connect)


def test_idle_connection_dropped_while_paused_resumes_with_range(
        big: Big, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later blob's download pauses (the budget is full, the first blob is slow); the
    registry side drops its connection after 0.5 s unread; when the blob's turn comes
    the download reads what the kernel had buffered, meets the end, and resumes with a
    Range request from the byte it got to.

    Which of the two later blobs opens its connection and then pauses is up to the
    threads (the other waits for memory before it sends a request at all), so the
    proxy drops either when idle, each at most once.
    """
    _small_receive_buffers(monkeypatch)
    store = _store(tmp_path / "s")
    later = big.digests[1:]
    faults = Faults(slow_blob={big.digests[0]: 0.6}, idle_cut=dict.fromkeys(later, 0.5))
    with FaultProxy(big.host, faults) as proxy, TmpWatch(store.root) as watch:
        res = pull(store, f"{proxy.host}/big/app:1", memory=256 << 10, parallel=3,
                   options=ClientOptions(backoff=0.01))
    assert res.image_id == big.image.id and res.pauses > 0
    assert proxy.idle_cuts and {d for d, _ in proxy.idle_cuts} <= set(later), proxy.idle_cuts
    for digest, cut_at in proxy.idle_cuts:
        ranges = proxy.blob_gets(digest)
        assert ranges[0] == "" and len(ranges) == 2, ranges
        resumed_from = int(ranges[1].removeprefix("bytes=").rstrip("-"))
        # from where the download had got to, no further than the proxy had sent: the
        # bytes already received are not fetched again
        assert 0 < resumed_from <= cut_at + (1 << 20), (resumed_from, cut_at)
    assert watch.seen == set(), watch.seen
