"""The backup archive: one uncompressed tar, every member checksummed, ``manifest.json`` last.

An archive is written under a temporary name beside its final one (``.NAME.partial-<hex>``), fsynced,
then renamed: a reader never sees a half-written archive under the final name, and a crash leaves the
previous archive of that name as it was. The manifest names every other member with its size and
sha256; ``ArchiveReader.verify`` checks them all before a restore touches anything. Blobs are already
compressed images and vectors are float16, so the tar is not compressed (compressing costs CPU for a
few per cent).

Members (retriever/backup/collection.py and shard.py write the ``kbs/`` ones, server/backup_tables.py the
``db/`` ones). A KB's entry in the manifest names its ``method``: ``"edge-shard"`` (format 2, the embedded
store: its shard's files as they are on disk) or ``"logical"`` (a Qdrant server, ``--format logical``,
and every format-1 archive)::

    kbs/<kb>/shard/<path>            edge-shard: a file of the Edge shard directory (segments, WAL, config, meta)
    kbs/<kb>/blob-keys.txt           edge-shard: the blob keys of the KB at the backup (every one its points
                                     reference; with local blobs all the KB's blob store held), one a line
    kbs/<kb>/points.jsonl            logical: one point a line: {"id", "payload", "vectors": [names], "sparse"}
    kbs/<kb>/vectors/<name>.f16      logical: that vector's rows, float16 little-endian, in points.jsonl order
    kbs/<kb>/blobs/<key>             a blob's bytes under its content-addressed key
    db/<table>.jsonl                 rows of the SQL tables (catalog, answers, feedback)
    manifest.json                    see ``MANIFEST_FIELDS``
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Self, TypeVar

from retriever.errors import InvalidInput

FORMAT = "vlmrag-backup"
#: 2: a KB may be archived as its Edge shard's files (``method`` "edge-shard"); 1: logical only
FORMAT_VERSION = 2
#: the versions this vlmrag restores (1 is read as the logical format it always was)
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PARTIAL_MARK = ".partial-"
#: manifest keys: format, format_version, vlmrag_version, created_at, kind ("full" | "incremental"),
#: base ({"file", "manifest_sha256"} of the archive an incremental one leaves blobs in), kbs
#: ({name: collection entry, collection.py}), embedders ([{"id", "dim"}]), database ({table: rows}),
#: members ({path: {"size", "sha256"}})
MANIFEST_FIELDS = ("format", "format_version", "vlmrag_version", "created_at", "kind", "base", "kbs",
                   "embedders", "database", "members")
_CHUNK = 1 << 20
#: tar's block: every header and every member's padded bytes are whole blocks
BLOCK = tarfile.BLOCKSIZE
T = TypeVar("T")


def vlmrag_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlmrag")
    except PackageNotFoundError:
        return "unknown"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar_header(name: str, size: int, mtime: int) -> bytes:
    """A ustar header (what tarfile writes for a short ASCII name), built without TarInfo (~10x faster)."""
    raw = name.encode("ascii")
    header = bytearray(512)
    header[0:len(raw)] = raw
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(mtime, 12)
    header[148:156] = b" " * 8
    header[156:157] = tarfile.REGTYPE
    header[257:265] = tarfile.POSIX_MAGIC
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@functools.lru_cache(maxsize=4)
def _ustar_parts(mtime: int) -> tuple[bytes, bytes, bytes, int]:
    """The fixed fields of ``_ustar_header`` (mode..gid, mtime, type..end) and the checksum they add."""
    template = _ustar_header("", 0, mtime)
    before, mtime_field, tail = template[100:124], template[136:148], template[156:]
    return before, mtime_field, tail, sum(before) + sum(mtime_field) + 8 * 32 + sum(tail)


def _fast_ustar_header(raw: bytes, size: int, mtime: int) -> bytes:
    """``_ustar_header`` from cached parts (~2 µs: the header of every blob)."""
    before, mtime_field, tail, fixed = _ustar_parts(mtime)
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (fixed + sum(raw) + sum(size_field))
    return raw + b"\0" * (100 - len(raw)) + before + size_field + mtime_field + checksum + tail


def member_header(name: str, size: int, mtime: int) -> bytes:
    """The tar header of member ``name``: ustar, or PAX first for a long or non-ASCII name, a huge size."""
    if len(name) <= 100 and name.isascii() and size < 8**11:
        return _fast_ustar_header(name.encode("ascii"), size, mtime)
    info = tarfile.TarInfo(name)  # a long or non-ASCII name, a huge file: a PAX header first
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


#: the write-back of the partial archive is started every this many bytes (``ArchiveWriter._write``)
_WRITEBACK_EVERY = 32 << 20
_SYNC_WRITE = ctypes.c_uint(2)  # SYNC_FILE_RANGE_WRITE


def _load_sync_file_range() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).sync_file_range  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux: the final fsync does it all
        return None


_sync_file_range = _load_sync_file_range()


#: files up to this size are read in one piece (blobs); larger ones (shard segments) are streamed
_WHOLE = 8 << 20


class ArchiveWriter:
    """Writes members into ``.NAME.partial-<hex>``; ``finish`` adds the manifest and renames it to ``final``.

    The tar framing is written here (a header, the bytes, padding to 512; two zero blocks at the end):
    ``tarfile`` costs ~45 µs a member, most of a backup of 50k small blobs; this ~15 µs.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.final.parent / f".{self.final.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}"
        self._file = open(self.partial, "wb", buffering=_CHUNK)  # noqa: SIM115 - closed by finish/abort
        self._offset = 0
        self._written_back = 0  # the offset up to which the write-back was started
        self._mtime = int(time.time())
        self.members: dict[str, dict[str, Any]] = {}

    def check_new(self, name: str) -> None:
        """ValueError when ``name`` is already a member (or the manifest's name)."""
        if name in self.members or name == MANIFEST:
            raise ValueError(f"archive member {name} written twice")

    @property
    def mtime(self) -> int:
        """The mtime of every member (the backup's start)."""
        return self._mtime

    def fileno(self) -> int:
        return self._file.fileno()

    def reserve(self, size: int) -> int:
        """Leave ``size`` bytes here for another thread to ``pwrite`` (members.py); returns their offset.

        What ``write`` adds from now on goes after them."""
        self._file.flush()
        start = self._offset
        self._offset += size
        self._file.seek(self._offset)
        return start

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing ``length`` bytes at ``offset`` to disk, not waiting: the fsync of ``finish`` then has
        little left (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; the pages stay cached)."""
        if _sync_file_range is not None:
            _sync_file_range(self._file.fileno(), ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_WRITE)

    def record(self, name: str, size: int, sha256: str) -> None:
        """Note member ``name``, written by the caller, for the manifest."""
        self.members[name] = {"size": size, "sha256": sha256}

    def write(self, data: bytes) -> None:
        """Append framed bytes (headers, member bytes, padding) at the end of the archive."""
        self._write(data)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._offset += len(data)
        if self._offset - self._written_back >= _WRITEBACK_EVERY:
            self.start_writeback(self._written_back, self._offset - self._written_back)
            self._written_back = self._offset

    def add_file(self, name: str, path: Path) -> None:
        """Add the file ``path`` as ``name`` (FileNotFoundError before anything is written when it is gone)."""
        self.check_new(name)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size <= _WHOLE:  # a blob: one read, no file object (~5 µs less a member)
                data = os.read(fd, size + 1)
                if len(data) != size:
                    data = _pread(fd, size + 1, 0)
                if len(data) != size:
                    raise OSError(f"{path} changed size while it was archived")
                self._write(member_header(name, size, self._mtime) + data + _padding(size))
                self.members[name] = {"size": size, "sha256": hashlib.sha256(data).hexdigest()}
                return
        finally:
            os.close(fd)
        with open(path, "rb") as source:  # a shard segment: streamed
            self._write(member_header(name, size, self._mtime))
            digest, done = hashlib.sha256(), 0
            while done < size and (chunk := source.read(min(_CHUNK, size - done))):
                digest.update(chunk)
                self._write(chunk)
                done += len(chunk)
            if done != size:
                raise OSError(f"{path} changed size while it was archived")
            self._write(_padding(size))
        self.members[name] = {"size": size, "sha256": digest.hexdigest()}

    def add_bytes(self, name: str, data: bytes) -> None:
        self.check_new(name)
        self._write(member_header(name, len(data), self._mtime) + data + _padding(len(data)))
        self.members[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Add the manifest (with every member's checksum), make it durable, rename to the final name."""
        manifest = {**manifest, "members": dict(sorted(self.members.items()))}
        # compact: json's C encoder (an indented dump goes through Python, ~0.3 s for 50k members)
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
        self._write(member_header(MANIFEST, len(data), self._mtime) + data + _padding(len(data)))
        end = self._offset + 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks, then a whole record
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.final)
        _fsync_dir(self.final.parent)
        return manifest

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        self.partial.unlink(missing_ok=True)


def bad_archive(path: Path, why: str) -> InvalidInput:
    return InvalidInput(f"backup archive {path} {why}; nothing was changed", param="archive",
                        code="bad_backup_archive")


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:  # a short read (a signal, a pipe): go on; b"" is the end of the file
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # base-256 (GNU, huge sizes)
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def scan_tar(fd: int, file_size: int) -> dict[str, tuple[int, int]]:
    """``{name: (offset of its bytes, size)}`` of the regular files of a tar, reading only the headers.

    ``tarfile`` builds a TarInfo a member (~20 µs: 1 s for 50k blobs); this reads each 512-byte header
    with one ``pread`` (ustar, PAX ``path``/``size`` records, GNU long names). A member cut short by the
    end of the file ends the scan (a truncated archive then lacks its manifest); a header whose checksum
    fails raises ``tarfile.ReadError``.
    """
    index: dict[str, tuple[int, int]] = {}
    offset, pax, long_name = 0, {}, None
    block = tarfile.BLOCKSIZE
    while offset + block <= file_size:
        header = _pread(fd, block, offset)
        if len(header) < block or header == NUL_BLOCK:
            break
        stored = _number(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.ReadError(f"bad header checksum at byte {offset}")
        size, kind, data = _number(header[124:136]), header[156:157], offset + block
        if data + size > file_size:
            break
        if kind in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
            payload = _pread(fd, size, data)
            if kind == tarfile.XHDTYPE:
                pax = _pax_records(payload)
            else:
                long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind != tarfile.XGLTYPE:
            if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") \
                    if header[257:263] == b"ustar\0" else ""
                name = pax.get("path") or long_name or (f"{prefix}/{name}" if prefix else name)
                size = int(pax.get("size", size))
                if data + size > file_size:
                    break
                index[name] = (data, size)
            pax, long_name = {}, None
        offset = data + size + (-size % block)
    return index


NUL_BLOCK = b"\0" * tarfile.BLOCKSIZE


class _Member(io.RawIOBase):
    """One member's bytes, read with ``pread`` (members open at once do not disturb one another)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        got = os.preadv(self.fd, [memoryview(buffer)[:n]], self.start + self.pos)
        self.pos += got
        return got


class ArchiveReader:
    """An archive opened for reading: its manifest checked on open, members verified by ``verify``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InvalidInput(f"no backup archive {self.path}", param="archive", code="not_found")
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._index = scan_tar(self._fd, os.fstat(self._fd).st_size)
        except (tarfile.TarError, OSError, ValueError) as exc:
            os.close(self._fd)
            raise bad_archive(self.path, f"is not a readable tar ({exc}): truncated or not a vlmrag backup") from exc
        try:
            self._check_manifest()
        except BaseException:
            os.close(self._fd)
            raise

    def _check_manifest(self) -> None:
        self.manifest_bytes = self._read_manifest()
        self.manifest_sha256 = hashlib.sha256(self.manifest_bytes).hexdigest()
        try:
            manifest = json.loads(self.manifest_bytes)
        except ValueError as exc:
            raise bad_archive(self.path, "has a manifest that is not JSON (corrupted)") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise bad_archive(self.path, "is not a vlmrag backup (no vlmrag manifest)")
        if manifest.get("format_version") not in READ_VERSIONS:
            raise bad_archive(self.path, f"has format version {manifest.get('format_version')!r}; this vlmrag "
                              f"({vlmrag_version()}) reads versions {', '.join(map(str, READ_VERSIONS))}")
        if not isinstance(manifest.get("members"), dict) or not isinstance(manifest.get("kbs"), dict):
            raise bad_archive(self.path, "has a manifest without members or kbs (corrupted)")
        self.manifest: dict[str, Any] = manifest

    def _read_manifest(self) -> bytes:
        member = self._index.get(MANIFEST)
        if member is None:
            raise bad_archive(self.path, "has no manifest: it is truncated (or the backup did not finish)")
        data = _pread(self._fd, member[1], member[0])
        if len(data) != member[1]:
            raise bad_archive(self.path, "is truncated inside its manifest")
        return data

    @property
    def members(self) -> dict[str, dict[str, Any]]:
        return self.manifest["members"]

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.members if n.startswith(prefix))

    def verify(self) -> None:
        """Check every member's size and sha256 against the manifest (InvalidInput on the first mismatch)."""
        extra = sorted(set(self._index) - set(self.members) - {MANIFEST})
        if extra:
            raise bad_archive(self.path, f"holds {extra[0]}, which its manifest does not list (corrupted)")
        for name, expected in self.members.items():
            member = self._index.get(name)
            if member is None:
                raise bad_archive(self.path, f"lacks {name}, which its manifest lists: it is truncated")
            digest, size = hashlib.sha256(), 0
            try:
                for chunk in self._chunks(name):
                    digest.update(chunk)
                    size += len(chunk)
            except OSError as exc:
                raise bad_archive(self.path, f"cannot be read at {name} ({exc}): it is truncated") from exc
            if size != expected.get("size"):
                raise bad_archive(self.path, f"has {size} bytes of {name}, not {expected.get('size')}: truncated")
            if digest.hexdigest() != expected.get("sha256"):
                raise bad_archive(self.path, f"fails the checksum of {name}: it is corrupted")

    def _chunks(self, name: str) -> Iterator[bytes]:
        start, size = self._index[name]
        for offset in range(start, start + size, _CHUNK):
            chunk = _pread(self._fd, min(_CHUNK, start + size - offset), offset)
            if not chunk:
                return
            yield chunk

    def open(self, name: str) -> IO[bytes]:
        member = self._index.get(name)
        if member is None:
            raise bad_archive(self.path, f"lacks {name}")
        return io.BufferedReader(_Member(self._fd, *member), _CHUNK)

    def read(self, name: str) -> bytes:
        member = self._index.get(name)
        if member is None:
            raise bad_archive(self.path, f"lacks {name}")
        return _pread(self._fd, member[1], member[0])

    def extract(self, name: str, dest: Path) -> None:
        """Copy member ``name`` to the new file ``dest`` (blocking; not fsynced: the caller syncs once)."""
        with self.open(name) as handle, open(dest, "xb") as out:
            shutil.copyfileobj(handle, out, _CHUNK)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def run_niced(fn: Callable[..., T], *args: Any, nice: int = 10) -> T:
    """``fn(*args)`` on a thread of its own at ``nice`` (Linux nices threads one by one), awaited.

    Writing an archive is reads, sha256 and writes (all outside the GIL): on its own low-priority thread
    it takes the cores searches leave idle. Cancelled, it waits for the thread (it cannot be stopped).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            if nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
        except (OSError, AttributeError):
            pass  # not Linux, or not allowed: run at the normal priority
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=body, name="vlmrag-backup-writer", daemon=True)
    thread.start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.gather(future, return_exceptions=True)
        raise


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an archive (checked for format and version, members not verified)."""
    with ArchiveReader(path) as reader:
        return reader.manifest


def stale_partials(directory: Path) -> list[Path]:
    """Temporary files of backups that never finished (killed) in ``directory``."""
    return sorted(p for p in Path(directory).glob(f".*{PARTIAL_MARK}*") if p.is_file())
