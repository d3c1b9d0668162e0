"""Images Docker wrote, through lamina and back into Docker.

A private dockerd (tests/dockerd.py) builds a small multi-layer image with
``docker import`` + ``docker run`` + ``docker commit`` (one layer deleting files, so it
carries whiteouts, and one replacing a directory, so it carries an opaque marker) and
``docker save``s it. lamina loads that archive; the mounted top layer must equal the
container's filesystem as ``docker export`` shows it; ``lamina image save`` must give
layer tars whose sha256 equal Docker's; and a fresh dockerd must ``docker load`` lamina's
output (both formats) to the same image ID.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_dockerd, require_overlay, require_tool, run_cli

#: what Docker's init layer adds to every container (moby daemon/initlayer): present in
#: ``docker export`` but not in the image
INIT_LAYER = {"/.dockerenv", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/mtab",
              "/dev/console", "/dev/pts", "/dev/shm"}


@dataclass
class Built:
    saved: Path        # docker save output
    export: Path       # docker export of a container of the image
    image_id: str
    diff_ids: list[str]
    layerdb: set[str]  # chain IDs dockerd's layer store holds


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_dockerd()
    require_tool("busybox")
    from dockerd import DockerDaemon, busybox_rootfs_tar

    tmp = tmp_path_factory.mktemp("docker-images")
    rootfs = busybox_rootfs_tar(tmp / "rootfs.tar", busybox=os.path.realpath(_which("busybox")),
                                extra={"etc/motd": b"hello\n", "opt/app/old.txt": b"old\n",
                                       "opt/app/keep/k.txt": b"k\n", "srv/gone.txt": b"bye\n"})
    with DockerDaemon(tmp / "d") as d:
        d.docker("import", str(rootfs), "lamina-test/base:1")
        d.docker("run", "--name", "c1", "--network", "none", "lamina-test/base:1", "sh", "-c",
                 "mkdir -p /data/sub && echo hello > /data/file && echo y > /data/sub/y"
                 " && ln -s /data/file /data/link && ln /data/file /data/hard"
                 " && chmod 4755 /data/sub/y && chown 1000:1000 /data/sub")
        d.docker("commit", "c1", "lamina-test/step:1")
        d.docker("run", "--name", "c2", "--network", "none", "lamina-test/step:1", "sh", "-c",
                 "rm -f /etc/motd /srv/gone.txt && rm -rf /data/sub"
                 " && rm -rf /opt/app && mkdir -p /opt/app && echo new > /opt/app/new.txt")
        d.docker("commit", "c2", "lamina-test/multi:1")
        saved = tmp / "saved.tar"
        d.docker("save", "-o", str(saved), "lamina-test/multi:1")
        d.docker("create", "--name", "x1", "--network", "none", "lamina-test/multi:1", "true")
        export = tmp / "export.tar"
        d.docker("export", "-o", str(export), "x1")
        info = json.loads(d.docker("image", "inspect", "lamina-test/multi:1").stdout)[0]
        layerdb = {f"sha256:{p.name}" for p in (d.data_root / "image" / "overlay2" / "layerdb" / "sha256").iterdir()}
    return Built(saved, export, info["Id"], info["RootFS"]["Layers"], layerdb)


def _which(name: str) -> str:
    import shutil

    path = shutil.which(name)
    assert path
    return path


Entry = tuple[str, int, int, int, str, int]


def _entry(kind: str, mode: int, uid: int, gid: int, data: str = "", mtime: float = 0) -> Entry:
    """What must match: kind, permission bits, owner, content or link target, and the
    mtime of files and links (directories' mtimes change as their children are made)."""
    return (kind, stat.S_IMODE(mode), uid, gid, data, int(mtime) if kind in ("file", "symlink") else 0)


def _export_tree(path: Path) -> dict[str, Entry]:
    out = {}
    with tarfile.open(path) as tar:
        contents: dict[str, str] = {}
        for m in tar:
            name = "/" + m.name.strip("/").removeprefix("./") if m.name.strip("/") not in ("", ".") else "/"
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                contents[name] = hashlib.sha256(f.read()).hexdigest()
                out[name] = _entry("file", m.mode, m.uid, m.gid, contents[name], m.mtime)
            elif m.islnk():
                target = "/" + m.linkname.strip("/")
                out[name] = _entry("file", m.mode, m.uid, m.gid, contents[target], out[target][5])
            elif m.issym():
                out[name] = _entry("symlink", 0o777, m.uid, m.gid, m.linkname, m.mtime)
            elif m.isdir():
                out[name] = _entry("dir", m.mode, m.uid, m.gid)
            else:
                out[name] = _entry("other", m.mode, m.uid, m.gid)
    return {k: v for k, v in out.items() if k not in INIT_LAYER and k != "/"}


def _mounted_tree(root: Path) -> dict[str, Entry]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = "/" + str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                out[rel] = _entry("file", st.st_mode, st.st_uid, st.st_gid,
                                  hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = _entry("symlink", 0o777, st.st_uid, st.st_gid, os.readlink(p), st.st_mtime)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = _entry("dir", st.st_mode, st.st_uid, st.st_gid)
            else:
                out[rel] = _entry("other", st.st_mode, st.st_uid, st.st_gid)
    return out


def _layer_digests(archive: Path) -> list[str]:
    """sha256 of each layer tar of a docker-save archive, in manifest order."""
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        out = []
        for path in manifest[0]["Layers"]:
            m = tar.getmember(path)
            while m.issym():
                m = tar.getmember(os.path.normpath(os.path.join(os.path.dirname(m.name), m.linkname)))
            f = tar.extractfile(m)
            assert f is not None
            out.append("sha256:" + hashlib.sha256(f.read()).hexdigest())
    return out


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_docker_image_through_lamina_and_back(built: Built, tmp_path: Path, driver: str) -> None:
    if driver == "overlay":
        require_overlay()
    root = tmp_path / "store"
    assert len(built.diff_ids) == 3
    assert _layer_digests(built.saved) == built.diff_ids  # docker's own layer tars are the DiffIDs

    res = run_cli("--driver", driver, "--json", "image", "load", str(built.saved), root=root)
    assert res.returncode == 0, res.stderr.decode()
    loaded = json.loads(res.stdout)
    assert loaded["images"][0]["id"] == built.image_id
    assert loaded["images"][0]["names"] == ["lamina-test/multi:1"]
    assert loaded["layers_loaded"] == 3

    # layers are named by chain ID, exactly the chain IDs dockerd's layer store uses
    import lamina
    from lamina.images import chain_ids, resolve_image_top

    store = lamina.open(root)
    try:
        chains = chain_ids(built.diff_ids)
        assert set(chains) <= built.layerdb
        assert {r.id for r in store.layers()} == {c.split(":")[1] for c in chains}
        top = resolve_image_top(store, "lamina-test/multi:1")
        with store.mounted(top) as path:
            mine = _mounted_tree(path)
    finally:
        store.close()
    theirs = _export_tree(built.export)
    assert "/etc/motd" not in mine and "/data/sub" not in mine and "/opt/app/old.txt" not in mine
    assert mine == theirs

    # a container layer on the image, through the CLI
    res = run_cli("create-rw", "ctr", "--image", "lamina-test/multi:1", root=root)
    assert res.returncode == 0, res.stderr.decode()
    res = run_cli("--json", "ls", root=root)
    assert {r["id"]: r["parent"] for r in json.loads(res.stdout)}["ctr"] == top

    # save: the same layer tars, byte for byte, in both formats
    for fmt in ("docker", "oci"):
        out = tmp_path / f"out-{fmt}.tar"
        res = run_cli("image", "save", "--format", fmt, "-o", str(out), "lamina-test/multi:1", root=root)
        assert res.returncode == 0, res.stderr.decode()
        assert _layer_digests(out) == built.diff_ids

    # a fresh dockerd takes lamina's archives back, as the same image
    from dockerd import DockerDaemon

    for fmt in ("docker", "oci"):
        with DockerDaemon(tmp_path / f"d-{fmt}") as d:
            d.docker("load", "-i", str(tmp_path / f"out-{fmt}.tar"))
            info = json.loads(d.docker("image", "inspect", "lamina-test/multi:1").stdout)[0]
            assert info["Id"] == built.image_id
            assert info["RootFS"]["Layers"] == built.diff_ids
            run = d.docker("run", "--rm", "--network", "none", "lamina-test/multi:1", "cat", "/opt/app/new.txt")
            assert run.stdout == "new\n"


def test_lamina_diff_of_a_loaded_layer_is_dockers_tar(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "store"
    assert run_cli("--driver", "vfs", "image", "load", str(built.saved), root=root).returncode == 0
    from lamina.images import chain_ids

    for chain, diff_id in zip(chain_ids(built.diff_ids), built.diff_ids, strict=True):
        out = tmp_path / "layer.tar"
        res = run_cli("diff", chain.split(":")[1], "-o", str(out), root=root)
        assert res.returncode == 0, res.stderr.decode()
        assert "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == diff_id
