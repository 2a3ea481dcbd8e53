"""Every location a user gives, local or in object storage: the one module that opens, lists,
writes and deletes them (data files, the output and checkpoint directories, a checkpoint to
resume, predict's model directory, input and output), on ``pyarrow.fs``.

A location is a local path or a URI. ``s3://bucket/key`` is S3 or any S3-compatible store, set
up the standard way, from the environment, never from the URI or a file of ours: the endpoint
from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (else AWS), the region from ``AWS_REGION``
or ``AWS_DEFAULT_REGION``, and the credentials by the AWS SDK's own chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, a profile, an instance or pod role). So no
secret passes through hvd_train: nothing of it can reach a log line, an event or a config file.
``gs://``, ``hdfs://`` and ``abfs://`` go through pyarrow's own ``FileSystem.from_uri`` (the same
code; untested here: no server for them). Any other ``scheme://`` is refused with one message
naming the supported schemes; a URI is never taken as a local folder called ``s3:``.

Writes are whole or nothing: a local file through a temporary file renamed over it
(``atomic_path``); an object by one upload, which S3 makes visible only once complete (a
multipart upload too), so a reader (``--resume auto``, a tool, a test) never sees part of one.
Object storage has no append and no rename: what grows (events.jsonl, TensorBoard's files) is
uploaded whole again. Requests time out after ``HVD_TRAIN_STORAGE_TIMEOUT`` seconds without an
answer (default 5) and are tried ``HVD_TRAIN_STORAGE_ATTEMPTS`` times (default 3), so a frozen
server costs about attempts x timeout, then one StorageError naming the object and the cause.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import re
import shutil
import tempfile
from typing import Iterator, List, Optional, Tuple
from urllib.parse import urlparse

TESTED_SCHEMES = ("s3",)  # exercised against a real server by the tests
OTHER_SCHEMES = ("gs", "hdfs", "abfs", "abfss")  # pyarrow's from_uri: same code, no server here
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_ATTEMPTS = 3
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# What this module reads from the environment: every launcher that starts ranks elsewhere passes
# the ones set, by name (launch/common.sh's STORAGE_ENV is the same list).
ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
       "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED",
       "HVD_TRAIN_STORAGE_TIMEOUT", "HVD_TRAIN_STORAGE_ATTEMPTS")


def environment() -> dict:
    """The ENV variables set in this process: what a launcher passes on to its ranks."""
    return {k: os.environ[k] for k in ENV if k in os.environ}


class StorageError(OSError):
    """A location cannot be read or written: one message naming it and the cause."""


class NotFound(StorageError, FileNotFoundError):
    """Nothing at the location (a FileNotFoundError too, for callers that wait for a file)."""


def scheme(location: str) -> Optional[str]:
    """The URI scheme of a location (lower case), or None for a local path (``file://`` too)."""
    m = _URI.match(os.fspath(location or ""))
    if not m or m.group(1).lower() == "file":
        return None
    return m.group(1).lower()


def is_remote(location: Optional[str]) -> bool:
    return bool(location) and scheme(location) is not None


def check(location: str, what: str = "location") -> None:
    """StorageError unless ``location`` is a local path or a URI of a supported scheme."""
    s = scheme(location)
    if s is not None and s not in TESTED_SCHEMES + OTHER_SCHEMES:
        raise StorageError(f"{what} {location}: unsupported scheme {s}://; supported are local paths, "
                           + ", ".join(f"{x}://" for x in TESTED_SCHEMES + OTHER_SCHEMES))
    if s is not None and not location.split("://", 1)[1].strip("/"):
        raise StorageError(f"{what} {location}: no bucket in the URI ({s}://BUCKET/PREFIX)")


def absolute(location: str) -> str:
    """A local path made absolute (``file://`` dropped), a URI with no trailing slash."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    if is_remote(location):
        check(location)
        return location.rstrip("/")
    return os.path.abspath(location)


def join(location: str, *names: str) -> str:
    location = os.fspath(location)
    if is_remote(location):
        return "/".join([location.rstrip("/"), *names])
    return os.path.join(location, *names)


def parent(location: str) -> str:
    if is_remote(location):
        head, _, _ = location.rstrip("/").rpartition("/")
        return head if "://" in head and head.split("://", 1)[1] else location
    return os.path.dirname(location)


def basename(location: str) -> str:
    return location.rstrip("/").rpartition("/")[2] if is_remote(location) else os.path.basename(location)


# --- the filesystems -----------------------------------------------------------------------


def settings() -> Tuple[float, int]:
    """(request timeout in seconds, attempts per request) from the environment."""
    try:
        timeout = float(os.environ.get("HVD_TRAIN_STORAGE_TIMEOUT", DEFAULT_TIMEOUT_S))
        attempts = int(os.environ.get("HVD_TRAIN_STORAGE_ATTEMPTS", DEFAULT_ATTEMPTS))
    except ValueError:
        raise StorageError("HVD_TRAIN_STORAGE_TIMEOUT must be seconds and HVD_TRAIN_STORAGE_ATTEMPTS a count") from None
    if timeout <= 0 or attempts < 1:
        raise StorageError("HVD_TRAIN_STORAGE_TIMEOUT must be > 0 and HVD_TRAIN_STORAGE_ATTEMPTS >= 1")
    return timeout, attempts


def endpoint() -> Optional[str]:
    """The S3 endpoint the environment names (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL), or None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _credentials_key() -> str:
    """A digest of the credentials in the environment: a filesystem is made again when they
    change (the SDK reads them once per filesystem). Only compared, never shown."""
    import hashlib

    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _s3(end: Optional[str], region: Optional[str], timeout: float, attempts: int, credentials: str):
    import pyarrow.fs as pafs

    options = {"region": region or "us-east-1", "connect_timeout": timeout, "request_timeout": timeout,
               "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if end:
        url = urlparse(end if "://" in end else f"https://{end}")
        options.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
    # Credentials: the AWS SDK's default chain (environment, profile, instance role), never ours.
    return pafs.S3FileSystem(**options)


@functools.lru_cache(maxsize=None)
def _from_uri(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)[0]


def resolve(location: str):
    """(pyarrow filesystem, path within it) of a location."""
    import pyarrow.fs as pafs

    location = os.fspath(location)
    s = scheme(location)
    if s is None:
        if location.startswith("file://"):
            location = location[len("file://"):]
        return pafs.LocalFileSystem(), os.path.abspath(location)
    check(location)
    rest = location.split("://", 1)[1]
    if s == "s3":
        timeout, attempts = settings()
        return _s3(endpoint(), os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                   timeout, attempts, _credentials_key()), rest.rstrip("/")
    netloc = rest.split("/", 1)[0]
    return _from_uri(f"{s}://{netloc}"), pafs.FileSystem.from_uri(location)[1]


def describe(err: BaseException, location: str) -> str:
    """One line: the location and the cause of a storage error (AWS's texts made plain; never a secret)."""
    text = str(err)
    if isinstance(err, FileNotFoundError) or "NoSuchKey" in text or "NO_SUCH_KEY" in text:
        cause = "no such object"
    elif "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        cause = "no such bucket"
    elif any(k in text for k in ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID",
                                 "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        cause = ("access denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                 "AWS_SESSION_TOKEN, the profile or the instance role) and their permissions")
    elif "curlCode: 28" in text or "Timeout was reached" in text:
        timeout, attempts = settings()
        cause = (f"the storage did not answer ({attempts} attempt(s), {timeout:g} s each; "
                 f"HVD_TRAIN_STORAGE_TIMEOUT, HVD_TRAIN_STORAGE_ATTEMPTS)")
    elif "curlCode: 7" in text or "Could not connect" in text or "curlCode: 6" in text:
        cause = f"cannot connect to the storage endpoint {endpoint() or 'of AWS'}"
    elif isinstance(err, StorageError):
        return text
    else:
        cause = text.splitlines()[0] if text else type(err).__name__
        cause = getattr(err, "strerror", None) or cause
    return f"{location}: {cause}"


def cause(err: BaseException) -> str:
    """Why an OSError happened, without its path: "No space left on device" (ENOSPC), "Read-only
    file system", ...; a StorageError's own text (it names its location)."""
    if isinstance(err, StorageError) or not getattr(err, "strerror", None):
        return str(err) or type(err).__name__
    return err.strerror


@contextlib.contextmanager
def _errors(location: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as err:
        raise NotFound(describe(err, location)) from None
    except OSError as err:  # pyarrow's errors are OSError (PermissionError, ...)
        raise StorageError(describe(err, location)) from None


# --- reading ----------------------------------------------------------------------------------


def info(location: str):
    """pyarrow FileInfo of a location (type NotFound when there is nothing)."""
    fs, path = resolve(location)
    with _errors(location):
        return fs.get_file_info(path)


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    return info(location).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    """A local directory, or a prefix with objects under it (object stores have no empty folders)."""
    import pyarrow.fs as pafs

    t = info(location).type
    if t == pafs.FileType.Directory:
        return True
    if t == pafs.FileType.NotFound and is_remote(location):
        return bool(list_files(location, limit=1))
    return False


def is_file(location: str) -> bool:
    import pyarrow.fs as pafs

    return info(location).type == pafs.FileType.File


def size(location: str) -> int:
    import pyarrow.fs as pafs

    found = info(location)
    if found.type != pafs.FileType.File:
        raise StorageError(f"{location}: no such file")
    return int(found.size)


def list_files(location: str, limit: Optional[int] = None) -> List[Tuple[str, int]]:
    """(location, size) of the files directly in a directory or prefix, sorted by name."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    with _errors(location):
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    files = sorted((join(location, os.path.basename(f.path.rstrip("/"))), int(f.size))
                   for f in found if f.type == pafs.FileType.File)
    return files[:limit] if limit else files


def walk_files(location: str) -> List[Tuple[str, int]]:
    """(location, size) of every file under a directory or prefix, at any depth, sorted (one
    recursive listing: a single request series for a prefix, not one per folder)."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    with _errors(location):
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    base = path.rstrip("/")
    return sorted((join(location, *f.path[len(base):].strip("/").split("/")), int(f.size))
                  for f in found if f.type == pafs.FileType.File)


def names(location: str) -> List[str]:
    """The names of the files and folders (prefixes) directly in a directory or prefix, sorted."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    with _errors(location):
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(os.path.basename(f.path.rstrip("/")) for f in found)


def glob(pattern: str) -> List[Tuple[str, int]]:
    """(location, size) of the files a pattern matches: wildcards in the last part only, for a URI."""
    if not is_remote(pattern):
        import glob as local_glob

        return [(p, os.path.getsize(p)) for p in sorted(local_glob.glob(pattern)) if os.path.isfile(p)]
    head, name = parent(pattern), basename(pattern)
    if any(ch in head.split("://", 1)[1] for ch in "*?["):
        raise StorageError(f"{pattern}: wildcards are supported in the last part of a URI only")
    return [(p, s) for p, s in list_files(head) if fnmatch.fnmatchcase(basename(p), name)]


def has_magic(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def open_input(location: str):
    """A seekable pyarrow file (local or ranged reads of an object); FileNotFoundError if missing."""
    fs, path = resolve(location)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise StorageError(describe(err, location)) from None


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with _errors(location):
        with fs.open_input_stream(path) as f:
            return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[str]:
    """A local path holding the file at ``location``: itself when local, else a downloaded copy
    (removed after)."""
    if not is_remote(location):
        yield os.path.abspath(location)
        return
    folder = tempfile.mkdtemp(prefix="hvd_train-download-")
    try:
        path = os.path.join(folder, basename(location))
        with open(path, "wb") as f:
            f.write(read_bytes(location))
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- writing ----------------------------------------------------------------------------------


def make_dirs(location: str) -> None:
    """A local directory and its parents; nothing for a URI (object stores have no folders)."""
    if not is_remote(location):
        os.makedirs(location, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = False) -> Iterator[str]:
    """A local file, complete or not at all: yields a temporary path beside ``path`` to write,
    renamed over ``path`` on success, removed on failure (a run killed mid-write leaves at most
    a ``*.tmp*`` file, which nothing reads). The temporary name keeps the extension
    (``model.tmp.keras``). ``durable``: fsync the file and its directory, so the rename survives a crash."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if durable:
        _fsync(os.path.dirname(os.path.abspath(path)))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # a file or a directory: fsync needs no write access
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(location: str, data: bytes, durable: bool = False) -> None:
    """The whole file or object, or nothing (``durable``: local files fsynced, file and folder)."""
    if not is_remote(location):
        with atomic_path(location, durable) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return
    fs, path = resolve(location)
    with _errors(location):
        with fs.open_output_stream(path) as f:  # visible only when the upload completes
            f.write(data)


def write_text(location: str, text: str, durable: bool = False) -> None:
    write_bytes(location, text.encode(), durable)


def upload(local_path: str, location: str) -> None:
    """A local file to a location, whole."""
    with open(local_path, "rb") as f:
        write_bytes(location, f.read())


@contextlib.contextmanager
def writing(location: str) -> Iterator[str]:
    """A local temporary path to write (it keeps the extension: some writers pick the format
    from it); on success it becomes ``location`` whole: renamed (local) or uploaded (URI)."""
    if not is_remote(location):
        with atomic_path(location) as tmp:
            yield tmp
        return
    folder = tempfile.mkdtemp(prefix="hvd_train-upload-")
    try:
        tmp = os.path.join(folder, basename(location))
        yield tmp
        upload(tmp, location)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Appender:
    """Lines added to a file as they come (events.jsonl): appended locally, one whole write of
    one line, so a reader tailing it never sees half a record; an object has no append, so it
    is uploaded whole again each time, earlier content (a resumed run's) kept."""

    def __init__(self, location: str):
        self.location, self.text, self.pending = location, None, ""

    def add(self, line: str) -> None:
        self.pending += line  # kept if what follows fails: the next call carries it
        if not is_remote(self.location):
            self._append_local()
            return
        if self.text is None:
            self.text = read_text(self.location) if is_file(self.location) else ""
        write_text(self.location, self.text + self.pending)
        self.text, self.pending = self.text + self.pending, ""


    def _append_local(self) -> None:
        """The pending lines appended; on a failure (a full disk) the file is cut back to where
        it was, so no half line is left, and the lines stay pending."""
        data = self.pending.encode()
        try:
            fd = os.open(self.location, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise StorageError(f"{self.location}: {cause(err)}") from None
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:  # unbuffered: a short write is seen, not flushed later
                    data = data[os.write(fd, data):]
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise StorageError(f"{self.location}: {cause(err)}") from None
        finally:
            os.close(fd)
        self.pending = ""


def read_lines(location: str) -> List[str]:
    return read_text(location).splitlines()


class Mirror:
    """A local folder whose files are written by a library that cannot write object storage
    (TensorBoard's summary writer: TensorFlow 2.21 has no s3:// filesystem), kept in step with a
    location: ``sync`` uploads, whole, each file that changed since the last sync. For a local
    location the folder is the location itself and ``sync`` does nothing."""

    def __init__(self, location: str):
        self.location, self.remote = location, is_remote(location)
        self.folder = tempfile.mkdtemp(prefix="hvd_train-mirror-") if self.remote else location
        self.sent: dict = {}

    def sync(self) -> None:
        if not self.remote:
            return
        for root, _, found in os.walk(self.folder):
            for name in found:
                path = os.path.join(root, name)
                stat = os.stat(path)
                if self.sent.get(path) != (stat.st_size, stat.st_mtime_ns):
                    upload(path, join(self.location, *os.path.relpath(path, self.folder).split(os.sep)))
                    self.sent[path] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        if self.remote:
            try:
                self.sync()
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)


def delete(location: str) -> None:
    """Remove a file or object; nothing if it is gone already."""
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(describe(err, location)) from None


def missing_bucket(location: str) -> None:
    """StorageError "no such bucket" when a URI's bucket does not exist (some servers would
    create it on the first write; AWS would refuse every write)."""
    import pyarrow.fs as pafs

    head = location.split("://", 1)
    bucket = f"{head[0]}://{head[1].split('/', 1)[0]}"
    if info(bucket).type == pafs.FileType.NotFound:
        raise StorageError(f"{location}: no such bucket")


def _check_local_writable(path: str, what: str) -> None:
    """The folder can be made and written; whatever this check made is removed again, so bad
    input leaves nothing behind (the run makes its folders when training starts)."""
    created = None  # the outermost directory this check creates
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        created, probe = probe, os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise StorageError(f"{what} {path} is not writable: {err.strerror or err}") from None
    finally:
        if created:
            shutil.rmtree(created, ignore_errors=True)


def check_writable(location: str, what: str) -> None:
    """StorageError unless a file can be written into the directory or prefix (a probe, removed again)."""
    check(location, what)
    if not is_remote(location):
        _check_local_writable(os.path.abspath(location), what)
        return
    probe = join(location, f".write-check-{os.getpid()}")
    try:
        missing_bucket(location)
        write_bytes(probe, b"")
        delete(probe)
    except StorageError as err:
        raise StorageError(f"{what} {location} is not writable: {str(err).split(': ', 1)[-1]}") from None
