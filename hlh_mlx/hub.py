"""Tuned packs on the Hugging Face Hub: push results to a repo, pull them into the store.

A pack is a folder (a Hub model repo):

    manifest.json                 format, device, MLX and hlh_mlx versions, date, sha256 per file
    results/<op>.jsonl            the results lines of one device
    templates/<op>/<file>.j2      the templates the ranked variants came from
    sources/<op>/<variant>.<ext>  each ranked variant's rendered kernel, for people to read

Pulled results are installed into the local store with source `hub:REPO@COMMIT` (pinned to
the commit the Hub served). What comes from a pack is data until trusted: hlh_mlx.tuned
never builds a pack's template or uses its results unless the user trusted that exact
commit (`pull --trust`, or later `hlh_mlx trust REPO`). Verification happens before anything
is written: a wrong format version, a file outside the pack, a hash mismatch or a results
line that does not parse refuses the whole pack and leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from . import __version__, paths, store, templates, variants

PACK_FORMAT = 1
PACK_DIRS = ("results", "templates", "sources")
SOURCE_EXT = {"metal": "metal", "cuda": "cu"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PackError(ValueError):
    """A pack that cannot be pushed, pulled or trusted; the message says why."""


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id:
        raise PackError(f"bad repo id {repo_id!r}: expected OWNER/NAME")
    return repo_id


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- building and pushing -------------------------------------------------------------

def build(out: Path, device: str, ops: list[str] | None = None) -> dict:
    """Write a pack of the local results of `device` into `out`; return its manifest."""
    root = paths.results_dir() / device
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else []
    wanted = [f for f in files if ops is None or f.stem in ops]
    if ops:
        missing = sorted(set(ops) - {f.stem for f in wanted})
        if missing:
            raise PackError(f"no local results for {', '.join(missing)} on {device} (in {root})")
    records_by_op = {f.stem: [r for r in store.read(f) if r.get("source", "local") == "local"] for f in wanted}
    records_by_op = {op: rs for op, rs in records_by_op.items() if rs}
    if not records_by_op:
        raise PackError(f"no local results to push for device {device!r} (in {root})")
    first = next(iter(records_by_op.values()))[0]
    for op, records in records_by_op.items():
        _write(out / "results" / f"{op}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        for v in _ranked_variants(op, records):
            t = v.template
            _write(out / "templates" / t.relpath, t.path.read_text())
            r = v.rendered
            _write(out / "sources" / op / f"{v.id}.{SOURCE_EXT[t.backend]}",
                   (f"// header\n{r.header}\n// body\n" if r.header else "") + r.source + "\n")
    manifest = {
        "format": PACK_FORMAT, "device": device, "device_name": first.get("device_name"),
        "architecture": first.get("architecture"), "mlx": sorted({r.get("mlx") for rs in records_by_op.values()
                                                                  for r in rs if r.get("mlx")}),
        "hlh_mlx": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ops": sorted(records_by_op),
        "files": {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()},
    }
    _write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ranked_variants(op: str, records: list[dict]) -> list:
    """Current variants (template renders the stored source) of correct, timed records."""
    wanted = {(r.get("template"), json.dumps(r.get("params") or {}, sort_keys=True), r.get("source_hash"))
              for r in records if r.get("correct") and r.get("timing") and r.get("template") != "builtin"}
    out = []
    for t in templates.discover(op):
        for v in variants.expand(t):
            if (t.relpath, json.dumps(v.param_dict, sort_keys=True), v.source_hash) in wanted:
                out.append(v)
    return out


def push(repo_id: str, device: str, ops: list[str] | None = None, private: bool = False,
         token: str | None = None) -> tuple[str, str]:
    """Create the repo if needed and upload a pack; return (repo URL, commit)."""
    from huggingface_hub import HfApi
    check_repo_id(repo_id)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hlh_pack_") as d:
        manifest = build(Path(d), device, ops)
        with _hub_errors(repo_id):
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=d, repo_id=repo_id,
                                     commit_message=f"hlh_mlx pack: {', '.join(manifest['ops'])} on {device}")
    return str(url), info.oid


# ---- pulling, verifying, installing ---------------------------------------------------

@dataclass
class PullReport:
    repo_id: str
    commit: str
    source: str
    device: str
    results: dict = field(default_factory=dict)     # op -> number of results installed
    code: list = field(default_factory=list)        # (kind, path, bytes): what would run if trusted
    trusted: bool = False

    def __str__(self) -> str:
        lines = [f"pulled {self.repo_id}@{self.commit[:12]} ({self.device}): "
                 + ", ".join(f"{op} {n} results" for op, n in sorted(self.results.items()))]
        lines.append(f"installed as source {self.source}")
        lines.append("code in this pack (runs only if trusted):")
        lines += [f"  {kind} {p} ({n} bytes)" for kind, p, n in self.code] or ["  none"]
        lines.append("trusted: hlh_mlx.tuned may build and run it" if self.trusted else
                     f"NOT trusted: hlh_mlx.tuned ignores this pack until `hlh_mlx trust {self.repo_id}`")
        return "\n".join(lines)


def pull(repo_id: str, revision: str | None = None, trust: bool = False, token: str | None = None) -> PullReport:
    """Download (through the HF cache), verify and install a pack."""
    from huggingface_hub import snapshot_download
    check_repo_id(repo_id)
    with _hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, token=token))
    commit = folder.name  # the HF cache keeps snapshots under their commit hash
    manifest, records = verify(folder)
    source = f"hub:{repo_id}@{commit}"
    report = PullReport(repo_id, commit, source, manifest["device"])
    with store.locked(pack_dir(repo_id)):  # two pulls of one pack: one after the other
        _install(folder, manifest, records, repo_id, source)
    for p in sorted(manifest["files"]):
        if p.startswith(("templates/", "sources/")):
            report.code.append((p.split("/")[0][:-1], p, (folder / p).stat().st_size))
    report.results = {op: len(rs) for op, rs in records.items()}
    if trust:
        set_trusted(repo_id, True)
    report.trusted = is_trusted(source)
    return report


def verify(folder: Path) -> tuple[dict, dict[str, list[dict]]]:
    """The manifest and parsed results of a downloaded pack, or a PackError."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise PackError(f"{folder}: not an hlh_mlx pack (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise PackError(f"manifest.json does not parse: {e}") from None
    if not isinstance(manifest, dict):
        raise PackError("manifest.json is not an object")
    if manifest.get("format") != PACK_FORMAT:
        raise PackError(f"pack format version {manifest.get('format')!r}; this hlh_mlx ({__version__}) reads "
                        f"version {PACK_FORMAT}")
    files, device = manifest.get("files"), manifest.get("device")
    if not isinstance(files, dict) or not files or not isinstance(device, str) or not re.fullmatch(r"[a-z0-9-]+", device):
        raise PackError("manifest.json lacks a file list or a valid device")
    for rel, digest in files.items():
        p = PurePosixPath(rel)
        if (p.is_absolute() or ".." in p.parts or "\\" in rel or len(p.parts) < 2 or p.parts[0] not in PACK_DIRS):
            raise PackError(f"manifest names a file outside the pack: {rel!r}")
        full = folder / rel  # (the HF cache links files into blobs/: the check above is on the name)
        if not full.is_file():
            raise PackError(f"manifest names {rel!r}, which the pack does not contain")
        if _sha256(full) != digest:
            raise PackError(f"{rel}: sha256 does not match the manifest (tampered or corrupted pack)")
    records: dict[str, list[dict]] = {}
    for rel in sorted(files):
        if not rel.startswith("results/"):
            continue
        op = PurePosixPath(rel).stem
        records[op] = []
        for n, line in enumerate((folder / rel).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise PackError(f"{rel}:{n}: results line does not parse ({e})") from None
            try:
                store.validate(r)
            except store.RecordError as e:
                raise PackError(f"{rel}:{n}: not a results line ({e})") from None
            if r.get("op") != op or r.get("device") != device:
                raise PackError(f"{rel}:{n}: not a results line of {op} on {device}")
            records[op].append(r)
    return manifest, records


def _packs_dir() -> Path:
    return paths.results_dir() / ".packs"


def pack_dir(repo_id: str) -> Path:
    return _packs_dir() / repo_id.replace("/", "--")


def _install(folder: Path, manifest: dict, records: dict, repo_id: str, source: str) -> None:
    """Copy the pack's files to a temporary folder, replace this repo's results op by op
    (each under the results file's lock, written atomically), then swap the folder in."""
    dest = pack_dir(repo_id)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in manifest["files"]:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, tmp / rel)
    store.write_atomic(tmp / "manifest.json", json.dumps({**manifest, "source": source}, indent=2).encode())
    _replace_results(repo_id, [manifest["device"]], {op: [{**r, "source": source} for r in rs]
                                                     for op, rs in records.items()})
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    # trust names a commit (is_trusted compares whole sources): a new commit is untrusted
    # until trusted again, a re-pull of the trusted one stays trusted


def _replace_results(repo_id: str, devices: list[str], new: dict[str, list[dict]]) -> int:
    """Swap this repo's results for `new` (the results of devices[0]; the others only lose
    the repo's results); return how many old ones were dropped. Each file is changed under
    its lock and replaced atomically, so a sweep appending at the same time loses nothing."""
    prefix = f"hub:{repo_id}@"
    dropped = 0
    for i, device in enumerate(devices):
        root = paths.results_dir() / device
        ops = {p.stem for p in root.glob("*.jsonl")} if root.is_dir() else set()
        if i == 0:
            ops |= set(new)
        for op in sorted(ops):
            add = new.get(op, []) if i == 0 else []

            def change(old, add=add):
                return [r for r in old if not str(r.get("source", "")).startswith(prefix)] + add
            old, kept = store.rewrite(store.path_for(device, op), change)
            dropped += len(old) - (len(kept) - len(add))
    return dropped


def remove(repo_id: str) -> int:
    """Remove an installed pack and its results; return how many results went. A pack
    whose manifest is unreadable is removed too (its results from every device)."""
    check_repo_id(repo_id)
    with store.locked(pack_dir(repo_id)):
        return _remove(repo_id)


def _remove(repo_id: str) -> int:
    meta = installed().get(repo_id)
    if meta is not None:
        devices = [meta["device"]]
    elif pack_dir(repo_id).is_dir():
        root = paths.results_dir()
        devices = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    else:
        raise PackError(f"no pack from {repo_id} is installed")
    dropped = _replace_results(repo_id, devices, {})
    _set_trust(repo_id, None)
    shutil.rmtree(pack_dir(repo_id), ignore_errors=True)
    return dropped


def _repo_of(folder: Path) -> str:
    return folder.name.replace("--", "/", 1)


def _read_manifest(m: Path) -> dict:
    """An installed manifest, or a PackError naming the file (and line) when it is corrupt."""
    try:
        meta = json.loads(m.read_text())
    except ValueError as e:
        raise PackError(f"{m}:{getattr(e, 'lineno', 1)}: installed manifest does not parse ({e})") from None
    except OSError as e:
        raise PackError(f"{m}: cannot read the installed manifest ({e.strerror})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("source"), str) and meta["source"].startswith("hub:")
            and isinstance(meta.get("device"), str) and isinstance(meta.get("ops"), list)):
        raise PackError(f"{m}: installed manifest lacks its source, device or ops")
    return meta


def installed() -> dict[str, dict]:
    """repo id -> the installed pack's manifest (with its `source`). A pack whose manifest
    is unreadable is left out (see `broken()`)."""
    return {repo: meta for repo, meta in _scan().items() if not isinstance(meta, PackError)}


def broken() -> dict[str, PackError]:
    """repo id -> why an installed pack's manifest cannot be read (`hlh_mlx remove` clears it)."""
    return {repo: err for repo, err in _scan().items() if isinstance(err, PackError)}


def _scan() -> dict:
    out = {}
    root = _packs_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir() or d.name.endswith((".tmp", ".old")):
            continue
        try:
            meta = _read_manifest(d / "manifest.json")
            out[meta["source"].split("@")[0].removeprefix("hub:")] = meta
        except PackError as e:
            out[_repo_of(d)] = e
    return out


# ---- trust ----------------------------------------------------------------------------

def _trust_file() -> Path:
    return _packs_dir() / "trusted.json"


def _trusted() -> dict:
    """repo id -> trusted source. A corrupt trust file trusts nothing (with a warning naming
    it): hlh_mlx.tuned then runs only local results and the built-ins, never raises."""
    f = _trust_file()
    try:
        t = json.loads(f.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"{f}:{getattr(e, 'lineno', 1)}: unreadable trust file, no pack is trusted ({e}); "
                      "`hlh_mlx trust OWNER/NAME` writes it again", RuntimeWarning, stacklevel=2)
        return {}
    if not isinstance(t, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in t.items()):
        warnings.warn(f"{f}:1: the trust file is not an object of repo -> source; no pack is trusted",
                      RuntimeWarning, stacklevel=2)
        return {}
    return t


def _set_trust(repo_id: str, source: str | None) -> None:
    """Change one entry of the trust file, under its lock, written atomically."""
    f = _trust_file()
    with store.locked(f):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a corrupt file is being replaced
            t = _trusted()
        t.pop(repo_id, None)
        if source:
            t[repo_id] = source
        store.write_atomic(f, (json.dumps(t, indent=2) + "\n").encode())


def set_trusted(repo_id: str, on: bool) -> str | None:
    """Trust (or stop trusting) the installed commit of a pack; return its source."""
    meta = installed().get(repo_id)
    if on and meta is None:
        err = broken().get(repo_id)
        raise PackError(str(err) if err else f"no pack from {repo_id} is installed (hlh_mlx pull {repo_id} first)")
    _set_trust(repo_id, meta["source"] if on else None)
    return meta["source"] if on else None


def is_trusted(source: str) -> bool:
    """Local results always; a hub source only when that exact commit was trusted."""
    if not str(source).startswith("hub:"):
        return True
    return source in _trusted().values()


def trusted_template_roots() -> list[Path]:
    """templates/ of every trusted, installed pack (for hlh_mlx.tuned)."""
    out = []
    packs = installed()
    for repo_id, source in _trusted().items():
        root = pack_dir(repo_id) / "templates"
        meta = packs.get(repo_id)
        if meta and meta.get("source") == source and root.is_dir():
            out.append(root)
    return out


# ---- errors ---------------------------------------------------------------------------

class _hub_errors:
    """Turn huggingface_hub's exceptions into one-line PackErrors."""

    def __init__(self, repo_id: str, revision: str | None = None):
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, PackError):
            return False
        from huggingface_hub import errors as e
        rev = f" at revision {self.revision}" if self.revision else ""
        if isinstance(err, e.RevisionNotFoundError):
            raise PackError(f"{self.repo_id}: revision {self.revision!r} not found on the Hub") from None
        if isinstance(err, e.RepositoryNotFoundError):
            raise PackError(f"{self.repo_id}: repository not found on the Hub (or private: log in with "
                            "`hf auth login` or set HF_TOKEN)") from None
        if isinstance(err, e.LocalEntryNotFoundError) or isinstance(err, OSError):
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            raise PackError(f"{self.repo_id}{rev}: could not reach the Hub"
                            + (" (HF_HUB_OFFLINE is set)" if offline else f" at {os.environ.get('HF_ENDPOINT', 'huggingface.co')}")
                            + " and the pack is not in the local HF cache") from None
        if isinstance(err, e.HfHubHTTPError):
            raise PackError(f"{self.repo_id}: the Hub answered: {str(err).splitlines()[0]}") from None
        return False
