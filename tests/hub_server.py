"""A stand-in for the Hugging Face hub on 127.0.0.1: serves files of fake
repos with the headers huggingface_hub reads, and the tree listing API."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, repos):
        """repos: {"owner/name": {"file.gguf": bytes}}"""
        self.repos = repos
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _file(self):
                # /{owner}/{name}/resolve/{revision}/{path}
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None, None
                repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                return filename, hub.repos.get(repo, {}).get(filename)

            def _headers(self, data):
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                _, data = self._file()
                if data is None:
                    self.send_error(404)
                    return
                self._headers(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                path = self.path.split("?")[0]
                if path.startswith("/api/models/") and "/tree/" in path:
                    repo = path[len("/api/models/"):].split("/tree/")[0]
                    files = hub.repos.get(repo)
                    if files is None:
                        self.send_error(404)
                        return
                    body = json.dumps([{"type": "file", "path": f, "size": len(d), "oid": COMMIT}
                                       for f, d in files.items()]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                _, data = self._file()
                if data is None:
                    self.send_error(404)
                    return
                self._headers(data)
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
