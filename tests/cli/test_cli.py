"""The trio-vhost command line, run as a user runs it (a separate process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trio_vhost.cli import CliError, parse_size

CLI = [sys.executable, "-m", "trio_vhost.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("blk", "net", "selfcheck"):
        assert command in out.stdout
    for command in ("blk", "net", "selfcheck"):
        assert run(command, "--help").returncode == 0


@pytest.mark.parametrize(
    ("text", "size"), [("4096", 4096), ("128M", 128 << 20), ("1G", 1 << 30), ("2KiB", 2048)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "12X", "-5", "100", "0", "1.5G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(CliError):
        parse_size(text)


def test_selfcheck_passes() -> None:
    out = run("-q", "selfcheck")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "selfcheck passed" in out.stdout


def test_missing_image_is_one_line_error(tmp_path: Path) -> None:
    out = run("blk", "--socket", str(tmp_path / "s"), "--image", str(tmp_path / "nope.img"))
    assert out.returncode == 1
    assert out.stderr.strip().startswith("trio-vhost: error: cannot open image")
    assert len(out.stderr.strip().splitlines()) == 1


def test_bad_size_is_one_line_error(tmp_path: Path) -> None:
    out = run("blk", "--socket", str(tmp_path / "s"), "--image", str(tmp_path / "x.img"),
              "--create", "12Q")  # fmt: skip
    assert out.returncode == 1
    assert "bad size" in out.stderr


@pytest.mark.parametrize("ifname", ["x" * 40, "bad/name"])
def test_bad_tap_is_one_line_error(tmp_path: Path, ifname: str) -> None:
    out = run("net", "--socket", str(tmp_path / "s"), "--tap", ifname)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("trio-vhost: error: cannot open tap")


def test_socket_in_use_by_a_live_server(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(str(path))
    holder.listen()
    try:
        out = run("net", "--socket", str(path))
    finally:
        holder.close()
    assert out.returncode == 1
    assert "already in use" in out.stderr


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "backend did not start listening"
        time.sleep(0.05)  # polling another process's socket file, not synchronising ours


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(tmp_path: Path, signum: int) -> None:
    sock, image = tmp_path / "blk.sock", tmp_path / "disk.img"
    proc = subprocess.Popen(
        [*CLI, "blk", "--socket", str(sock), "--image", str(image), "--create", "1M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(sock, proc)
        assert os.path.getsize(image) == 1 << 20
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert not sock.exists(), "socket file left behind"
    assert "shutting down" in err
