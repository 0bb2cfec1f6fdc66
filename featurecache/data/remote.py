"""Files at URLs (``s3://``, ``gs://``, ``az://``, ``https://`` ...) and local paths, read the
same way, through fsspec (imported on first use: importing featurecache stays cheap).

What the sources use:

* :func:`is_url` (a spec or a record id with a scheme ``xxx://``);
* :func:`open_binary` (a file-like for reading: a local file, or an object read with retries,
  reopened at its offset after a transient error mid-stream) and :func:`read_bytes`;
* :func:`stat` (a cheap content stamp: ``size:mtime_ns`` of a local file, as folders stamp
  them; ``size:ETag`` or ``size:last-modified`` of an object), :func:`stats` (many, in
  threads, "" for a missing one), :func:`walk` (every file below a folder URL, with its
  stamp, from the listing alone: no request per object) and :func:`listdir`;
* :func:`expand_braces` (webdataset-style ``train-{0000..0003}.tar``, ``{train,test}``);
* :func:`retry`: transient errors (connection reset, timeouts, HTTP 5xx, 429, SlowDown) are
  retried :data:`ATTEMPTS` times in all with bounded exponential backoff; :func:`retries` counts
  them for the embed summary (across forked decode workers);
* :func:`parse_storage_options` (``--storage-options`` JSON) and :func:`public_options` (the
  keys that may be recorded: ``endpoint_url``, ``region_name``, ``anon``, ``profile``...;
  never a key, a secret or a token), :func:`scrub` (a message with any secret blanked).

Errors: a missing object is :class:`FileNotFoundError` from the reading functions (the
sources make it a skipped input naming the URL); a store that refuses the credentials or
cannot be reached is :class:`RemoteError` (a :class:`~featurecache.errors.DataError`: one line,
no traceback, no secret).

The client's own retries (botocore's and s3fs's) are turned off for ``s3://`` unless the
storage options set them, so that every retry is this module's: bounded, and counted.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import threading
import time

from ..errors import DataError

__all__ = ["RemoteError", "is_url", "protocol", "filesystem", "open_binary", "read_bytes",
           "stat", "stats", "stamp_of", "walk", "listdir", "join", "expand_braces", "retry",
           "retries", "parse_storage_options", "public_options", "scrub", "ATTEMPTS"]

ATTEMPTS = int(os.environ.get("FEATURECACHE_REMOTE_ATTEMPTS", 5))  # tries in all, per request
BACKOFF = float(os.environ.get("FEATURECACHE_REMOTE_BACKOFF", 0.2))  # first wait, seconds
MAX_WAIT = 10.0  # longest single wait, seconds

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# storage-option keys that may be recorded (run.json, the rebuild command); any other is not
PUBLIC_KEYS = ("endpoint_url", "region_name", "region", "anon", "profile", "requester_pays",
               "project", "account_name", "use_ssl", "version_aware", "default_block_size")
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas", "signature",
                 "connection_string")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
               "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
               "AZURE_CLIENT_SECRET")
_TRANSIENT_ERRNO = {errno.EBUSY, getattr(errno, "EREMOTEIO", -1), errno.ETIMEDOUT,
                    errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN,
                    errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ConnectionClosedError", "ResponseStreamingError", "IncompleteRead",
                    "ServerDisconnectedError", "ClientPayloadError", "ClientConnectorError",
                    "ClientOSError", "ProtocolError", "ServerTimeoutError", "FSTimeoutError",
                    "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError"}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                    "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}
_UNREACHABLE_NAMES = {"EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
               "InvalidToken", "AuthorizationHeaderMalformed", "AllAccessDisabled",
               "NoCredentialsError", "PartialCredentialsError", "InvalidClientTokenId",
               "AuthenticationFailed", "AuthorizationFailure"}


class RemoteError(DataError):
    """A store that cannot be reached or refuses the request (endpoint, credentials, bucket):
    one line naming the URL and what to check; never a secret."""


# -- URLs ---------------------------------------------------------------------------------

def is_url(spec) -> bool:
    """Whether ``spec`` has a scheme ``xxx://`` (``s3://b/k``, ``https://h/p``, ``file:///p``)."""
    return bool(_URL.match(str(spec)))


def protocol(url: str) -> str:
    """``s3`` of ``s3://b/k``; ``file`` of a local path."""
    m = _URL.match(str(url))
    return m.group(1).lower() if m else "file"


def join(url: str, *parts: str) -> str:
    """``url`` and ``parts`` joined with ``/`` (a local path with the OS's separator)."""
    if not is_url(url):
        return os.path.join(url, *parts)
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def _full(fs, path: str, like: str) -> str:
    """An fsspec path back as a URL of the same scheme as ``like``."""
    if not is_url(like):
        return path
    return fs.unstrip_protocol(path) if protocol(like) not in ("http", "https") else path


# -- storage options ---------------------------------------------------------------------

def parse_storage_options(value) -> dict:
    """``--storage-options`` as given: a JSON object (a string), a dict (from a pipeline's
    TOML table or Python) or None/"" (none)."""
    from ..errors import OptionError

    if value in (None, "", {}):
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"storage_options must be a JSON object such as "
                          f"'{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}' ({exc}).") from None
    if not isinstance(parsed, dict):
        raise OptionError(f"storage_options must be a JSON object (of option names), got "
                          f"{type(parsed).__name__}.")
    return parsed


def _secret(key: str) -> bool:
    k = key.lower()
    return k not in PUBLIC_KEYS and any(w in k for w in _SECRET_WORDS)


def public_options(storage_options) -> dict:
    """The storage options that may be recorded (run.json, the rebuild command, messages):
    :data:`PUBLIC_KEYS` only, also inside ``client_kwargs``; keys, secrets and tokens never."""
    out = {}
    for k, v in (storage_options or {}).items():
        if k in PUBLIC_KEYS and isinstance(v, (str, int, float, bool)):
            out[k] = v
        elif k == "client_kwargs" and isinstance(v, dict):
            inner = {ik: iv for ik, iv in v.items()
                     if ik in PUBLIC_KEYS and isinstance(iv, (str, int, float, bool))}
            if inner:
                out[k] = inner
    return out


def _secrets(storage_options) -> list:
    found = []

    def visit(d):
        for k, v in d.items():
            if isinstance(v, dict):
                visit(v)
            elif isinstance(v, str) and len(v) >= 4 and (k not in PUBLIC_KEYS or _secret(k)):
                if k not in PUBLIC_KEYS:
                    found.append(v)

    visit(storage_options or {})
    found += [os.environ[e] for e in _SECRET_ENV if len(os.environ.get(e, "")) >= 4]
    return sorted(set(found), key=len, reverse=True)


def scrub(text: str, storage_options=None) -> str:
    """``text`` with every non-public storage-option value and credential from the
    environment replaced by ``***`` (for messages that may quote a client's error)."""
    for s in _secrets(storage_options):
        text = text.replace(s, "***")
    return text


# -- file systems ---------------------------------------------------------------------------

_FS: dict = {}
_FS_LOCK = threading.Lock()


def _client_options(proto: str, storage_options: dict) -> dict:
    """The options the fsspec file system gets: the user's, with the client's own retries
    off for s3 (unless the user set them), so that every retry is :func:`retry`'s."""
    so = dict(storage_options or {})
    if proto in ("s3", "s3a"):
        config = dict(so.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1})
        so["config_kwargs"] = config
    return so


def filesystem(url: str, storage_options=None):
    """``(fs, path)``: the fsspec file system of ``url`` (one per protocol and options, per
    process) and the path within it."""
    import fsspec

    proto = protocol(url)
    key = (proto, os.getpid(), json.dumps(storage_options or {}, sort_keys=True, default=str))
    with _FS_LOCK:
        fs = _FS.get(key)
        if fs is None:
            try:
                cls = fsspec.get_filesystem_class(proto)
            except (ImportError, ValueError) as exc:
                extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure",
                         "abfs": "azure", "abfss": "azure"}.get(proto)
                hint = f" (pip install 'featurecache[{extra}]')" if extra else ""
                raise RemoteError(f"{url}: cannot read {proto}:// URLs{hint}: "
                                  f"{scrub(str(exc), storage_options)}") from None
            try:
                fs = cls(**_client_options(proto, storage_options or {}), skip_instance_cache=True)
            except TypeError as exc:
                raise RemoteError(f"{url}: storage options not taken by {proto}:// "
                                  f"({scrub(str(exc), storage_options)}).") from None
            if proto in ("s3", "s3a"):
                fs.retries = 1  # s3fs's own loop (a class attribute): one try, ours retry
            _FS[key] = fs
    path = url if proto in ("http", "https") else fs._strip_protocol(url)
    return fs, path


# -- retries --------------------------------------------------------------------------------

_COUNT = None  # a shared counter (multiprocessing.Value), made on first use in the parent
_COUNT_LOCK = threading.Lock()


def _counter():
    global _COUNT
    with _COUNT_LOCK:
        if _COUNT is None:
            try:
                import multiprocessing

                _COUNT = multiprocessing.Value("q", 0)  # forked decode workers add to it
            except (OSError, ImportError):  # no shared memory: count in this process
                _COUNT = _Local()
        return _COUNT


class _Local:
    """A counter of this process only (where shared memory is not available)."""

    def __init__(self):
        self.value, self._lock = 0, threading.Lock()

    def get_lock(self):
        return self._lock


def retries() -> int:
    """Transient errors retried so far (this process and its forked decode workers)."""
    return int(_counter().value)


def reset_retries() -> None:
    c = _counter()
    with c.get_lock():
        c.value = 0


def _chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _code(exc) -> tuple:
    """``(error code, HTTP status)`` of a botocore/aiohttp error, when it has them."""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {}) or {}
        meta = resp.get("ResponseMetadata", {}) or {}
        return err.get("Code", ""), int(meta.get("HTTPStatusCode") or 0)
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    return "", status if isinstance(status, int) else 0


def is_transient(exc) -> bool:
    """A failure worth retrying: connection reset or refused, a timeout, HTTP 5xx or 429,
    SlowDown; not a missing object, a refusal of the credentials or a bad request."""
    for e in _chain(exc):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError)):
            return False
        code, status = _code(e)
        if code in _AUTH_CODES or status in (401, 403, 404):
            return False
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return True
        if type(e).__name__ in _TRANSIENT_NAMES or isinstance(e, (TimeoutError,
                                                                  ConnectionError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
        if "SlowDown" in str(e) or "reduce your request rate" in str(e):
            return True
    return False


def retry(fn, url: str = "", storage_options=None, attempts: int | None = None):
    """``fn()``, tried up to ``attempts`` (:data:`ATTEMPTS`) times while it fails with a
    transient error, waiting :data:`BACKOFF` seconds, then twice that ... (at most
    :data:`MAX_WAIT`); each retry is counted (:func:`retries`). The last error is raised as
    :func:`remote_error` makes it: :class:`FileNotFoundError` as it is, a refusal or an
    unreachable store as :class:`RemoteError`."""
    attempts = ATTEMPTS if attempts is None else max(1, attempts)
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified, re-raised
            if i + 1 < attempts and is_transient(exc):
                c = _counter()
                with c.get_lock():
                    c.value += 1
                time.sleep(min(MAX_WAIT, BACKOFF * 2 ** i))
                continue
            raise remote_error(exc, url, storage_options,
                               tries=i + 1 if is_transient(exc) else 0) from None


def remote_error(exc, url: str, storage_options=None, tries: int = 0):
    """The error to raise for ``exc`` met reading ``url``: a missing object as
    :class:`FileNotFoundError` (naming the URL), a :class:`DataError` as it is, anything
    else as a one-line :class:`RemoteError` (credentials, endpoint, bucket), scrubbed."""
    if isinstance(exc, DataError):
        return exc
    if isinstance(exc, FileNotFoundError) or any(_code(e)[1] == 404 or _code(e)[0] in
                                                 ("NoSuchKey", "NoSuchBucket", "404")
                                                 for e in _chain(exc)):
        bucket = any(_code(e)[0] == "NoSuchBucket" or "NoSuchBucket" in str(e)
                     for e in _chain(exc))
        if bucket:
            return RemoteError(f"{url}: no such bucket; check the URL (and the endpoint_url "
                               f"of --storage-options).")
        return FileNotFoundError(errno.ENOENT, "object not found", url)
    where = public_options(storage_options).get("endpoint_url") or \
        (public_options(storage_options).get("client_kwargs") or {}).get("endpoint_url")
    at = f" at {where}" if where else ""
    first = next((e for e in _chain(exc)), exc)
    names = {type(e).__name__ for e in _chain(exc)}
    codes = {_code(e)[0] for e in _chain(exc)}
    detail = scrub(" ".join(str(first).split()), storage_options)[:300]
    if names & {"NoCredentialsError", "PartialCredentialsError"} or \
            codes & _AUTH_CODES or isinstance(first, PermissionError):
        return RemoteError(f"{url}: the store{at} refused the credentials ({detail}); check "
                           f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile) and "
                           f"the bucket's permissions.")
    if names & _UNREACHABLE_NAMES or isinstance(first, (ConnectionError, TimeoutError)) or \
            (isinstance(first, OSError) and first.errno in _TRANSIENT_ERRNO and tries):
        said = f" after {tries} tries" if tries > 1 else ""
        return RemoteError(f"{url}: cannot reach the store{at}{said} ({detail}); check the "
                           f"URL and the endpoint_url of --storage-options.")
    return RemoteError(f"{url}: cannot read ({type(first).__name__}: {detail}).")


# -- reading ---------------------------------------------------------------------------------

def open_binary(url, storage_options=None):
    """A binary file-like for reading ``url`` (a local path, ``file://`` or any fsspec URL):
    opened with retries; reads that fail transiently reopen the object at their offset and
    try again. A missing file or object raises :class:`FileNotFoundError`."""
    url = str(url)
    if not is_url(url):
        return open(url, "rb")
    return io.BufferedReader(_Reader(url, storage_options or {}), buffer_size=1 << 20)


def read_bytes(url, storage_options=None) -> bytes:
    """The whole content of ``url`` (retried as :func:`retry`)."""
    url = str(url)
    if not is_url(url):
        with open(url, "rb") as f:
            return f.read()
    fs, path = filesystem(url, storage_options)
    return retry(lambda: fs.cat_file(path), url, storage_options)


class _Reader(io.RawIOBase):
    """An object read through fsspec, reopened at the current offset after a transient
    error (so a long tar stream survives a dropped connection)."""

    def __init__(self, url: str, storage_options: dict):
        self.url, self.storage_options, self.pos, self._f = url, storage_options, 0, None
        self._open()

    def _open(self):
        self._f = retry(self._open_at, self.url, self.storage_options)

    def _open_at(self):
        fs, path = filesystem(self.url, self.storage_options)
        fs.invalidate_cache(path)  # its size as it is now
        f = fs.open(path, "rb")
        if self.pos:
            f.seek(self.pos)
        return f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if self._f is None:
            self._f = retry(self._open_at, self.url, self.storage_options)
        self.pos = self._f.seek(offset, whence)
        return self.pos

    def readinto(self, b) -> int:
        def go():
            if self._f is None:  # dropped after a transient error: reopen at the offset
                self._f = self._open_at()
            try:
                return self._f.read(len(b))
            except Exception as exc:
                if is_transient(exc):
                    self._drop()
                raise

        data = retry(go, self.url, self.storage_options)
        n = len(data)
        b[:n] = data
        self.pos += n
        return n

    def _drop(self):
        f, self._f = self._f, None
        try:
            f.close()
        except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
            pass

    def close(self):
        if self._f is not None:
            self._drop()
        super().close()


# -- stamps and listings ----------------------------------------------------------------------

def stamp_of(info: dict) -> str:
    """A content stamp from an fsspec info dict: ``size:ETag`` (or ``size:last-modified``,
    ``size:mtime``, ``size:md5``...); "" when the store gives nothing but the name."""
    size = info.get("size")
    for key in ("ETag", "etag", "md5_hash", "content_settings.content_md5", "generation",
                "LastModified", "last_modified", "mtime", "updated", "created"):
        v = info.get(key)
        if v not in (None, ""):
            v = str(v).strip('"')
            if key == "mtime" and isinstance(info.get("mtime"), (int, float)):
                v = str(int(info["mtime"] * 1e9))  # file://: as folders stamp a local file
            return f"{size}:{v}"
    return f"{size}:" if size is not None else ""


def stat(url, storage_options=None) -> str:
    """The content stamp of one file or object (``size:mtime_ns`` of a local file, as
    :func:`~featurecache.data.folders.stamp`; ``size:ETag`` of an object); raises
    :class:`FileNotFoundError` when it does not exist, :class:`RemoteError` when the store
    refuses or cannot be reached."""
    url = str(url)
    if not is_url(url):
        st = os.stat(url)
        return f"{st.st_size}:{st.st_mtime_ns}"
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)  # as the store is now, not as an earlier listing saw it
    info = retry(lambda: fs.info(path), url, storage_options)
    if info.get("type") == "directory":
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file", url)
    return stamp_of(info)


def stats(urls, storage_options=None, threads: int = 16) -> list:
    """:func:`stat` of many URLs or paths, in threads; "" for one that does not exist (a
    :class:`RemoteError`, e.g. refused credentials, is raised)."""
    def one(u):
        try:
            return stat(u, storage_options)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return ""
        except OSError as exc:
            if not is_url(u):
                return ""
            raise remote_error(exc, u, storage_options) from None

    urls = list(urls)
    if len(urls) < 8:
        return [one(u) for u in urls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, urls))


def walk(url, storage_options=None) -> list:
    """``(url, stamp)`` of every file below folder ``url`` (any depth), sorted, from the
    store's listing alone (one request per page of keys, none per object). A local path is
    walked with :func:`os.walk`. Raises :class:`FileNotFoundError` for a folder with nothing
    below it."""
    url = str(url)
    if not is_url(url):
        out = []
        for top, _, files in os.walk(url, followlinks=True):
            for name in files:
                p = os.path.join(top, name)
                try:
                    out.append((p, stat(p)))
                except OSError:
                    out.append((p, ""))
        return sorted(out)
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path.rstrip("/"))
    found = retry(lambda: fs.find(path.rstrip("/"), detail=True), url, storage_options)
    out = [(_full(fs, p, url), stamp_of(info)) for p, info in found.items()
           if info.get("type", "file") != "directory"]
    if not out:
        raise FileNotFoundError(errno.ENOENT, "nothing below this folder", url)
    return sorted(out)


def listdir(url, storage_options=None) -> list:
    """``(url, is_folder)`` of the entries of folder ``url``, sorted."""
    url = str(url)
    if not is_url(url):
        return sorted((os.path.join(url, n), os.path.isdir(os.path.join(url, n)))
                      for n in os.listdir(url))
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path.rstrip("/"))
    entries = retry(lambda: fs.ls(path.rstrip("/"), detail=True), url, storage_options)
    return sorted((_full(fs, e["name"], url), e.get("type") == "directory") for e in entries)


# -- brace patterns -----------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def expand_braces(pattern: str) -> list:
    """Every name a webdataset-style brace pattern stands for, in order:
    ``train-{0000..0002}.tar`` -> ``train-0000.tar, train-0001.tar, train-0002.tar`` (the
    width of the first bound is kept), ``{train,test}`` -> ``train, test``, several braces
    -> their product (leftmost slowest). Text without braces is one name; an unmatched brace
    is text.

    >>> expand_braces("s3://b/{train,test}-{00..01}.tar")
    ['s3://b/train-00.tar', 's3://b/train-01.tar', 's3://b/test-00.tar', 's3://b/test-01.tar']
    """
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        step = abs(int(r.group(3) or 1)) or 1
        width = len(r.group(1)) if r.group(1).lstrip("-").startswith("0") else 0
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        choices = [str(v).zfill(width) for v in values]
    elif "," in body:
        choices = body.split(",")
    else:  # {x}: not a pattern, kept as text
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    tails = expand_braces(tail)
    return [head + c + t for c in choices for t in tails]
