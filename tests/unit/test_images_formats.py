"""Image formats without a store: digests, names, compression, archive access, writers."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile
from pathlib import Path

import pytest

from conftest import require_module
from images_support import Image, docker_save, layer_tar, oci_layout, sha
from lamina import compression as compress
from lamina.errors import ImageError
from lamina.images import dockersave, oci
from lamina.images.digest import chain_ids, check_digest
from lamina.images.refs import normalize
from lamina.images.source import DirSource, TarSource, open_source
from lamina.images.tarwriter import TarWriter
from lamina.streams import HashingReader

# -- chain IDs ---------------------------------------------------------------------------


def test_chain_id_rule() -> None:
    a, b, c = (sha(x) for x in (b"a", b"b", b"c"))
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids([]) == []


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "G" * 64, 5, None,
                                 "sha256:" + "0" * 64 + "\n"])
def test_check_digest_refuses(bad: object) -> None:
    with pytest.raises(ImageError):
        check_digest(bad)


def test_hashing_reader_counts_and_drains() -> None:
    data = os.urandom(300_000)
    r = HashingReader(io.BytesIO(data))
    assert r.read(1000) == data[:1000]
    assert r.drain(chunk=4096) == len(data) - 1000
    assert r.count == len(data)
    assert r.digest() == sha(data)


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ref,want", [
    ("busybox", "busybox:latest"),
    ("busybox:1.36", "busybox:1.36"),
    ("docker.io/library/busybox:1", "busybox:1"),
    ("docker.io/me/app", "me/app:latest"),
    ("localhost:5000/app:v2", "localhost:5000/app:v2"),
    ("registry.example.com/a/b:c", "registry.example.com/a/b:c"),
])
def test_normalize(ref: str, want: str) -> None:
    assert normalize(ref) == want


@pytest.mark.parametrize("ref", ["Busybox", "a b", "x:", "busybox@sha256:" + "0" * 64, "../x", ""])
def test_normalize_refuses(ref: str) -> None:
    with pytest.raises(ImageError):
        normalize(ref)


# -- compression ----------------------------------------------------------------------------


def _zstd(data: bytes) -> bytes:
    zstandard = require_module("zstandard")
    # two frames, as zstd -T or a concatenation writes
    c = zstandard.ZstdCompressor()
    return c.compress(data[: len(data) // 2]) + c.compress(data[len(data) // 2:])


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d[:1000]) + gzip.compress(d[1000:]),  # two members
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "zstd": _zstd,
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_sniff_and_decompress(kind: str) -> None:
    data = os.urandom(50_000) * 4
    blob = COMPRESSORS[kind](data)
    assert compress.sniff(blob[:6]) == kind
    reader = compress.decompressed(io.BufferedReader(io.BytesIO(blob)), kind, "layer 1")
    assert reader.read() == data


def test_plain_tar_is_not_compressed() -> None:
    assert compress.sniff(layer_tar({"a": b"x"})[:6]) == compress.NONE


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz"])
def test_damaged_compressed_data_names_the_layer(kind: str) -> None:
    blob = bytearray(COMPRESSORS[kind](os.urandom(100_000)))
    del blob[len(blob) // 2:]  # truncated
    reader = compress.decompressed(io.BufferedReader(io.BytesIO(bytes(blob))), kind, "layer 3 (x)")
    with pytest.raises(ImageError, match=r"layer 3 \(x\): damaged"):
        reader.read()


# -- archive access ---------------------------------------------------------------------------


def _tar(path: Path, members: dict[str, bytes | tuple[str, str]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, value in members.items():
            ti = tarfile.TarInfo(name)
            if isinstance(value, tuple):
                ti.type = tarfile.SYMTYPE if value[0] == "sym" else tarfile.LNKTYPE
                ti.linkname = value[1]
                tar.addfile(ti)
            else:
                ti.size = len(value)
                tar.addfile(ti, io.BytesIO(value))
    return path


def test_tar_source_reads_members_and_follows_links(tmp_path: Path) -> None:
    p = _tar(tmp_path / "a.tar", {"./a/layer.tar": b"AAA", "b/layer.tar": ("sym", "../a/layer.tar"),
                                  "c": ("hard", "a/layer.tar"), "evil": ("sym", "../../etc/passwd")})
    with open(p, "rb") as f:
        src = TarSource(f, "a.tar")
        assert src.open("a/layer.tar").read() == b"AAA"
        assert src.open("b/layer.tar").read() == b"AAA"
        assert src.open("c").read() == b"AAA"
        assert src.size("b/layer.tar") == 3
        assert not src.has("evil")
        assert not src.has("../a/layer.tar")
        with pytest.raises(ImageError, match="missing"):
            src.open("nope")


def test_tar_source_detects_truncation(tmp_path: Path) -> None:
    p = _tar(tmp_path / "a.tar", {"a": os.urandom(5000), "manifest.json": b"[]"})
    data = p.read_bytes()
    for cut in (600, 512 * 12 + 100):  # inside a's data; inside the second header
        q = tmp_path / f"cut{cut}.tar"
        q.write_bytes(data[:cut])
        with open(q, "rb") as f, pytest.raises(ImageError, match="truncated"):
            TarSource(f, "cut.tar")


def test_not_a_tar(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"hello world" * 100)
    with open(p, "rb") as f, pytest.raises(ImageError, match="not a tar|damaged|truncated"):
        TarSource(f, "x")


def test_dir_source_refuses_escape(tmp_path: Path) -> None:
    (tmp_path / "outside").write_bytes(b"secret")
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "link").symlink_to(tmp_path / "outside")
    src = DirSource(layout)
    assert not src.has("link")
    assert not src.has("../outside")


def test_open_source_spools_streams_and_compressed_archives(tmp_path: Path) -> None:
    p = _tar(tmp_path / "a.tar", {"manifest.json": b"[1]"})
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    seen = []
    with open_source(gz, tmpdir=tmp_path / "tmp", progress=seen.append) as src:
        assert src.open("manifest.json").read() == b"[1]"
    assert sum(seen) == gz.stat().st_size
    with open_source("-", stdin=io.BytesIO(p.read_bytes()), tmpdir=tmp_path / "tmp") as src:
        assert src.open("manifest.json").read() == b"[1]"
    assert list((tmp_path / "tmp").iterdir()) == []  # spools are anonymous


# -- readers -----------------------------------------------------------------------------------


def _two_images() -> tuple[Image, Image]:
    base = layer_tar({"etc/os": b"base\n"}, dirs=["etc"])
    top1 = layer_tar({"etc/one": b"1", "etc/os": None})
    top2 = layer_tar({"etc/two": b"2"})
    return Image([base, top1], ["one:latest"]), Image([base, top2], ["two:v1", "two:latest"])


def test_read_docker_save(tmp_path: Path) -> None:
    one, two = _two_images()
    p = docker_save(tmp_path / "s.tar", [one, two])
    with open(p, "rb") as f:
        specs = dockersave.read_images(TarSource(f, "s.tar"))
    assert [s.config_digest for s in specs] == [one.id, two.id]
    assert specs[0].names == ["one:latest"]
    assert specs[1].names == ["two:v1", "two:latest"]
    assert specs[0].diff_ids == [sha(t) for t in one.layers]
    assert specs[0].chain_ids[0] == specs[1].chain_ids[0]  # shared base


def test_read_docker_save_legacy_names(tmp_path: Path) -> None:
    one, _ = _two_images()
    p = docker_save(tmp_path / "s.tar", [one])
    # a manifest without RepoTags: names come from the legacy repositories file
    with tarfile.open(p) as t:
        members = {m.name: t.extractfile(m).read() for m in t if m.isreg()}  # type: ignore[union-attr]
    manifest = json.loads(members["manifest.json"])
    manifest[0]["RepoTags"] = None
    members["manifest.json"] = json.dumps(manifest).encode()
    q = _tar(tmp_path / "q.tar", members)
    with open(q, "rb") as f:
        assert dockersave.read_images(TarSource(f, "q.tar"))[0].names == ["one:latest"]


def test_docker_save_config_name_must_match_digest(tmp_path: Path) -> None:
    one, _ = _two_images()
    p = docker_save(tmp_path / "s.tar", [one])
    with tarfile.open(p) as t:
        members = {m.name: t.extractfile(m).read() for m in t if m.isreg()}  # type: ignore[union-attr]
    cfg = f"{one.id.split(':')[1]}.json"
    members[cfg] = members[cfg].replace(b"/bin/sh", b"/bin/ls")
    q = _tar(tmp_path / "q.tar", members)
    with open(q, "rb") as f, pytest.raises(ImageError, match="config .* has digest"):
        dockersave.read_images(TarSource(f, "q.tar"))


@pytest.mark.parametrize("names_as", ["ref", "containerd"])
def test_read_oci_layout(tmp_path: Path, names_as: str) -> None:
    one, two = _two_images()
    layout = oci_layout(tmp_path / "oci", [one, two], "gzip", names_as=names_as)
    specs = oci.read_images(DirSource(layout))
    assert {s.config_digest for s in specs} == {one.id, two.id}
    by_id = {s.config_digest: s for s in specs}
    assert by_id[two.id].names == ["two:v1", "two:latest"]
    assert all(b.digest and b.path == f"blobs/sha256/{b.digest.split(':')[1]}" for b in by_id[one.id].layers)


def test_oci_bare_tag_ref_name_gives_no_name(tmp_path: Path) -> None:
    one, _ = _two_images()
    layout = oci_layout(tmp_path / "oci", [one], "gzip")
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps(index))
    assert oci.read_images(DirSource(layout))[0].names == []


def test_oci_manifest_digest_is_checked(tmp_path: Path) -> None:
    one, _ = _two_images()
    layout = oci_layout(tmp_path / "oci", [one], "gzip")
    index = json.loads((layout / "index.json").read_text())
    mpath = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    mpath.write_bytes(mpath.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    with pytest.raises(ImageError, match="manifest .* has digest"):
        oci.read_images(DirSource(layout))


def test_oci_multi_platform_index_picks_this_machine(tmp_path: Path) -> None:
    one, _ = _two_images()
    layout = oci_layout(tmp_path / "oci", [one], "gzip")
    index = json.loads((layout / "index.json").read_text())
    mine = dict(index["manifests"][0])
    arch = oci._host_platform()[1]
    other = {"mediaType": mine["mediaType"], "digest": "sha256:" + "0" * 64, "size": 10,
             "platform": {"os": "linux", "architecture": "s390x" if arch != "s390x" else "arm64"}}
    nested = json.dumps({"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": [
        other, {**mine, "platform": {"os": "linux", "architecture": arch}}]}).encode()
    (layout / "blobs" / "sha256" / sha(nested).split(":")[1]).write_bytes(nested)
    index["manifests"] = [{"mediaType": oci.MT_OCI_INDEX, "digest": sha(nested), "size": len(nested),
                           "annotations": {"org.opencontainers.image.ref.name": "multi:1"}}]
    (layout / "index.json").write_text(json.dumps(index))
    specs = oci.read_images(DirSource(layout))
    assert [s.config_digest for s in specs] == [one.id]
    assert specs[0].names == ["multi:1"]


# -- the tar writer -------------------------------------------------------------------------------


@pytest.mark.parametrize("seekable", [True, False])
def test_tar_writer_streams_members(tmp_path: Path, seekable: bool) -> None:
    data = os.urandom(70_001)
    out = tmp_path / "w.tar"
    with open(out, "wb") as f:
        sink = f if seekable else _Pipe(f)
        w = TarWriter(sink)  # type: ignore[arg-type]
        assert w.seekable is seekable
        w.add_bytes("manifest.json", b"[]")
        w.add_dir("d")
        digest, n = w.add_stream("d/layer.tar", [data[:1000], data[1000:]],
                                 size=None if seekable else len(data))
        w.add_symlink("e/layer.tar", "../d/layer.tar")
        w.close()
    assert (digest, n) == (sha(data), len(data))
    assert out.stat().st_size % 512 == 0
    with tarfile.open(out) as t:
        assert t.extractfile("d/layer.tar").read() == data  # type: ignore[union-attr]
        assert t.getmember("e/layer.tar").linkname == "../d/layer.tar"
        assert t.extractfile("manifest.json").read() == b"[]"  # type: ignore[union-attr]


class _Pipe:
    """A write-only, non-seekable file object."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self._f = f

    def write(self, b: bytes) -> int:
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()

    def seekable(self) -> bool:
        return False

    def seek(self, *a: int) -> int:
        raise io.UnsupportedOperation("seek")
