"""The tests run with the network disabled: nothing they run can download weights, datasets or models."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import NetworkDisabled


def test_a_connection_out_of_this_machine_is_refused_in_the_test_process() -> None:
    import socket

    with pytest.raises(NetworkDisabled, match=r"network disabled in tests: connect to \('93\.184\.215\.14', 80\)"):
        socket.create_connection(("93.184.215.14", 80), timeout=5)
    server = socket.socket()  # this machine stays reachable (W&B's offline service, DDP's rendezvous)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=5):
        pass
    server.close()


def test_a_download_in_a_subprocess_fails_without_leaving_the_machine() -> None:
    """urllib (as torch.hub downloads) in a child process goes to the dead local proxy the environment names:
    refused at once, not a DNS failure or a timeout on the way out."""
    code = ("import urllib.request\n"
            "try:\n    urllib.request.urlopen('https://download.pytorch.org/models/resnet18-f37072fd.pth', timeout=10)\n"
            "except OSError as exc:\n    print('refused', type(exc).__name__, type(getattr(exc, 'reason', None)).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["refused", "URLError", "ConnectionRefusedError"], proc.stdout + proc.stderr
    with pytest.raises((urllib.error.URLError, NetworkDisabled)):
        urllib.request.urlopen("https://download.pytorch.org/models/resnet18-f37072fd.pth", timeout=10)
