"""An OpenAI-compatible server that compresses long prompts
(`pip install "pyspec-gguf[server]"`, then `pyspec-gguf serve`).

    workers.py   requests queued for worker threads with their prefix caches
    jobs.py      what a worker does: answer, or compress a prompt
    protocol.py  the OpenAI wire format, checked requests, error bodies
    upstream.py  another OpenAI-compatible engine that answers (serve --upstream)
    app.py       the HTTP endpoints
"""

from .app import create_app
from .jobs import Policy
from .upstream import Upstream
from .workers import WorkerPool

__all__ = ["Policy", "Upstream", "WorkerPool", "create_app"]
