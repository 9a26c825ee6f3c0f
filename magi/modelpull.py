"""`magi models pull`: one GGUF from a Hugging Face Hub repo, verified, into the bus's model store.

The file is downloaded with `huggingface_hub` into a scratch directory under `$MAGI_HOME/pulls/` and removed
once the store holds it. Not into the usual Hugging Face cache (`~/.cache/huggingface`): the store is the
cluster's copy and each node keeps its own digest-named cache (`$MAGI_HOME/models`, capped by
MAGI_MODEL_CACHE_BYTES), so a kept download would be a third, uncapped copy of a multi-GB file. Not into
/tmp either: that is often a small tmpfs, while `$MAGI_HOME` is the disk already sized for models.

The hub is asked first which commit the revision names, then the download is pinned to that commit, so the
bytes stored are the commit the source records even if the branch moves meanwhile. For an LFS file the hub's
ETag is the file's SHA-256: the download must match it before it may replace anything in the store.

The endpoint is `--endpoint`, else HF_ENDPOINT (read at each pull, not when huggingface_hub was imported),
else huggingface.co. The token is huggingface_hub's own (HF_TOKEN or `hf auth login`): never a command-line
argument, where `ps` would show it. Every huggingface_hub error becomes one of shared/errors.py's types
naming the field at fault (`repo`, `revision`, `file`, `endpoint`, `token`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from shared.errors import (
    BadRequest,
    DeadlineExceeded,
    Forbidden,
    MagiError,
    NotFound,
    Unavailable,
    Unprocessable,
    translate,
)
from shared.modelstore import StoredModel, file_digest

log = logging.getLogger("magi.modelpull")

DEFAULT_ENDPOINT = "https://huggingface.co"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Source:
    """Where a pulled file came from: what was asked for and the commit the hub resolved it to."""

    repo: str
    filename: str
    revision: str
    endpoint: str
    commit: str = ""  # filled in by `resolve`
    sha256: str = ""  # the hub's ETag when it is an LFS file's SHA-256 (hex), else ""
    size: int | None = None

    def description(self) -> str:
        """What `magi models files` shows in its `from` column."""
        where = "" if self.endpoint == DEFAULT_ENDPOINT else f" via {self.endpoint}"
        return f"hf:{self.repo}/{self.filename} revision {self.revision} commit {self.commit}{where}"


@dataclass(frozen=True)
class Pulled:
    path: Path
    source: Source
    digest: str  # sha256:<hex> of the downloaded file


def endpoint_of(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve(repo_id: str, filename: str, *, revision: str = "main", endpoint: str | None = None,
            token: str | bool | None = None) -> Source:
    """Ask the hub which commit and bytes `repo_id/filename` at `revision` are: one HEAD without retries, so a
    hub that is down says so at once (hf_hub_download alone retried for 23 s here before giving up). Blocking."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    asked = Source(repo=repo_id, filename=filename, revision=revision, endpoint=endpoint_of(endpoint))
    with translated_hub_errors(asked):
        url = hf_hub_url(repo_id, filename, revision=revision, endpoint=asked.endpoint)
        meta = get_hf_file_metadata(url, token=token, endpoint=asked.endpoint)
    if not meta.commit_hash:
        raise BadRequest(f"{asked.endpoint} named no commit for {repo_id}/{filename}: it is not a Hugging Face "
                         "Hub endpoint", field="endpoint")
    etag = (meta.etag or "").lower()
    return replace(asked, commit=meta.commit_hash, sha256=etag if _SHA256.fullmatch(etag) else "", size=meta.size)


def download(source: Source, into: Path, *, token: str | bool | None = None) -> Pulled:
    """Download the file at `source.commit` under `into` (a huggingface_hub cache directory) and verify it
    against the hub's SHA-256. Blocking."""
    from huggingface_hub import hf_hub_download

    _check_room(source, into)
    with translated_hub_errors(source):
        local = hf_hub_download(source.repo, source.filename, revision=source.commit, cache_dir=into,
                                endpoint=source.endpoint, token=token)
    path = Path(local).resolve()  # the blob behind the snapshot's symlink
    digest = file_digest(path)
    if source.sha256 and digest != f"sha256:{source.sha256}":
        raise Unavailable(f"the download of {source.repo}/{source.filename} is {digest}, but the hub says "
                          f"sha256:{source.sha256}: it was corrupted on the way; pull again", field="file")
    return Pulled(path=path, source=source, digest=digest)


def pull(repo_id: str, filename: str, *, revision: str = "main", endpoint: str | None = None,
         token: str | bool | None = None, into: Path) -> Pulled:
    """Resolve, then download and verify: the local file and where it came from. Blocking."""
    source = resolve(repo_id, filename, revision=revision, endpoint=endpoint, token=token)
    return download(source, into, token=token)


@contextlib.asynccontextmanager
async def pulled(repo_id: str, filename: str, *, revision: str = "main", endpoint: str | None = None,
                 token: str | bool | None = None, home: Path) -> AsyncIterator[Pulled]:
    """The pulled file, in a scratch directory under `home/pulls/` that is removed on leaving, whatever
    happened (and, if this process dies first, by the next pull on the node)."""
    pulls = home / "pulls"
    await asyncio.to_thread(_sweep_abandoned, pulls)
    scratch = pulls / f"{os.getpid()}-{uuid.uuid4().hex}"
    try:
        yield await _on_daemon_thread(pull, repo_id, filename, revision=revision, endpoint=endpoint, token=token,
                                      into=scratch)
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)


async def _on_daemon_thread(fn, /, *args, **kwargs):
    """`fn(*args, **kwargs)` on a daemon thread. Not asyncio.to_thread: its executor is joined when the loop
    shuts down, so a Ctrl-C would wait for a multi-GB download to finish before `magi` exits."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result, error) -> None:
        if done.done():  # the awaiting coroutine was cancelled
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args, **kwargs), None
        except BaseException as exc:  # handed to the awaiting coroutine, which raises it
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for this any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="magi-models-pull", daemon=True).start()
    return await done


def _sweep_abandoned(pulls: Path) -> None:
    """Remove the scratch directories of pulls whose process is gone (killed, or interrupted mid-download)."""
    for scratch in pulls.glob("*-*"):
        pid = scratch.name.partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


Store = Callable[[str, Path, str], Awaitable[StoredModel]]


async def pull_to_store(name: str, repo_id: str, filename: str, store: Store, *, home: Path,
                        revision: str = "main", endpoint: str | None = None,
                        token: str | bool | None = None) -> StoredModel:
    """Pull the file, then hand it to `store(name, path, description)` (the code path `magi models add` uses);
    the stored digest must be the one verified here."""
    async with pulled(repo_id, filename, revision=revision, endpoint=endpoint, token=token, home=home) as got:
        stored = await store(name, got.path, got.source.description())
    if stored.digest != got.digest:  # the store hashes what it read: the file changed under us
        raise Unavailable(f"model {name!r} was stored as {stored.digest}, not the {got.digest} downloaded; "
                          "pull again", field="name")
    log.info("model pulled", extra={"model": name, "repo": repo_id, "file": filename, "revision": revision,
                                    "commit": got.source.commit, "digest": stored.digest})
    return stored


def _check_room(source: Source, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(into).free
    if source.size is not None and source.size > free:
        raise Unprocessable(f"{source.repo}/{source.filename} is {source.size} bytes; {into} has {free} free",
                            field="file")


@contextlib.contextmanager
def translated_hub_errors(asked: Source):
    """Raise huggingface_hub's and its HTTP client's errors as MAGI's typed errors (never a traceback)."""
    try:
        yield
    except MagiError:
        raise
    except Exception as exc:  # every error is translated below; unknown ones become a logged Internal
        raise hub_error(exc, asked) from None


def hub_error(exc: BaseException, asked: Source) -> MagiError:
    """The typed error for one huggingface_hub (or HTTP client) exception."""
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.LocalEntryNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__  # huggingface_hub wraps the failed HEAD it could not fall back from
    repo, at = f"{asked.repo} on {asked.endpoint}", f"{asked.repo} at revision {asked.revision!r}"
    if isinstance(exc, hf.GatedRepoError):
        return Forbidden(f"{repo} is gated: accept its terms on the hub and set HF_TOKEN", field="repo")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return NotFound(f"no repository {repo} (or it is private and no token was given)", field="repo")
    if isinstance(exc, hf.RevisionNotFoundError):
        return NotFound(f"{repo} has no revision {asked.revision!r}", field="revision")
    if isinstance(exc, hf.EntryNotFoundError):
        return NotFound(f"{at} has no file {asked.filename!r}", field="file")
    if isinstance(exc, hf.HFValidationError):
        return BadRequest(f"{asked.repo!r} is not a repository id the hub accepts: {exc}", field="repo")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return Unavailable("HF_HUB_OFFLINE is set: this node does not download from the hub", field="endpoint")
    if isinstance(exc, hf.HfHubHTTPError):
        return _http_error(exc, asked.endpoint)
    return _transport_error(exc, asked)


def _http_error(exc, endpoint: str) -> MagiError:
    status = exc.response.status_code if exc.response is not None else 0
    if status in (401, 403):
        return Forbidden(f"{endpoint} refused the token (HTTP {status}); check HF_TOKEN", field="token")
    if status == 400:
        return BadRequest(f"{endpoint} refused the request (HTTP 400)", field="file")
    return Unavailable(f"{endpoint} answered HTTP {status}", field="endpoint")


def _transport_error(exc: BaseException, asked: Source) -> MagiError:
    name = type(exc).__name__
    if isinstance(exc, ValueError):  # e.g. a file name huggingface_hub will not write (`..`, absolute)
        return BadRequest(f"{asked.filename!r} is not a file name the hub accepts: {exc}", field="file")
    if not (type(exc).__module__.startswith("httpx") or isinstance(exc, OSError)):
        return translate(exc)  # not a download failure: a bug, logged with its traceback, reported as Internal
    log.warning("hub unreachable", extra={"endpoint": asked.endpoint, "error_type": name, "error": str(exc)})
    if "Timeout" in name or isinstance(exc, TimeoutError):
        return DeadlineExceeded(f"{asked.endpoint} did not answer in time", field="endpoint")
    return Unavailable(f"cannot download from {asked.endpoint} ({name})", field="endpoint")
