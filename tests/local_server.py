"""`pyspec-gguf serve` in a process of its own, for the tests that talk to it."""

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list, port: int = 0):
    """`pyspec-gguf <args>` (a serve command) in its own process, outside the
    source tree so that it runs the installed package; (process, base URL)
    once it answers."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "pyspec_gguf", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tempfile.gettempdir())
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # the first run may fetch the models
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except urllib.error.HTTPError:  # up, and asking for its key
            return proc, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start in 600 s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the server did not stop within 20 s of SIGTERM")
