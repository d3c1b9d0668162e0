"""The ``lamina`` command, run as a user runs it: one process per command.

Each verb is checked for its text output, its ``--json`` output, and its exit status;
every kind of user mistake must give exactly one ``lamina: ...`` line naming the culprit
and exit 1, with a stack trace only under ``--debug``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pty
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, require_module, require_overlay, run_cli
from lamina.fs.mount import is_mountpoint


def make_tar(files: dict[str, bytes | None]) -> bytes:
    """A layer tar: ``name -> content`` for files, ``None`` for a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BASE = {"etc": None, "etc/hostname": b"base\n", "a.txt": b"alpha\n", "b.txt": b"bravo\n"}


class Cli:
    """``lamina --root R --driver D ...`` with helpers for the common expectations."""

    def __init__(self, root: Path, driver: str = "vfs") -> None:
        self.root = root
        self.driver = driver

    def __call__(self, *args: str, input: bytes | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return run_cli("--driver", self.driver, *args, root=self.root, input=input, env=env)

    def ok(self, *args: str, input: bytes | None = None) -> str:
        r = self(*args, input=input)
        assert r.returncode == 0, f"lamina {' '.join(args)}: rc={r.returncode} {r.stderr.decode()}"
        return r.stdout.decode()

    def json(self, *args: str, input: bytes | None = None) -> object:
        return json.loads(self.ok("--json", *args, input=input))

    def fails(self, *args: str, input: bytes | None = None, rc: int = 1) -> str:
        """Run a command that must fail with one error line; return that line."""
        r = self(*args, input=input)
        err = r.stderr.decode()
        assert r.returncode == rc, f"lamina {' '.join(args)}: rc={r.returncode} {err}"
        assert err.count("\n") == 1 and err.startswith("lamina: "), err
        assert "Traceback" not in err
        return err.strip()


@pytest.fixture
def cli(tmp_root: Path) -> Cli:
    return Cli(tmp_root)


@pytest.fixture
def base_tar(tmp_path: Path) -> Path:
    p = tmp_path / "base.tar"
    p.write_bytes(make_tar(BASE))
    return p


# -- layer lifecycle ------------------------------------------------------------------


def test_create_ls_exists_rm(cli: Cli) -> None:
    assert cli.ok("create", "base").strip() == "base"
    assert cli.ok("create-rw", "ctr", "--parent", "base").strip() == "ctr"

    lines = cli.ok("ls").splitlines()
    assert lines[0].split() == ["ID", "PARENT", "KIND", "SIZE", "MOUNTS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["base"][1:3] == ["-", "ro"]
    assert rows["ctr"][1:3] == ["base", "rw"]
    assert rows["ctr"][-1] == "0"

    listed = cli.json("ls")
    assert {r["id"]: (r["parent"], r["kind"]) for r in listed} == {
        "base": (None, "ro"), "ctr": ("base", "rw")}

    r = cli("exists", "base")
    assert (r.returncode, r.stdout) == (0, b"true\n")
    r = cli("exists", "nope")
    assert (r.returncode, r.stdout) == (1, b"false\n")
    assert cli("--json", "exists", "nope").returncode == 1
    assert cli.json("exists", "base") == {"id": "base", "exists": True}

    assert cli.ok("rm", "ctr", "base").split() == ["ctr", "base"]
    assert cli("exists", "base").returncode == 1
    assert cli.ok("ls") == ""
    assert cli.json("ls") == []


def test_rm_reports_each_failure_and_goes_on(cli: Cli) -> None:
    cli.ok("create", "base")
    cli.ok("create", "child", "--parent", "base")
    cli.ok("create", "lone")
    r = cli("--json", "rm", "base", "nope", "lone")
    assert r.returncode == 1
    errs = r.stderr.decode().splitlines()
    assert len(errs) == 2 and all(e.startswith("lamina: ") for e in errs)
    assert "base" in errs[0] and "children" in errs[0]
    assert "nope" in errs[1]
    out = json.loads(r.stdout)
    assert out["removed"] == ["lone"]
    assert [f["id"] for f in out["failed"]] == ["base", "nope"]
    assert out["failed"][0]["kind"] == "LayerHasChildren"


# -- tars in and out --------------------------------------------------------------------


def test_apply_from_file_and_stdin(cli: Cli, base_tar: Path) -> None:
    content = sum(len(v) for v in BASE.values() if v is not None)
    assert cli.ok("apply", "base", str(base_tar)).strip() == str(content)
    top = make_tar({"c.txt": b"charlie!\n"})
    assert cli.json("apply", "top", "--parent", "base", "-", input=top) == {
        "id": "top", "parent": "base", "size": 9}
    assert cli.json("ls")[1]["parent"] == "base"
    with cli_mounted(cli, "top") as view:
        assert (view / "c.txt").read_bytes() == b"charlie!\n"
        assert (view / "etc/hostname").read_bytes() == b"base\n"


def test_apply_gzip_is_unpacked(cli: Cli) -> None:
    tar = make_tar({"z.txt": b"zipped\n"})
    assert cli.ok("apply", "z", "-", input=gzip.compress(tar)).strip() == "7"
    # the diff of an imported layer is the uncompressed tar it came from
    assert cli("diff", "z").stdout == tar


def test_apply_zstd_is_unpacked(cli: Cli, tmp_path: Path) -> None:
    zstandard = require_module("zstandard")
    tar = make_tar({"zz.txt": b"zstd\n"})
    p = tmp_path / "layer.tar.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(tar))
    assert cli.ok("apply", "zz", str(p)).strip() == "5"
    assert cli("diff", "zz").stdout == tar


def test_diff_to_stdout_and_file(cli: Cli, base_tar: Path, tmp_path: Path) -> None:
    cli.ok("apply", "base", str(base_tar))
    r = cli("diff", "base")
    assert r.returncode == 0, r.stderr
    assert r.stdout == base_tar.read_bytes()  # tar-split: byte for byte

    out = tmp_path / "out" / "base-diff.tar"
    out.parent.mkdir()
    line = cli.ok("diff", "base", "-o", str(out)).split()
    data = out.read_bytes()
    assert data == base_tar.read_bytes()
    assert line == [f"sha256:{hashlib.sha256(data).hexdigest()}", str(len(data)), str(out)]
    assert os.listdir(out.parent) == ["base-diff.tar"]  # no temp file left behind

    info = cli.json("diff", "base", "-o", str(out))
    assert info == {"id": "base", "file": str(out), "size": len(data),
                    "digest": f"sha256:{hashlib.sha256(data).hexdigest()}"}
    # stdout carries the tar, so --json without -o is refused rather than mixed in
    assert "needs -o" in cli.fails("--json", "diff", "base")


def test_diff_refuses_a_terminal(cli: Cli, base_tar: Path) -> None:
    cli.ok("apply", "base", str(base_tar))
    rc, out, err = run_on_tty(cli, "diff", "base")
    assert rc == 1
    assert b"refusing to write a tar to a terminal" in err
    assert b"ustar" not in out


def test_apply_refuses_a_terminal_on_stdin(cli: Cli) -> None:
    rc, _, err = run_on_tty(cli, "apply", "x", "-", tty_stdin=True)
    assert rc == 1 and b"refusing to read a tar from a terminal" in err
    assert cli("exists", "x").returncode == 1


# -- a container's changes -----------------------------------------------------------------


def test_changes_and_diff_size(cli: Cli, base_tar: Path) -> None:
    cli.ok("apply", "base", str(base_tar))
    cli.ok("create-rw", "ctr", "--parent", "base")
    view = Path(cli.ok("mount", "ctr").strip())
    try:
        (view / "a.txt").write_bytes(b"alpha, changed\n")
        (view / "b.txt").unlink()
        (view / "c.txt").write_bytes(b"new\n")
    finally:
        cli.ok("umount", "ctr")
    assert cli.ok("changes", "ctr").splitlines() == ["C /a.txt", "D /b.txt", "A /c.txt"]
    assert cli.json("changes", "ctr") == [
        {"Path": "/a.txt", "Kind": 0}, {"Path": "/b.txt", "Kind": 2}, {"Path": "/c.txt", "Kind": 1}]
    assert cli.ok("diff-size", "ctr").strip() == str(len(b"alpha, changed\n") + len(b"new\n"))
    assert cli.json("diff-size", "ctr") == {"id": "ctr", "size": 19}

    # against nothing, every path of the view is an addition
    whole = cli.ok("changes", "ctr", "--parent", "").splitlines()
    assert "A /etc/hostname" in whole and "A /c.txt" in whole

    # the exported diff carries the deletion as a whiteout
    names = tarfile.open(fileobj=io.BytesIO(cli("diff", "ctr").stdout)).getnames()
    assert sorted(names) == [".wh.b.txt", "a.txt", "c.txt"]


# -- mounts across processes ------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_mount_in_one_process_umount_in_another(tmp_root: Path, base_tar: Path, driver: str) -> None:
    if driver == "overlay":
        require_overlay()
    cli = Cli(tmp_root, driver)
    cli.ok("apply", "base", str(base_tar))
    cli.ok("create-rw", "ctr", "--parent", "base")
    first = cli.ok("mount", "ctr").strip()
    assert cli.json("mount", "ctr") == {"id": "ctr", "path": first}
    view = Path(first)
    assert (view / "a.txt").read_bytes() == b"alpha\n"
    if driver == "overlay":
        assert is_mountpoint(view)
    assert [r["mounts"] for r in cli.json("ls") if r["id"] == "ctr"] == [2]
    assert "mounted" in cli.fails("rm", "ctr")

    assert cli.ok("umount", "ctr") == ""
    assert cli.json("umount", "ctr") == {"id": "ctr", "mounts": 0}
    if driver == "overlay":
        assert not is_mountpoint(view)
    assert "not mounted" in cli.fails("umount", "ctr")
    cli.ok("rm", "ctr")


# -- information ---------------------------------------------------------------------------


def test_info(cli: Cli) -> None:
    text = cli.ok("info")
    assert "Driver: vfs" in text
    assert f"Root: {cli.root}" in text
    assert "Backing Filesystem: " in text
    assert "  vfs: in use" in text
    assert "  overlay: " in text and "  windowsfilter: " in text

    info = cli.json("info")
    assert info["driver"] == "vfs" and info["root"] == str(cli.root)
    assert info["layers"] == 0
    assert info["drivers"]["vfs"] == {"in_use": True, "available": True, "reason": None}
    for name, d in info["drivers"].items():
        assert d["available"] == (d["reason"] is None), name


def test_info_names_the_backing_filesystem_alike_for_every_driver(tmp_path: Path) -> None:
    """Issue 16: one spelling, statfs's as Docker shows it ("extfs" for ext4, as
    ``docker info`` says for overlay2), whatever the driver; it was "ext4" for vfs and
    windowsfilter and "extfs" for overlay on the same filesystem."""
    from lamina.drivers.registry import unavailable_reason
    from lamina.fs.backingfs import FS_NAMES, backing_fs, fs_magic

    want = backing_fs(tmp_path)
    assert want == FS_NAMES.get(fs_magic(tmp_path), want)
    seen = {}
    for driver in ("vfs", "overlay", "windowsfilter"):
        root = tmp_path / driver
        if unavailable_reason(driver, root):
            continue
        out = Cli(root, driver).json("info")
        assert isinstance(out, dict)
        seen[driver] = out["backing_filesystem"]
        assert f"Backing Filesystem: {want}\n" in Cli(root, driver).ok("info")
    assert "vfs" in seen
    assert set(seen.values()) == {want}, seen


def test_metadata(cli: Cli) -> None:
    cli.ok("create", "base")
    meta = cli.json("metadata", "base")
    assert isinstance(meta, dict) and meta
    text = cli.ok("metadata", "base").splitlines()
    assert text == [f"{k}: {v}" for k, v in sorted(meta.items())]


def test_cleanup_prints_what_it_mended(cli: Cli) -> None:
    cli.ok("info")  # makes the store
    (cli.root / "tmp" / "junk~creating").mkdir()
    lines = cli.ok("cleanup").splitlines()
    assert any("junk~creating" in line for line in lines), lines
    assert cli.json("cleanup") == {"mended": []}


def test_check_reports_damage(cli: Cli, base_tar: Path) -> None:
    cli.ok("apply", "base", str(base_tar))
    assert cli.ok("check") == "ok\n"
    assert cli.json("check") == {"problems": [], "repaired": [], "ok": True}
    (cli.root / "layers" / "base" / "a.txt").write_bytes(b"ALPHA\n")  # same size
    r = cli("--json", "check")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    assert [p["layer"] for p in report["problems"]] == ["base"]
    assert cli("check", "--fast").returncode == 0  # content is not hashed
    (cli.root / "layers" / "base" / "a.txt").write_bytes(b"tampered\n")
    r = cli("check", "--fast")  # but sizes are compared with the tar's headers (issue 16)
    assert (r.returncode, r.stdout) == (1, b"problem: layer base: /a.txt: size 9, its tar says 6 (not repairable)\n")


# -- errors ------------------------------------------------------------------------------


def test_missing_parent(cli: Cli) -> None:
    line = cli.fails("create", "x", "--parent", "ghost")
    assert "ghost" in line
    assert cli("exists", "x").returncode == 1


def test_duplicate_id(cli: Cli) -> None:
    cli.ok("create", "dup")
    assert "dup" in cli.fails("create", "dup")
    assert "dup" in cli.fails("create-rw", "dup")


@pytest.mark.parametrize("bad", ["../escape", "-rf", "a/b", ".hidden", "x" * 129])
def test_bad_id(cli: Cli, bad: str) -> None:
    line = cli.fails("create", "--", bad) if bad.startswith("-") else cli.fails("create", bad)
    assert "invalid layer ID" in line
    assert not (cli.root / "layers" / bad).exists()


@pytest.mark.parametrize("verb", ["mount", "diff", "changes", "diff-size", "metadata", "rm", "umount"])
def test_unknown_layer(cli: Cli, verb: str) -> None:
    assert "ghost" in cli.fails(verb, "ghost")


def test_bad_tar(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar at all" * 100)
    cli.fails("apply", "x", str(junk))
    assert cli("exists", "x").returncode == 1
    # a hostile entry is named in the one line
    evil = make_tar({"../../evil.txt": b"x"})
    assert "evil.txt" in cli.fails("apply", "y", "-", input=evil)
    assert not (cli.root.parent / "evil.txt").exists()
    assert "cannot read" in cli.fails("apply", "z", str(tmp_path / "absent.tar"))
    truncated = gzip.compress(make_tar({"t.txt": b"t" * 5000}))[:-40]
    assert "stdin: damaged gzip data" in cli.fails("apply", "t", "-", input=truncated)
    assert cli("exists", "t").returncode == 1


def test_quota_refused_by_vfs(cli: Cli) -> None:
    cli.ok("create", "base")
    assert "ctr" in cli.fails("create-rw", "ctr", "--parent", "base", "--size", "20M")
    assert "invalid size" in cli.fails("create-rw", "ctr", "--size", "lots")


def test_json_error_object_and_debug_trace(cli: Cli) -> None:
    r = cli("--json", "mount", "ghost")
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["kind"] == "LayerNotFound"
    r = cli("--debug", "mount", "ghost")
    assert r.returncode == 1
    assert b"Traceback" in r.stderr and r.stderr.rstrip().splitlines()[-1].startswith(b"lamina: ")


def test_bad_driver_option(cli: Cli) -> None:
    assert "KEY=VALUE" in cli.fails("--opt", "novalue", "ls")


# -- global options ------------------------------------------------------------------------


def test_global_options_after_the_verb_and_from_env(tmp_root: Path) -> None:
    r = run_cli("ls", "--json", "--root", str(tmp_root), "--driver", "vfs")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = run_cli("create", "e", env={"LAMINA_ROOT": str(tmp_root), "LAMINA_DRIVER": "vfs"})
    assert r.returncode == 0, r.stderr
    assert json.loads(run_cli("--json", "ls", root=tmp_root).stdout)[0]["id"] == "e"
    # the store remembers its driver; asking for another is a one-line refusal
    r = run_cli("--driver", "windowsfilter", "ls", root=tmp_root)
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"vfs" in r.stderr


def test_usage_errors_exit_2() -> None:
    r = run_cli()
    assert r.returncode == 2 and b"usage:" in r.stderr
    r = run_cli("frobnicate")
    assert r.returncode == 2


def test_extension_modules_add_verbs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    from lamina import cli

    (tmp_path / "lamina_test_ext.py").write_text(
        "def hello(inv):\n"
        "    inv.emit({'hello': inv.args.who}, f'hello {inv.args.who}')\n"
        "    return 3\n"
        "def register(sub):\n"
        "    p = sub.add_parser('hello')\n"
        "    p.add_argument('who')\n"
        "    p.set_defaults(func=hello)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "EXTENSIONS", ["lamina_test_ext"])
    assert cli.main(["hello", "world"]) == 3
    assert capsysbinary.readouterr().out == b"hello world\n"
    assert cli.main(["hello", "world", "--json"]) == 3
    assert json.loads(capsysbinary.readouterr().out) == {"hello": "world"}


# -- helpers ---------------------------------------------------------------------------------


class cli_mounted:
    """Mount through the CLI for the length of a ``with`` block."""

    def __init__(self, cli: Cli, layer_id: str) -> None:
        self.cli, self.layer_id = cli, layer_id

    def __enter__(self) -> Path:
        return Path(self.cli.ok("mount", self.layer_id).strip())

    def __exit__(self, *exc: object) -> None:
        self.cli.ok("umount", self.layer_id)


def run_on_tty(cli: Cli, *args: str, tty_stdin: bool = False) -> tuple[int, bytes, bytes]:
    """Run the CLI with stdout (or stdin) on a pseudo-terminal; return rc, tty output, stderr."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "lamina", "--root", str(cli.root), "--driver", cli.driver, *args]
    try:
        p = subprocess.run(cmd, stdin=slave if tty_stdin else subprocess.DEVNULL,
                           stdout=subprocess.PIPE if tty_stdin else slave,
                           stderr=subprocess.PIPE, env=env, timeout=60)
    finally:
        os.close(slave)
    out = b""
    os.set_blocking(master, False)
    try:
        while chunk := os.read(master, 65536):
            out += chunk
    except (BlockingIOError, OSError):
        pass
    os.close(master)
    return p.returncode, out if not tty_stdin else p.stdout, p.stderr


def test_driver_options_before_and_after_the_verb() -> None:
    from lamina.cli import Invocation, build_parser

    args = build_parser().parse_args(["--opt", "a=1", "--opt", "b=x=y", "info", "--opt", "a=2"])
    assert Invocation(args).driver_options() == {"a": "2", "b": "x=y"}
