"""`srcsm web`'s command line: loopback by default, other interfaces only when asked; trame stays lazy."""

from __future__ import annotations

import subprocess
import sys

import pytest
from SRCSMSegmenterLib.cli import main
from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.web.server import check_host, is_loopback


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("10.0.0.1", False),
    ("no-such-host.invalid", False),
])
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_other_interfaces_need_allow_remote():
    with pytest.raises(InputError, match="--allow-remote"):
        check_host("0.0.0.0", allow_remote=False)
    check_host("0.0.0.0", allow_remote=True)  # explicitly allowed: no error


@pytest.mark.parametrize("argv, message", [
    (["web", "--host", "0.0.0.0"], "Refusing to listen on '0.0.0.0'"),
    (["web", "--host", "192.168.1.20", "--port", "8099"], "--allow-remote"),
    (["web", "--port", "70000"], "is not a TCP port"),
    (["web", "--data", "/no/such/folder"], "does not exist"),
    (["web", "--max-upload-mb", "0"], "must be positive"),
])
def test_refusals_exit_2_with_the_fix(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_core_and_cli_import_without_trame():
    """`srcsm` (and the web package's plain modules) must not need the web extra."""
    code = ("import sys, SRCSMSegmenterLib.cli, SRCSMSegmenterLib.web.datafolder, SRCSMSegmenterLib.web.server, "
            "SRCSMSegmenterLib.web.charts; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('trame', 'trame_slicer', 'trame_server', 'wslink')]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
