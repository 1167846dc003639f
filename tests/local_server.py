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
    url = f"http://127.0.0.1:{port}"
    # the first run may fetch the models
    proc = launch([sys.executable, "-m", "pyspec_gguf", *args, "--port", str(port)], url + "/health", 600,
                  "the server")
    return proc, url


def launch(cmd: list, ready_url: str, seconds: float, name: str) -> subprocess.Popen:
    """`cmd` in its own process, run from the temporary folder; the process
    once `ready_url` answers (an HTTP error counts: the server is up, and
    asking for its key)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tempfile.gettempdir())
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                return proc
        except urllib.error.HTTPError:
            return proc
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{name} did not start in {seconds} s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the server did not stop within 20 s of SIGTERM")
