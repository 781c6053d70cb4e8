"""A small stand-in for the Hugging Face Hub's HTTP API, bound to 127.0.0.1, serving the
routes that huggingface_hub's create_repo, upload_folder, snapshot_download and
hf_hub_download use (model repos, regular uploads). The real client talks to it through
HF_ENDPOINT, so push and pull are tested end to end without network. Repos live in
memory as a list of commits; each commit is a full snapshot {path: bytes}."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def _blob_sha(data: bytes) -> str:
    """git's blob id: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}   # repo_id -> {"private": bool, "commits": [(sha, files)]}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, code, data=b"", headers=None, head=False):
                if isinstance(data, (dict, list)):
                    data = json.dumps(data).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _missing(self, head=False):
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)

            def do_POST(self):
                path = urlparse(self.path).path
                hub.requests.append(("POST", path))
                body = self._body()
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    with hub.lock:
                        if repo in hub.repos:
                            return self._send(409, {"error": "You already created this model repo", "url": hub.url(repo)})
                        hub.repos[repo] = {"private": bool(req.get("private")), "commits": [(hub._sha(repo, {}), {})]}
                    return self._send(200, {"url": hub.url(repo)})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
                if not m or m.group(1) not in hub.repos:
                    return self._missing()
                repo, kind = m.group(1), m.group(2)
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                with hub.lock:
                    files = dict(hub.repos[repo]["commits"][-1][1])
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        op = json.loads(line)
                        if op["key"] == "file":
                            files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                        elif op["key"] == "deletedFile":
                            files.pop(op["value"]["path"], None)
                    sha = hub._sha(repo, files)
                    hub.repos[repo]["commits"].append((sha, files))
                return self._send(200, {"commitUrl": f"{hub.url(repo)}/commit/{sha}", "commitOid": sha,
                                        "pullRequestUrl": None})

            ROUTES = (  # (pattern, what it serves); each pattern's groups 1 and 2: repo and revision
                (r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", "info"),
                (r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", "tree"),
                (r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", "file"),
            )

            def _get(self, head):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(("HEAD" if head else "GET", path))
                for pattern, kind in self.ROUTES:
                    m = re.fullmatch(pattern, path)
                    if m:
                        break
                else:
                    return self._missing(head)
                found = hub.commit(m.group(1), m.group(2))
                if not found:
                    return self._missing(head)
                sha, files = found
                if kind == "info":
                    return self._send(200, {"id": m.group(1), "modelId": m.group(1), "sha": sha, "private": False,
                                            "siblings": [{"rfilename": p} for p in sorted(files)]}, head=head)
                if kind == "tree":
                    prefix = (m.group(3) or "").strip("/")
                    return self._send(200, [{"type": "file", "path": p, "size": len(d), "oid": _blob_sha(d)}
                                            for p, d in sorted(files.items())
                                            if not prefix or p.startswith(prefix + "/")], head=head)
                if m.group(3) not in files:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head)
                data = files[m.group(3)]
                return self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{_blob_sha(data)}"',
                                              "Content-Type": "application/octet-stream"}, head)

            def do_GET(self):
                self._get(False)

            def do_HEAD(self):
                self._get(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, repo: str) -> str:
        return f"{self.endpoint}/{repo}"

    @staticmethod
    def _sha(repo: str, files: dict) -> str:
        h = hashlib.sha1(repo.encode())
        for p in sorted(files):
            h.update(p.encode() + b"\0" + files[p])
        return h.hexdigest()

    def commit(self, repo: str, revision: str):
        r = self.repos.get(repo)
        if r is None:
            return None
        if revision == "main":
            return r["commits"][-1]
        return next((c for c in r["commits"] if c[0] == revision), None)

    def tamper(self, repo: str, path: str, data: bytes) -> None:
        """Change a file in the newest commit without a new commit (what a compromised
        mirror or a man in the middle would serve)."""
        sha, files = self.repos[repo]["commits"][-1]
        files[path] = data

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
