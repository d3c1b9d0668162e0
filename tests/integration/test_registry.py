"""Pull and push against real registries (Debian's docker-registry) on loopback.

Images go in with an independent client (skopeo) and come out through lamina, and the
reverse; each auth mode (none, basic over TLS, bearer tokens from a token server that
signs JWTs the registry trusts) and each fault a network and a registry can throw at a
client (through :class:`registry_support.FaultProxy`) is met once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lamina
from conftest import require_root, run_cli, skip_or_fail
from images_support import Image, config_for, docker_save, layer_tar, oci_layout
from lamina.errors import ImageError
from lamina.images import load
from lamina.images.records import ImageRecords
from lamina.registry import ClientOptions, Credentials, pull, push
from lamina.store import Store
from registry_support import (
    FaultProxy,
    Faults,
    Registry,
    TokenServer,
    docker_config,
    have_registry,
    htpasswd,
    make_ca,
    manifest_digest,
    multi_platform_layout,
    skopeo,
    skopeo_push_layout,
)


def _require_registry() -> None:
    missing = have_registry()
    if missing:
        skip_or_fail(f"needs {missing} (scripts/system-deps.sh installs them)")


def _layers() -> list[bytes]:
    base = layer_tar({"etc/os-release": b"ID=lamina\n", "bin/tool": os.urandom(300_000),
                      "usr/share/doc/big": b"doc " * 200_000}, dirs=["etc", "bin", "usr", "usr/share",
                                                                     "usr/share/doc"])
    mid = layer_tar({"usr/share/doc/big": None, "etc/motd": b"hello\n", "data/blob": os.urandom(1_500_000)},
                    dirs=["data"])
    top = layer_tar({"etc/motd": b"changed\n"})
    return [base, mid, top]


@dataclass
class Built:
    image: Image
    layout: Path
    archive: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    _require_registry()
    work = tmp_path_factory.mktemp("regimg")
    img = Image(layers=_layers(), names=["app:1"])
    return Built(img, oci_layout(work / "layout", [img]), docker_save(work / "app.tar", [img]))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, built: Built) -> Iterator[Registry]:
    """A plain-HTTP registry holding test/app:1 (pushed by skopeo)."""
    with Registry(tmp_path_factory.mktemp("plainreg")) as reg:
        skopeo_push_layout(built.layout, "app:1", f"{reg.host}/test/app:1")
        yield reg


def _store(path: Path, driver: str = "vfs") -> Store:
    return lamina.open(path, driver=driver)


def _tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Mode, owner, mtime (not of directories: whiteouts below change them) and content."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            mtime = 0 if p.is_dir() and not p.is_symlink() else int(st.st_mtime)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, mtime, data)
    return out


def _nothing_left(store: Store) -> None:
    assert store.layers() == []
    assert ImageRecords(store.root).all() == []
    assert list((store.root / "tmp").iterdir()) == [] if (store.root / "tmp").exists() else True


# -- plain HTTP: skopeo in, lamina out, and the reverse --------------------------------------


def test_pulled_image_mounts_as_the_loaded_one(plain: Registry, built: Built, tmp_path: Path) -> None:
    pulled = _store(tmp_path / "pulled")
    res = pull(pulled, f"{plain.host}/test/app:1")
    assert res.image_id == built.image.id
    assert res.layers_pulled == 3 and res.layers_reused == 0
    assert res.manifest_digest == manifest_digest(plain.host, "test/app", "1")
    loaded = _store(tmp_path / "loaded")
    lres = load(loaded, built.layout)
    top = lres.images[0].top_layer
    assert ImageRecords(pulled.root).resolve(f"{plain.host}/test/app:1").top_layer == top
    with pulled.mounted(top) as a, loaded.mounted(top) as b:
        assert _tree(a) == _tree(b)
    # again: every layer is there, nothing is fetched
    again = pull(pulled, f"{plain.host}/test/app:1")
    assert (again.layers_pulled, again.layers_reused, again.bytes_downloaded) == (0, 3, 0)
    # by digest: the same image
    by_digest = pull(_store(tmp_path / "d"), f"{plain.host}/test/app@{res.manifest_digest}")
    assert by_digest.image_id == built.image.id and by_digest.names == []


def test_cli_pull_json_quiet_and_errors(plain: Registry, built: Built, tmp_path: Path) -> None:
    root = tmp_path / "s"
    out = run_cli("--driver", "vfs", "--json", "image", "pull", f"{plain.host}/test/app:1", root=root)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["id"] == built.image.id and doc["layers_pulled"] == 3
    q = run_cli("image", "pull", "-q", f"{plain.host}/test/app:1", root=root)
    assert q.returncode == 0 and q.stdout.decode() == built.image.id + "\n"
    for ref, want in [(f"{plain.host}/test/nosuch:1", "tag 1 not found in test/nosuch"),
                      (f"{plain.host}/test/app:nosuchtag", "tag nosuchtag not found in test/app"),
                      ("Bad//ref", "invalid reference")]:
        r = run_cli("image", "pull", ref, root=root)
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith("lamina: ") and want in err, err
        # the whole reference, and the registry once
        assert err.startswith(f"lamina: {ref}: ") or "invalid" in err, err
        assert err.count(plain.host) == 1 or "invalid" in err, err


def test_unknown_repository_and_unknown_tag(plain: Registry, tmp_path: Path) -> None:
    """A registry that says NAME_UNKNOWN: "repository ... not found"; any other 404 of a
    manifest (MANIFEST_UNKNOWN, which Debian's docker-registry also answers for a
    repository it never had): "tag ... not found"."""
    store = _store(tmp_path / "s")
    with pytest.raises(ImageError) as e:
        pull(store, f"{plain.host}/test/nosuch:1")
    assert str(e.value).startswith(f"{plain.host}/test/nosuch:1: tag 1 not found in test/nosuch"), e.value
    faults = Faults(statuses=[("GET", r"/manifests/", [404])], error_code={404: "NAME_UNKNOWN"})
    with FaultProxy(plain.host, faults) as proxy, pytest.raises(ImageError) as e:
        pull(store, f"{proxy.host}/test/gone:1")
    assert str(e.value) == f"{proxy.host}/test/gone:1: repository test/gone not found", e.value
    faults = Faults(statuses=[("GET", r"/manifests/", [404])], error_code={404: "MANIFEST_UNKNOWN"})
    with FaultProxy(plain.host, faults) as proxy, pytest.raises(ImageError) as e:
        pull(store, f"{proxy.host}/test/app:1")
    assert str(e.value) == f"{proxy.host}/test/app:1: tag 1 not found in test/app", e.value


def test_push_then_skopeo_and_lamina_agree(plain: Registry, built: Built, tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    load(store, built.archive)  # docker-save: uncompressed layers, so push compresses
    res = push(store, "app:1", f"{plain.host}/pushed/app:1")
    assert res.layers_uploaded == 3 and res.manifest_digest == manifest_digest(plain.host, "pushed/app", "1")
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{plain.host}/pushed/app:1").stdout)
    assert info["Digest"] == res.manifest_digest
    assert info["Layers"] == [layer["digest"] for layer in res.layers]
    cfg = json.loads(skopeo("inspect", "--config", "--raw", "--tls-verify=false",
                            f"docker://{plain.host}/pushed/app:1").stdout)
    assert cfg["rootfs"]["diff_ids"] == [layer["diff_id"] for layer in res.layers]
    # skopeo copies it out (docker-archive keeps the config's bytes; its OCI conversion
    # would rewrite them); lamina loads that: the same image ID and layers
    skopeo("copy", "--src-tls-verify=false", f"docker://{plain.host}/pushed/app:1",
           f"docker-archive:{tmp_path / 'out.tar'}:x/y:1")
    other = _store(tmp_path / "o")
    assert load(other, tmp_path / "out.tar").images[0].id == built.image.id
    # a second push sends nothing but the manifest
    again = push(store, "app:1", f"{plain.host}/pushed/app:1")
    assert (again.layers_uploaded, again.layers_existing) == (0, 3)
    assert again.manifest_digest == res.manifest_digest


def test_push_zstd_oci_and_pull_back(plain: Registry, built: Built, tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    load(store, built.archive)
    res = push(store, "app:1", f"{plain.host}/zstd/app:1", compression="zstd", fmt="oci")
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{plain.host}/zstd/app:1").stdout)
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert {layer["mediaType"] for layer in raw["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    assert res.manifest_digest == manifest_digest(plain.host, "zstd/app", "1")
    back = pull(_store(tmp_path / "b"), f"{plain.host}/zstd/app:1")
    assert back.image_id == built.image.id


def test_pulled_image_pushed_elsewhere_keeps_its_digest(plain: Registry, tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    pulled = pull(store, f"{plain.host}/test/app:1")
    res = push(store, f"{plain.host}/test/app:1", f"{plain.host}/mirror/app:copy")
    assert res.layers_mounted == 3 and res.layers_uploaded == 0
    assert res.manifest_reused and res.manifest_digest == pulled.manifest_digest
    assert manifest_digest(plain.host, "mirror/app", "copy") == pulled.manifest_digest


def test_chunked_upload_honours_the_minimum(plain: Registry, built: Built, tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    load(store, built.archive)
    with FaultProxy(plain.host, Faults(chunk_min_length=600_000)) as proxy:
        res = push(store, "app:1", f"{proxy.host}/chunks/app:1", chunk_size=64 << 10, compression="none")
    assert res.layers_uploaded == 3
    sessions: dict[str, list[int]] = {}
    for session, size in proxy.patch_sizes:
        sessions.setdefault(session, []).append(size)
    assert len(sessions) == 3 and sum(len(v) for v in sessions.values()) > 3
    assert all(s >= 600_000 for sizes in sessions.values() for s in sizes[:-1]), sessions
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{plain.host}/chunks/app:1").stdout)
    assert built.image.config is not None
    assert info["Layers"] == json.loads(built.image.config)["rootfs"]["diff_ids"]  # uncompressed


# -- platforms ---------------------------------------------------------------------------


def test_multi_platform_index(plain: Registry, tmp_path: Path) -> None:
    amd = [layer_tar({"arch": b"amd64\n"})]
    arm = [layer_tar({"arch": b"arm64\n"})]
    win = [layer_tar({"Files/arch": b"windows\n"})]
    images = {"linux/amd64": (amd, config_for(amd)),
              "linux/arm64/v8": (arm, config_for(arm, architecture="arm64", variant="v8")),
              "windows/amd64": (win, config_for(win, os="windows"))}
    layout = multi_platform_layout(tmp_path / "layout", images, "multi")
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{plain.host}/test/multi:1")
    ref = f"{plain.host}/test/multi:1"
    store = _store(tmp_path / "s")
    host = pull(store, ref)
    assert host.image_id == Image(layers=amd).id and host.index_digest is not None
    arm_res = pull(store, ref, platform="linux/arm64")
    assert arm_res.image_id == Image(layers=arm, config=config_for(arm, architecture="arm64", variant="v8")).id
    assert arm_res.platform == "linux/arm64"
    with pytest.raises(ImageError, match=r"no manifest for platform linux/s390x .*linux/arm64/v8"):
        pull(store, ref, platform="linux/s390x")
    r = run_cli("image", "pull", "--platform", "linux/ppc64le", ref, root=tmp_path / "c")
    assert r.returncode == 1 and "linux/ppc64le" in r.stderr.decode() and ref in r.stderr.decode()


# -- TLS and basic auth ----------------------------------------------------------------------


def test_tls_and_basic_auth(tmp_path: Path, built: Built) -> None:
    with _secure_registry(tmp_path, built) as (reg, ca):
        ref = f"{reg.host}/secure/app:1"
        store = _store(tmp_path / "s")
        with pytest.raises(ImageError, match="not trusted.*--ca-file"):
            pull(store, ref, options=ClientOptions(credentials=Credentials("alice", "wonderland")))
        with pytest.raises(ImageError, match=rf"{reg.host}.*(user name|access denied|401)"):
            pull(store, ref, options=ClientOptions(ca_file=str(ca.cert)))  # no credentials
        bad = run_cli("image", "pull", "--ca-file", str(ca.cert), "-u", "alice", "--password-stdin", ref,
                      root=tmp_path / "c", input=b"wrong\n")
        err = bad.stderr.decode()
        assert bad.returncode == 1 and err.count("\n") == 1 and ref in err, err
        ok = run_cli("image", "pull", "-q", "--ca-file", str(ca.cert), "-u", "alice", "--password-stdin",
                     ref, root=tmp_path / "c", input=b"wonderland\n")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.decode().strip() == built.image.id
        # credentials from Docker's config.json, --insecure instead of the CA
        with docker_config(tmp_path / "dockercfg", {"auths": {reg.host: {
                "auth": __import__("base64").b64encode(b"alice:wonderland").decode()}}}):
            res = pull(_store(tmp_path / "s2"), ref, options=ClientOptions(insecure=True))
            assert res.image_id == built.image.id
            pushed = push(_store(tmp_path / "s2"), ref, f"{reg.host}/secure/copy:1",
                          options=ClientOptions(ca_file=str(ca.cert)))
            assert pushed.layers_mounted == 3 and pushed.manifest_reused


@contextlib.contextmanager
def _secure_registry(tmp_path: Path, built: Built) -> Iterator[tuple[Registry, Any]]:
    """A TLS registry (its CA made here) that wants alice:wonderland, holding the built
    image as ``secure/app:1`` (pushed by skopeo); yields it and the CA."""
    _require_registry()
    ca, server = make_ca(tmp_path / "pki")
    pw = htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    with Registry(tmp_path / "reg", tls=server, htpasswd_file=pw) as reg:
        skopeo("copy", "--dest-creds", "alice:wonderland", "--dest-cert-dir", str(_certdir(tmp_path, ca)),
               f"oci:{built.layout}:app:1", f"docker://{reg.host}/secure/app:1")
        yield reg, ca


def _certdir(tmp_path: Path, ca: object) -> Path:
    d = tmp_path / "certs.d"
    d.mkdir(exist_ok=True)
    (d / "ca.crt").write_bytes(Path(ca.cert).read_bytes())  # type: ignore[attr-defined]
    return d


# -- token auth ------------------------------------------------------------------------------


def test_token_auth_pull_push_and_refresh(tmp_path: Path, built: Built) -> None:
    _require_registry()
    with TokenServer(tmp_path / "tok", {"bob": "builder"}) as tokens, \
            Registry(tmp_path / "reg", token=tokens) as reg:
        creds = ClientOptions(credentials=Credentials("bob", "builder"))
        store = _store(tmp_path / "s")
        load(store, built.archive)
        res = push(store, "app:1", f"{reg.host}/team/app:1", options=creds)
        assert res.layers_uploaded == 3
        assert any("repository:team/app:pull,push" in t["scopes"] for t in tokens.issued)
        # anonymous: the token server gives no pull right, the registry says no
        with pytest.raises(ImageError, match=rf"{reg.host}/team/app:1.*(denied|401|refused)"):
            pull(_store(tmp_path / "anon"), f"{reg.host}/team/app:1")
        # wrong password: the token server refuses
        r = run_cli("image", "pull", "-u", "bob", "--password-stdin", f"{reg.host}/team/app:1",
                    root=tmp_path / "c", input=b"nope\n")
        assert r.returncode == 1 and "refused" in r.stderr.decode() and "team/app" in r.stderr.decode()
        # a token that expires in the middle of the pull: the registry answers 401, the
        # client fetches a new one and goes on (the blobs are slowed down to outlast it)
        tokens.next_lifetimes, tokens.stated_expiry = [1.0], 3600
        before = len(tokens.issued)
        with FaultProxy(reg.host, Faults(blob_delay=0.6)) as proxy:
            fresh = _store(tmp_path / "fresh")
            got = pull(fresh, f"{proxy.host}/team/app:1", options=creds, parallel=1)
        assert got.image_id == built.image.id
        assert len(tokens.issued) - before >= 2, tokens.issued[before:]
        # the registry itself refused the expired token on a blob
        assert any(m == "GET" and "/blobs/" in p and st == 401 for m, p, st in proxy.answers), proxy.answers


def test_identity_token_from_a_credential_helper(tmp_path: Path, built: Built,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """credHelpers -> docker-credential-X answers an identity token -> OAuth2 refresh grant."""
    _require_registry()
    helper = tmp_path / "bin" / "docker-credential-lamtest"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread s\necho \'{"Username":"<token>","Secret":"rt-123"}\'\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    with TokenServer(tmp_path / "tok", {"bob": "builder"}, refresh_tokens={"rt-123": "bob"}) as tokens, \
            Registry(tmp_path / "reg", token=tokens) as reg:
        store = _store(tmp_path / "s")
        load(store, built.archive)
        push(store, "app:1", f"{reg.host}/team/app:1", options=ClientOptions(credentials=Credentials("bob", "builder")))
        with docker_config(tmp_path / "cfg", {"credHelpers": {reg.host: "lamtest"}}):
            res = pull(_store(tmp_path / "p"), f"{reg.host}/team/app:1")
        assert res.image_id == built.image.id
        assert any(t["grant"] == "refresh_token" and t["user"] == "bob" for t in tokens.issued), tokens.issued


def _creds_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    """``docker-credential-lamstore`` on PATH running ``script`` (sh); returns the file
    where it logs each server it was asked about."""
    asked = tmp_path / "store-asked"
    helper = tmp_path / "storebin" / "docker-credential-lamstore"
    helper.parent.mkdir(exist_ok=True)
    helper.write_text(f'#!/bin/sh\n[ "$1" = get ] || exit 2\nread s\necho "$s" >> {asked}\n{script}')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    return asked


def test_credentials_from_the_creds_store(tmp_path: Path, built: Built,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """config.json with nothing but ``credsStore``: its helper is the only source, the
    pull from a basic-auth registry authenticates with what it answers; a store that
    answers "credentials not found" leaves the pull without, and the error says so."""
    with _secure_registry(tmp_path, built) as (reg, ca):
        ref = f"{reg.host}/secure/app:1"
        options = ClientOptions(ca_file=str(ca.cert))
        asked = _creds_store(tmp_path, monkeypatch, (
            f'if [ "$s" = "{reg.host}" ]; then '
            'echo "{\\"ServerURL\\":\\"$s\\",\\"Username\\":\\"alice\\",\\"Secret\\":\\"wonderland\\"}"; '
            'else echo "credentials not found in native keychain"; exit 1; fi\n'))
        with docker_config(tmp_path / "cfg", {"credsStore": "lamstore"}):
            res = pull(_store(tmp_path / "s"), ref, options=options)
        assert res.image_id == built.image.id
        assert asked.read_text().split() == [reg.host]
        # the store has nothing for this registry
        asked.unlink()
        _creds_store(tmp_path, monkeypatch, 'echo "credentials not found in native keychain"; exit 1\n')
        with docker_config(tmp_path / "cfg", {"credsStore": "lamstore"}) as cfg, \
                pytest.raises(ImageError) as e:
            pull(_store(tmp_path / "t"), ref, options=options)
        msg = str(e.value)
        assert asked.read_text().split() == [reg.host]
        assert msg.startswith(f"{ref}: ") and msg.count(reg.host) == 2, msg  # the reference, the lookup
        assert "wants a user name and password" in msg, msg
        assert (f"no credentials for {reg.host}: credential helper docker-credential-lamstore "
                f"(credsStore in {cfg / 'config.json'}) has none") in msg, msg


# -- faults ----------------------------------------------------------------------------------


def _layer_digests(host: str, repo: str, tag: str) -> list[str]:
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{host}/{repo}:{tag}").stdout)
    return list(info["Layers"])


def test_dropped_connection_resumes_with_range(plain: Registry, built: Built, tmp_path: Path) -> None:
    digests = _layer_digests(plain.host, "test/app", "1")
    faults = Faults(cut_blob_at={digests[0]: 100_000, digests[1]: 500_000})
    with FaultProxy(plain.host, faults) as proxy:
        res = pull(_store(tmp_path / "s"), f"{proxy.host}/test/app:1",
                   options=ClientOptions(backoff=0.01))
    assert res.image_id == built.image.id
    for d, at in ((digests[0], 100_000), (digests[1], 500_000)):
        ranges = proxy.blob_gets(d)
        assert ranges[0] == "" and any(r.startswith("bytes=") and int(r[6:].rstrip("-")) <= at
                                       and int(r[6:].rstrip("-")) > 0 for r in ranges[1:]), ranges


def test_500_and_429_are_retried(plain: Registry, built: Built, tmp_path: Path) -> None:
    faults = Faults(statuses=[("GET", r"/manifests/", [500, 503]), ("GET", r"/blobs/", [429, 502, 500])],
                    retry_after="0")
    retried: list[str] = []
    with FaultProxy(plain.host, faults) as proxy:
        res = pull(_store(tmp_path / "s"), f"{proxy.host}/test/app:1",
                   options=ClientOptions(backoff=0.01, on_retry=lambda r, why: retried.append(why)))
    assert res.image_id == built.image.id
    assert sum("HTTP 5" in w for w in retried) >= 4 and any("HTTP 429" in w for w in retried), retried
    # a registry that keeps failing: bounded, then one error
    faults = Faults(statuses=[("GET", r"/manifests/", [500] * 20)])
    with FaultProxy(plain.host, faults) as proxy, pytest.raises(ImageError, match="HTTP 500"):
        pull(_store(tmp_path / "t"), f"{proxy.host}/test/app:1",
             options=ClientOptions(backoff=0.001, retries=2))


@pytest.mark.parametrize("retry_after, least", [("2", 2.0), ("date+2", 1.0)],
                         ids=["seconds", "http-date"])
def test_retry_after_is_waited_for(plain: Registry, built: Built, tmp_path: Path,
                                   retry_after: str, least: float) -> None:
    """A 429's Retry-After, in seconds or as an HTTP date (whole seconds: 1-2 s ahead),
    replaces the backoff: the retry comes no sooner than it asks."""
    faults = Faults(statuses=[("GET", r"/manifests/", [429]), ("GET", r"/blobs/", [429])],
                    retry_after=retry_after)
    with FaultProxy(plain.host, faults) as proxy:
        res = pull(_store(tmp_path / "s"), f"{proxy.host}/test/app:1", options=ClientOptions(backoff=0.01))
    assert res.image_id == built.image.id
    waits = proxy.retry_waits()
    assert len(waits) == 2 and {"/manifests/" in p for p, _, _ in waits} == {True, False}, waits
    for path, asked, waited in waits:
        assert asked >= least and waited >= asked, (path, asked, waited)


def test_a_retry_after_past_the_cap_is_refused(plain: Registry, tmp_path: Path) -> None:
    """A registry that asks for an hour is not waited for (nor retried early): the pull
    fails at once and says how long it asked for and how long lamina waits."""
    import time

    from lamina.registry.transport import MAX_RETRY_AFTER

    faults = Faults(statuses=[("GET", r"/manifests/", [429])], retry_after="3600")
    t0 = time.monotonic()
    with FaultProxy(plain.host, faults) as proxy, pytest.raises(ImageError) as e:
        pull(_store(tmp_path / "s"), f"{proxy.host}/test/app:1")
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert msg.startswith(f"{proxy.host}/test/app:1: ") and "HTTP 429" in msg, msg
    assert f"tried again in 3600 s, longer than lamina waits ({MAX_RETRY_AFTER:.0f} s)" in msg, msg
    assert [p for m, p, _ in proxy.requests if "/manifests/" in p] == ["/v2/test/app/manifests/1"]


def test_corrupt_blob_is_refused_and_nothing_kept(plain: Registry, tmp_path: Path) -> None:
    digests = _layer_digests(plain.host, "test/app", "1")
    store = _store(tmp_path / "s")
    with FaultProxy(plain.host, Faults(corrupt_blob={digests[1]})) as proxy:
        with pytest.raises(ImageError) as e:
            pull(store, f"{proxy.host}/test/app:1")
    msg = str(e.value)
    ref = f"{proxy.host}/test/app:1"
    # the reference once, then the layer and the very blob that was wrong
    assert msg.startswith(f"{ref}: layer 2 ({digests[1]}): ") and msg.count(proxy.host) == 1, msg
    assert f"the manifest says {digests[1]}, the blob is sha256:" in msg, msg
    _nothing_left(store)


def test_windows_image_into_a_windowsfilter_store(plain: Registry, tmp_path: Path) -> None:
    require_root()
    sys_path = str(Path(__file__).resolve().parent / "windows")
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from wintarmaker import LayerTar

    base = LayerTar.base_layer()
    base.file("Files/hello.txt", b"hello from windows\r\n")
    tar = base.bytes()
    lin = [layer_tar({"linux": b"yes\n"})]
    images = {"linux/amd64": (lin, config_for(lin)), "windows/amd64": ([tar], config_for([tar], os="windows"))}
    layout = multi_platform_layout(tmp_path / "layout", images, "win")
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:win", f"docker://{plain.host}/test/win:1")
    try:
        store = lamina.open(tmp_path / "w", driver="windowsfilter")
    except Exception as e:  # noqa: BLE001 - the driver says what it lacks
        skip_or_fail(f"windowsfilter store unavailable: {e}")
        return
    with store:
        res = pull(store, f"{plain.host}/test/win:1")  # the default platform of this store
        assert res.platform == "windows/amd64"
        rec = ImageRecords(store.root).resolve(res.image_id)
        with store.diff(rec.top_layer) as d:
            assert d.read() == tar  # the Windows layer, byte for byte


def test_foreign_layer_comes_from_its_url(tmp_path: Path) -> None:
    """A Windows-style foreign base layer the registry does not hold: fetched from its URL."""
    import gzip

    from registry_support import raw_push, sha256, static_server

    _require_registry()
    base = layer_tar({"base.txt": b"from far away\n"})
    top = layer_tar({"top.txt": b"local\n"})
    gz_base, gz_top = gzip.compress(base, mtime=0), gzip.compress(top, mtime=0)
    config = config_for([base, top])
    with static_server({"/layers/base.tar.gz": gz_base}) as url, \
            Registry(tmp_path / "reg", allow_urls=r"^http://127\.0\.0\.1") as reg:
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                               "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                          "digest": sha256(config), "size": len(config)},
                               "layers": [{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                                           "digest": sha256(gz_base), "size": len(gz_base),
                                           "urls": [f"{url}/layers/base.tar.gz"]},
                                          {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                           "digest": sha256(gz_top), "size": len(gz_top)}]}).encode()
        raw_push(reg.host, "win/app", "1", [config, gz_top], manifest,
                 "application/vnd.docker.distribution.manifest.v2+json")
        store = _store(tmp_path / "s")
        res = pull(store, f"{reg.host}/win/app:1")
        assert res.image_id == sha256(config) and res.layers_pulled == 2
        # pushed on, the foreign layer is named by its URL, not uploaded (as Docker does)
        other = Registry(tmp_path / "reg2", allow_urls=r"^http://127\.0\.0\.1")
        with other:
            pushed = push(store, res.image_id, f"{other.host}/win/copy:1")
            assert pushed.layers_foreign == 1 and pushed.layers_uploaded == 1
            raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                                    f"docker://{other.host}/win/copy:1").stdout)
            assert raw["layers"][0]["urls"] == [f"{url}/layers/base.tar.gz"]
            again = pull(_store(tmp_path / "s2"), f"{other.host}/win/copy:1")
            assert again.image_id == res.image_id


def test_docker_pulls_what_lamina_pushed(plain: Registry, built: Built, tmp_path: Path) -> None:
    from conftest import require_dockerd
    from dockerd import DockerDaemon

    require_dockerd()
    store = _store(tmp_path / "s")
    load(store, built.archive)
    res = push(store, "app:1", f"{plain.host}/fordocker/app:1")
    with DockerDaemon(tmp_path / "d", storage_driver="vfs",
                      extra_args=["--insecure-registry", plain.host]) as d:
        d.docker("pull", f"{plain.host}/fordocker/app:1")
        out = d.docker("image", "inspect", f"{plain.host}/fordocker/app:1").stdout
        doc = json.loads(out)[0]
        assert doc["Id"] == built.image.id
        assert f"{plain.host}/fordocker/app@{res.manifest_digest}" in doc["RepoDigests"]


def test_cli_progress_on_a_terminal(plain: Registry, built: Built, tmp_path: Path) -> None:
    """With stderr a terminal: one line per layer (state, bytes) and a total, both ways."""
    import pty
    import subprocess
    import sys

    from conftest import REPO

    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    base = [sys.executable, "-m", "lamina", "--root", str(tmp_path / "s"), "--driver", "vfs", "image"]
    try:
        for args, words in ((["pull", f"{plain.host}/test/app:1"], ("1/3", "3/3", "done", "pulling:")),
                            (["push", f"{plain.host}/test/app:1", f"{plain.host}/tty/app:1"],
                             ("layer 1/3", "layer 3/3", "mounted", "pushing:"))):
            proc = subprocess.run([*base, *args], stderr=slave, stdout=subprocess.PIPE, env=env, timeout=120)
            assert proc.returncode == 0
            drawn = os.read(master, 1 << 16).decode(errors="replace")
            assert all(w in drawn for w in words), drawn
            assert "MiB" in drawn or "KiB" in drawn
    finally:
        os.close(master)
        os.close(slave)
