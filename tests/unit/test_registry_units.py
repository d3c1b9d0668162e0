"""The registry client's pure parts: references, challenges, credentials, platforms."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from lamina.registry import credentials
from lamina.registry.auth import parse_challenge
from lamina.registry.manifests import Platform, choose
from lamina.registry.reference import ReferenceError, parse
from lamina.registry.transport import RegistryError, is_loopback

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repo, tag, digest", [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("library/busybox", "docker.io", "library/busybox", "latest", None),
    ("user/app:v1", "docker.io", "user/app", "v1", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/user/app", "docker.io", "user/app", "latest", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/a/b:c", "localhost:5000", "a/b", "c", None),
    ("127.0.0.1:5000/a", "127.0.0.1:5000", "a", "latest", None),
    ("[::1]:5000/a:t", "[::1]:5000", "a", "t", None),
    ("Registry/app", "Registry", "app", "latest", None),  # upper case: a host, as Docker reads it
    ("quay.io/a/b-c__d.e@" + D, "quay.io", "a/b-c__d.e", None, D),
    ("quay.io/a/b:t@" + D, "quay.io", "a/b", "t", D),
])
def test_reference_grammar_and_docker_defaults(text: str, registry: str, repo: str,
                                               tag: str | None, digest: str | None) -> None:
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)


def test_reference_forms() -> None:
    assert str(parse("busybox")) == "docker.io/library/busybox:latest"
    assert parse("busybox").familiar == "busybox:latest"
    assert parse("user/app:v1").familiar == "user/app:v1"
    assert parse("127.0.0.1:5000/a/b").familiar == "127.0.0.1:5000/a/b:latest"
    assert parse("busybox").api_host == "registry-1.docker.io"
    assert parse("[::1]:5000/a").hostname == "::1"
    assert parse("quay.io/a@" + D).target == D


@pytest.mark.parametrize("text", [
    "", "upper/Case", "a//b", "a:", "a:-bad", "a@sha256:short", "a/b@md5:" + "0" * 32,
    "-lead/x", "a/" + "b" * 300, "host:port:x/y",
])
def test_bad_references_are_refused_with_the_text(text: str) -> None:
    with pytest.raises(ReferenceError) as e:
        parse(text)
    assert "invalid reference" in str(e.value)


def test_challenges() -> None:
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                         'scope="repository:a/b:pull,push",error="invalid_token"')
    assert ch is not None and ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.example/token", "service": "reg",
                         "scope": "repository:a/b:pull,push", "error": "invalid_token"}
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None and basic.scheme == "basic" and basic.params["realm"] == "Registry Realm"
    assert parse_challenge("") is None


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("registry.example")


def _config(tmp_path: Path, doc: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path


def test_credentials_from_auths(tmp_path: Path) -> None:
    auth = base64.b64encode(b"alice:s3:cret").decode()
    path = _config(tmp_path, {"auths": {"https://reg.example:5000/v1/": {"auth": auth},
                                        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()}}})
    creds = credentials.load("reg.example:5000", path)
    assert creds is not None and (creds.username, creds.password) == ("alice", "s3:cret")
    hub = credentials.load("docker.io", path)
    assert hub is not None and hub.username == "hub"
    assert credentials.load("other.example", path) is None
    assert "s3:cret" not in repr(creds)
    assert credentials.load("x", tmp_path / "missing.json") is None


def _helper(tmp_path: Path, name: str, script: str) -> None:
    prog = tmp_path / "bin" / f"docker-credential-{name}"
    prog.parent.mkdir(exist_ok=True)
    prog.write_text("#!/bin/sh\n" + script)
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)


def test_credentials_from_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a helper that knows one server; credHelpers beats credsStore beats auths
    _helper(tmp_path, "lamtest", 'read s; if [ "$s" = "reg.example" ]; then '
                                 'echo "{\\"ServerURL\\":\\"$s\\",\\"Username\\":\\"bob\\",\\"Secret\\":\\"pw\\"}"; '
                                 'else echo "credentials not found in native keychain"; exit 1; fi\n')
    _helper(tmp_path, "lamtoken", 'read s; echo "{\\"Username\\":\\"<token>\\",\\"Secret\\":\\"refresh-me\\"}"\n')
    _helper(tmp_path, "lambroken", 'echo "keychain locked" >&2; exit 3\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    path = _config(tmp_path, {"credHelpers": {"reg.example": "lamtest", "tok.example": "lamtoken",
                                              "broken.example": "lambroken", "gone.example": "nosuch"},
                              "credsStore": "lamtest",
                              "auths": {"plain.example": {"auth": base64.b64encode(b"carol:x").decode()}}})
    creds = credentials.load("reg.example", path)
    assert creds is not None and (creds.username, creds.password) == ("bob", "pw")
    tok = credentials.load("tok.example", path)
    assert tok is not None and tok.identity_token == "refresh-me" and not tok.username
    plain = credentials.load("plain.example", path)  # the store has nothing: auths answers
    assert plain is not None and plain.username == "carol"
    with pytest.raises(Exception, match="keychain locked"):
        credentials.load("broken.example", path)
    with pytest.raises(Exception, match="docker-credential-nosuch.*not installed"):
        credentials.load("gone.example", path)


def test_where_credentials_were_not_found_is_said(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _helper(tmp_path, "lamnone", 'echo "credentials not found in native keychain"; exit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    missing = tmp_path / "nope.json"
    assert credentials.find("r.example", missing).missing == f"no credentials for r.example: {missing} does not exist"
    path = _config(tmp_path, {"credsStore": "lamnone"})
    found = credentials.find("r.example", path)
    assert found.credentials is None
    assert found.missing == (f"no credentials for r.example: credential helper docker-credential-lamnone "
                             f"(credsStore in {path}) has none, and {path} has no auths entry for it")
    path = _config(tmp_path, {"credHelpers": {"r.example": "lamnone"}})
    assert "docker-credential-lamnone (credHelpers in" in credentials.find("r.example", path).missing


def test_error_lines_name_the_reference_once() -> None:
    from lamina.registry.reference import error_line

    ref = parse("127.0.0.1:5000/t/app:1")
    assert error_line(ref, "127.0.0.1:5000/t/app: layer 1: bad") == "127.0.0.1:5000/t/app:1: layer 1: bad"
    assert error_line(ref, "127.0.0.1:5000: cannot connect") == "127.0.0.1:5000/t/app:1: cannot connect"
    assert error_line(ref, "t/app: blob x not found") == "127.0.0.1:5000/t/app:1: blob x not found"
    assert error_line(ref, "127.0.0.1:5000/t/app:1: as is") == "127.0.0.1:5000/t/app:1: as is"


def test_retry_after_values() -> None:
    import email.utils
    import time

    from lamina.registry.transport import _retry_after

    assert _retry_after("2") == 2.0 and _retry_after("-5") == 0.0 and _retry_after("soon") is None
    assert _retry_after(None) is None
    ahead = _retry_after(email.utils.formatdate(time.time() + 100, usegmt=True))
    assert ahead is not None and 98 <= ahead <= 100
    assert _retry_after(email.utils.formatdate(time.time() - 100, usegmt=True)) == 0.0


def _index(*platforms: tuple[str, str, str | None]) -> dict[str, object]:
    out = []
    for i, (os_name, arch, variant) in enumerate(platforms):
        plat: dict[str, str] = {"os": os_name, "architecture": arch}
        if variant:
            plat["variant"] = variant
        out.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "sha256:" + f"{i:02x}" * 32, "size": 10, "platform": plat})
    return {"manifests": out}


def test_platform_choice() -> None:
    idx = _index(("unknown", "unknown", None), ("linux", "arm", "v6"), ("linux", "arm", "v7"),
                 ("linux", "arm64", "v8"), ("linux", "amd64", None), ("windows", "amd64", None))
    assert choose(idx, Platform.parse("linux/amd64"), "t").digest.startswith("sha256:04")
    assert choose(idx, Platform.parse("linux/arm64"), "t").digest.startswith("sha256:03")
    assert choose(idx, Platform.parse("linux/aarch64/v8"), "t").digest.startswith("sha256:03")
    assert choose(idx, Platform.parse("linux/arm"), "t").digest.startswith("sha256:02")  # v7 default
    assert choose(idx, Platform.parse("linux/arm/v6"), "t").digest.startswith("sha256:01")
    assert choose(idx, Platform.host("windowsfilter"), "t").digest.startswith("sha256:05")
    with pytest.raises(RegistryError, match=r"no manifest for platform linux/s390x .*linux/amd64"):
        choose(idx, Platform.parse("linux/s390x"), "t")
    with pytest.raises(Exception, match="invalid platform"):
        Platform.parse("linux")


def test_progress_block_one_line_per_layer_and_a_total() -> None:
    import io

    from lamina.progress import MultiProgress

    t = [0.0]
    out = io.StringIO()
    bars = MultiProgress("pulling", stream=out, enabled=True, width=10, clock=lambda: t[0])
    bars.add("a", "aaaa 1/2", 1000)
    bars.add("b", "bbbb 2/2", 3000, "exists")
    t[0] = 2.0
    bars.state("a", "downloading")
    bars.update("a", 500)
    lines = bars.render()
    assert lines[0].startswith("aaaa 1/2 downloading") and "[#####.....] 500 B/1000 B" in lines[0]
    assert lines[1].startswith("bbbb 2/2 exists")
    assert lines[2] == "pulling: [#####.....] 500 B/1000 B 250 B/s"  # exists: not in the total
    bars.close()
    assert "\x1b[F" in out.getvalue()  # redrawn in place
    quiet = io.StringIO()
    with MultiProgress("x", stream=quiet) as b:  # not a terminal: draws nothing
        b.add("a", "a", 1)
    assert quiet.getvalue() == ""


def test_plain_http_only_for_loopback_or_insecure() -> None:
    from lamina.registry.credentials import Credentials
    from lamina.registry.transport import ClientOptions, RegistryClient

    def plain(host: str, insecure: bool = False) -> bool:
        opts = ClientOptions(insecure=insecure, credentials=Credentials("u", "p"))
        return RegistryClient(host, options=opts).plain_ok

    assert plain("127.0.0.1:5000") and plain("localhost:5000") and plain("[::1]:5000")
    assert not plain("registry.example:5000") and not plain("10.1.2.3")
    assert plain("registry.example:5000", insecure=True)
