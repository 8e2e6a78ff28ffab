"""A stand-in Hugging Face Hub on 127.0.0.1: the endpoints `huggingface_hub.snapshot_download`
and `HfApi.model_info` call, reached through HF_ENDPOINT, with every request recorded.

    GET  /api/models/{org}/{name}/revision/{rev}       the commit a branch, tag or sha names
    GET  /api/models/{org}/{name}/tree/{sha}?recursive  the files of a commit
    HEAD /{org}/{name}/resolve/{rev}/{path}             a file's commit, etag and size
    GET  /{org}/{name}/resolve/{rev}/{path}             the file

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo),
which `huggingface_hub` turns into its typed errors. A gated repo answers only a request that
carries a token (any token: access is not what is tested).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Repo:
    """A model repo: commits (sha -> {path: bytes}) and refs (branch or tag -> sha)."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}
        self.gated = False

    def commit(self, folder: Path, ref: str = "main", change: bytes = b"") -> str:
        """Commit the files of `folder` (plus `change` appended to config.json, to make two
        commits differ) and point `ref` at it; the new sha."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        if change:
            files["README.md"] = change
        sha = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
        self.commits[sha] = files
        self.refs[ref] = sha
        return sha

    def sha(self, rev: str) -> str | None:
        return rev if rev in self.commits else self.refs.get(rev)


class StandInHub:
    """`with StandInHub() as hub:` serves `hub.repos` at `hub.endpoint`; `hub.requests` lists
    (method, path) of every request."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    def _commit(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str) -> str | None:
        """The sha `rev` names in `repo_id`, or None with the Hub's 404 answered."""
        repo = self.repos.get(repo_id)
        if repo is None:
            _error(h, 404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if repo.gated and not h.headers.get("Authorization"):
            _error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                   "and be authenticated to access it.")
            return None
        sha = repo.sha(rev)
        if sha is None:
            _error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, what, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            sha = self._commit(h, repo_id, rev)
            if sha is None:
                return None
            files = self.repos[repo_id].commits[sha]
            if what == "revision":
                info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                        "siblings": [{"rfilename": f} for f in files]}
                return _json(h, info, body, sha)
            return _json(h, [{"type": "file", "oid": _oid(data), "size": len(data), "path": f}
                             for f, data in files.items()], body, sha)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            sha = self._commit(h, repo_id, rev)
            if sha is None:
                return None
            data = self.repos[repo_id].commits[sha].get(file)
            if data is None:
                return _error(h, 404, "EntryNotFound", f"{file} not found")
            h.send_response(200)
            h.send_header("X-Repo-Commit", sha)
            h.send_header("ETag", f'"{_oid(data)}"')
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Content-Type", "application/octet-stream")
            h.end_headers()
            if body:
                h.wfile.write(data)
            return None
        return _error(h, 404, None, "not found")


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def _json(h: BaseHTTPRequestHandler, obj, body: bool, sha: str) -> None:
    raw = json.dumps(obj).encode()
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(raw)))
    h.send_header("X-Repo-Commit", sha)
    h.end_headers()
    if body:
        h.wfile.write(raw)


def _error(h: BaseHTTPRequestHandler, status: int, code: str | None, message: str) -> None:
    raw = json.dumps({"error": message}).encode()
    h.send_response(status)
    if code:
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(raw)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(raw)
