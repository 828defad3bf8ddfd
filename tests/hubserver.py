"""A small Hugging Face Hub-compatible HTTP server for tests.

It answers the routes the real ``huggingface_hub`` client (2.x) calls to create a repo, commit
files (regular files inline in the NDJSON commit, large ones through the LFS batch API and a
PUT), tag a revision, list refs, read repo info and trees, and download files
(``hf_hub_download`` / ``snapshot_download``). Repos live in memory as git-like commit
snapshots: every commit maps paths to content. ``fail_next`` makes the next request to a route
answer HTTP 500 (fault injection); ``tamper`` rewrites one file in a new commit without
touching anything else (to test checksum verification).

Hostile repos, as no honest hub would serve them: ``put_files`` commits any file names the
client would refuse to upload (``../x/cfg.json``, ``/abs/cfg.json``) and any bytes, and
``serve_instead`` makes downloads of one file answer other bytes than the commit (and so the
tree listing, with its sizes and hashes) holds.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


class HubState:
    """What the server holds, shared by its handler threads."""

    def __init__(self, lfs_threshold: int = 4096):
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_threshold = lfs_threshold
        self.failures: dict[str, int] = {}
        self.before: dict[str, list] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.substitutes: dict[tuple[str, str], bytes] = {}
        self._counter = itertools.count()

    def fail_next(self, route: str, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``route`` (commit, preupload, lfs-batch,
        lfs-upload, tag, resolve, ...) with HTTP 500."""
        self.failures[route] = self.failures.get(route, 0) + times

    def before_next(self, route: str, action) -> None:
        """Run ``action()`` just before the server answers the next request to ``route`` (for
        example another client's commit landing between a read and a write)."""
        self.before.setdefault(route, []).append(action)

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, Blob],
                   branch: str = "main") -> str:
        sha = hashlib.sha1(json.dumps([parent, sorted((p, b.oid) for p, b in files.items()),
                                       next(self._counter)]).encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    def tamper(self, repo_id: str, path: str, data: bytes) -> str:
        """A new commit on main where ``path`` holds ``data`` (same storage kind)."""
        with self.lock:
            repo = self.repos[repo_id]
            head = repo.branches["main"]
            files = dict(repo.commits[head])
            files[path] = Blob(data, files[path].lfs)
            if files[path].lfs:
                self.lfs_objects[files[path].oid] = data
            return self.new_commit(repo, head, files)

    def put_files(self, repo_id: str, files: dict[str, bytes | None]) -> str:
        """A new commit on main (of a repo made here if missing) where each path of ``files``
        holds its bytes (``None``: deleted). Names are taken as given, unchecked; files named
        ``*.safetensors`` or of ``lfs_threshold`` bytes and more are stored as LFS files."""
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = Repo(private=False)
                self.new_commit(repo, None, {".gitattributes": Blob(GITATTRIBUTES, False)})
            head = repo.branches["main"]
            tree = dict(repo.commits[head])
            for path, data in files.items():
                if data is None:
                    tree.pop(path, None)
                    continue
                blob = Blob(data, path.endswith(".safetensors") or len(data) >= self.lfs_threshold)
                if blob.lfs:
                    self.lfs_objects[blob.oid] = data
                tree[path] = blob
            return self.new_commit(repo, head, tree)

    def serve_instead(self, repo_id: str, path: str, data: bytes) -> None:
        """Downloads of ``path`` (at any revision) answer ``data``; the commit, the tree listing
        and the download headers keep describing the committed file."""
        with self.lock:
            self.substitutes[(repo_id, path)] = data


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass the server makes

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _handle(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        body = self._body()
        st = self.state
        auth = self.headers.get("Authorization")
        if auth:
            st.auth_headers.append(auth)
        try:
            route, handler = self._route(parts)
            st.requests.append((self.command, route))
            with st.lock:
                if st.failures.get(route):
                    st.failures[route] -= 1
                    raise HubError(500, f"injected failure on {route}")
                action = st.before[route].pop(0) if st.before.get(route) else None
            if action is not None:
                action()
            handler(parts, query, body)
        except HubError as e:
            headers = {"X-Error-Code": e.code} if e.code else {}
            headers["X-Error-Message"] = e.message
            self._json(e.status, {"error": e.message}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def _route(self, p: list[str]):
        m = self.command
        if p[:3] == ["api", "repos", "create"] and m == "POST":
            return "create", self.create_repo
        if p[:2] == ["api", "validate-yaml"]:
            return "validate-yaml", lambda *a: self._json(200, {"errors": [], "warnings": []})
        if p[:2] == ["api", "models"] and len(p) >= 4:
            action = p[4] if len(p) > 4 else ""
            table = {("POST", "preupload"): self.preupload, ("POST", "commit"): self.commit,
                     ("POST", "tag"): self.tag, ("GET", "refs"): self.refs,
                     ("GET", "revision"): self.info, ("GET", ""): self.info,
                     ("GET", "tree"): self.tree, ("POST", "paths-info"): self.paths_info}
            if (m, action) in table:
                return action or "info", table[(m, action)]
        if len(p) == 6 and p[2] == "info" and p[1].endswith(".git") and p[5] == "batch":
            return "lfs-batch", self.lfs_batch
        if p[:1] == ["lfs-upload"] and m == "PUT":
            return "lfs-upload", self.lfs_upload
        if p[:1] == ["lfs-verify"] and m == "POST":
            return "lfs-verify", lambda *a: self._json(200, {})
        if len(p) >= 5 and p[2] == "resolve" and m in ("GET", "HEAD"):
            return "resolve", self.resolve
        raise HubError(404, f"no route for {m} /{'/'.join(p)}")

    # -- repos and refs ---------------------------------------------------------------------
    def _repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str) -> str:
        sha = repo.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def create_repo(self, _p, _q, body: bytes) -> None:
        data = json.loads(body)
        repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") \
            else data["name"]
        st = self.state
        with st.lock:
            if repo_id in st.repos:
                self._json(409, {"error": "You already created this model repo",
                                 "url": f"{self._base()}/{repo_id}"})
                return
            repo = Repo(private=bool(data.get("private"))
                        or data.get("visibility") in ("private", "protected"))
            st.repos[repo_id] = repo
            st.new_commit(repo, None, {".gitattributes": Blob(GITATTRIBUTES, False)})
        self._json(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id})

    def tag(self, p, _q, body: bytes) -> None:
        repo_id, rev = f"{p[2]}/{p[3]}", p[5]
        data = json.loads(body)
        with self.state.lock:
            repo = self._repo(repo_id)
            sha = self._commit(repo, rev)
            if data["tag"] in repo.tags:
                raise HubError(409, f"Tag {data['tag']} already exists")
            repo.tags[data["tag"]] = sha
        self._json(200, {})

    def refs(self, p, _q, _b) -> None:
        repo = self._repo(f"{p[2]}/{p[3]}")
        ref = lambda kind, n, s: {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s}
        self._json(200, {"branches": [ref("heads", n, s) for n, s in repo.branches.items()],
                         "tags": [ref("tags", n, s) for n, s in repo.tags.items()],
                         "converts": [], "pullRequests": []})

    def info(self, p, _q, _b) -> None:
        repo_id = f"{p[2]}/{p[3]}"
        repo = self._repo(repo_id)
        sha = self._commit(repo, p[5] if len(p) > 5 else "main")
        files = repo.commits[sha]
        self._json(200, {"id": repo_id, "sha": sha, "private": repo.private, "tags": [],
                         "siblings": [{"rfilename": f} for f in sorted(files)]})

    # -- trees ------------------------------------------------------------------------------
    def _entry(self, path: str, blob: Blob) -> dict:
        out = {"type": "file", "path": path, "size": len(blob.data),
               "oid": git_blob_sha1(blob.data)}
        if blob.lfs:
            out["lfs"] = {"oid": blob.oid, "size": len(blob.data), "pointerSize": 134}
        return out

    def tree(self, p, q, _b) -> None:
        repo = self._repo(f"{p[2]}/{p[3]}")
        files = repo.commits[self._commit(repo, p[5])]
        prefix = "/".join(p[6:]).strip("/")
        recursive = q.get("recursive", ["false"])[0].lower() in ("1", "true")
        out, dirs = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest and not recursive:
                dirs.add(f"{prefix}/{rest.split('/')[0]}" if prefix else rest.split("/")[0])
                continue
            for i, _ in enumerate(rest.split("/")[:-1]):
                d = "/".join(([prefix] if prefix else []) + rest.split("/")[:i + 1])
                dirs.add(d)
            out.append(self._entry(path, files[path]))
        if prefix and not out and not dirs:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        out += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
        self._json(200, out)

    def paths_info(self, p, _q, body: bytes) -> None:
        repo = self._repo(f"{p[2]}/{p[3]}")
        files = repo.commits[self._commit(repo, p[5])]
        try:
            paths = json.loads(body)["paths"]
        except ValueError:
            paths = parse_qs(body.decode()).get("paths", [])
        self._json(200, [self._entry(x, files[x]) for x in paths if x in files])

    # -- uploads ----------------------------------------------------------------------------
    def preupload(self, p, _q, body: bytes) -> None:
        repo = self._repo(f"{p[2]}/{p[3]}")
        sha = repo.resolve(p[5])
        files = repo.commits[sha] if sha else {}
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["size"] >= self.state.lfs_threshold
            have = files.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": have.oid if have is not None and have.lfs == lfs else None})
        self._json(200, {"files": out, "commitOid": sha})

    def lfs_batch(self, p, _q, body: bytes) -> None:
        repo_id = f"{p[0]}/{p[1][:-len('.git')]}"
        self._repo(repo_id)
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                base = f"{self._base()}"
                entry["actions"] = {
                    "upload": {"href": f"{base}/lfs-upload/{quote(repo_id)}/{obj['oid']}"},
                    "verify": {"href": f"{base}/lfs-verify/{quote(repo_id)}/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, p, _q, body: bytes) -> None:
        oid = p[-1]
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its oid")
        with self.state.lock:
            self.state.lfs_objects[oid] = body
        self._send(200)

    def commit(self, p, _q, body: bytes) -> None:
        repo_id, rev = f"{p[2]}/{p[3]}", p[5]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        st = self.state
        with st.lock:
            repo = self._repo(repo_id)
            if rev not in repo.branches:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.branches[rev]
            files = dict(repo.commits[head])
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header" and value.get("parentCommit") not in (None, head):
                    # as the Hub: a commit made on an older head is refused
                    raise HubError(412, "A commit has happened since. Please refresh and try "
                                        "again.")
                if key == "file":
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = st.lfs_objects.get(value["oid"])
                    if data is None:
                        raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = Blob(data, True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {k: v for k, v in files.items() if not k.startswith(prefix)}
            sha = st.new_commit(repo, head, files, rev)
        self._json(200, {"commitUrl": f"{self._base()}/{repo_id}/commit/{sha}",
                         "commitOid": sha, "success": True})

    # -- downloads --------------------------------------------------------------------------
    def resolve(self, p, _q, _b) -> None:
        repo_id, rev, path = f"{p[0]}/{p[1]}", p[3], "/".join(p[4:])
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev)
        blob = repo.commits[sha].get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(blob.data)}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.oid}"', "X-Linked-Size": str(len(blob.data))})
        data = self.state.substitutes.get((repo_id, path), blob.data)
        self._send(200, data, headers, "application/octet-stream")


class HubServer:
    """``HubServer().start()`` serves on 127.0.0.1 at a free port; ``url`` is the endpoint."""

    def __init__(self, lfs_threshold: int = 4096):
        self.state = HubState(lfs_threshold)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return {k: v.data for k, v in repo.commits[repo.resolve(rev)].items()}


def serve_hub_online(monkeypatch, hf_home, token: str):
    """Start a :class:`HubServer` and point huggingface_hub at it for one test: online, Xet
    off, its own cache in ``hf_home``, ``token`` in HF_TOKEN. huggingface_hub reads these once,
    at import, so the copies in its constants module are patched too. Yields the server and
    stops it afterwards (use it as the body of a pytest fixture)."""
    import huggingface_hub.constants as c

    srv = HubServer().start()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    env = {"HF_ENDPOINT": srv.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home),
           "HF_HUB_CACHE": str(hf_home / "hub"), "HF_TOKEN": token}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    patches = {"HF_HUB_OFFLINE": False, "ENDPOINT": srv.url, "HF_HUB_DISABLE_XET": True,
               "HUGGINGFACE_CO_URL_TEMPLATE": srv.url + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
               "HF_TOKEN_PATH": str(hf_home / "token"),
               "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens")}
    for key, value in patches.items():
        monkeypatch.setattr(c, key, value)
    try:
        yield srv
    finally:
        srv.stop()

