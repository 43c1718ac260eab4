"""Bulk members of an archive: a shard's files copied by the kernel, content-addressed blobs in a tight loop.

A backup of the embedded store is ~340 MB of shard files and ~50k small blobs at 100k points; written
one member at a time through Python it took ~2x ``tar`` of the data dir. Two writers here share the
work across the cores while the shard is frozen:

* ``ReservedFiles`` (the shard): files whose sizes are fixed (the store's writes wait) get a region of
  the archive reserved for them (``ArchiveWriter.reserve``); a thread fills it with ``pwrite`` of each
  header and ``os.copy_file_range`` of the bytes (no copy through Python; ``pread``/``pwrite`` where the
  file system cannot), and hashes each file from an ``mmap`` (sha256 outside the GIL).
* ``add_blob_files`` (local blobs): written after that region through the archive's buffered file, at
  the same time: open, one read, a cached ustar header. A blob's key is the sha256 of its bytes
  (retriever/blobs.py), so its member's checksum is the key's: not computed again. A restore verifies
  the bytes against it as against any member's (and checks each blob against its key besides).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

from retriever.backup.archive import BLOCK, ArchiveWriter, member_header

#: errors of ``copy_file_range`` that mean "not here" (another file system, an old kernel): pread/pwrite instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
_COPY_CHUNK = 8 << 20


def blob_sha256(key: str) -> str:
    """The sha256 hex of the bytes of content-addressed blob ``key`` (``ab/<62 hex>.png``)."""
    return key[:2] + key[3:65]


class ReservedFiles:
    """Files of known, fixed sizes, framed into a reserved region of ``writer`` by ``copy`` (blocking)."""

    def __init__(self, writer: ArchiveWriter, files: list[tuple[str, Path]]) -> None:
        self.writer = writer
        self.plan: list[tuple[str, Path, bytes, int]] = []  # name, source, header, size
        total = 0
        for name, path in files:
            size = path.stat().st_size
            header = member_header(name, size, writer.mtime)
            self.plan.append((name, path, header, size))
            total += len(header) + size + (-size % BLOCK)
        self.start = writer.reserve(total)
        self.size = total

    def copy(self) -> None:
        """Write every planned member into the region (OSError when a file changed size meanwhile)."""
        out, offset = self.writer.fileno(), self.start
        for name, path, header, size in self.plan:
            self.writer.check_new(name)
            os.pwrite(out, header, offset)
            offset += len(header)
            fd = os.open(path, os.O_RDONLY)
            try:
                if os.fstat(fd).st_size != size:
                    raise OSError(f"{path} changed size while it was archived")
                _copy_range(fd, out, size, offset)
                digest = _sha256_of(fd, size)
            finally:
                os.close(fd)
            offset += size + (-size % BLOCK)  # the padding stays a hole: it reads as zeros
            if size >= 4 << 20:
                self.writer.start_writeback(offset - size - (-size % BLOCK), size)
            self.writer.record(name, size, digest)
        if offset != self.start + self.size:
            raise OSError("the reserved shard region was not filled as planned")


def _copy_range(src: int, dst: int, size: int, dst_offset: int) -> None:
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, dst_offset + done)
            if n == 0:
                raise OSError("a file shrank while it was archived")
            done += n
        return
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY:
            raise
    while done < size:  # no in-kernel copy here: through a buffer
        chunk = os.pread(src, min(_COPY_CHUNK, size - done), done)
        if not chunk:
            raise OSError("a file shrank while it was archived")
        os.pwrite(dst, chunk, dst_offset + done)
        done += len(chunk)


def _sha256_of(fd: int, size: int) -> str:
    if size == 0:
        return hashlib.sha256(b"").hexdigest()
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as view:
        return hashlib.sha256(view).hexdigest()  # one call: hashlib releases the GIL while it hashes


def add_blob_files(writer: ArchiveWriter, prefix: str, root: str, keys: Iterable[str]) -> list[str]:
    """Blobs ``root/<key>`` as members ``prefix<key>`` (blocking); returns the keys whose files are gone.

    ~10 µs a blob: no ``Path``, no hashing (the key is the sha256), the header from cached parts.
    """
    missing: list[str] = []
    write, record, check, mtime = writer.write, writer.record, writer.check_new, writer.mtime
    zeros = b"\0" * BLOCK
    for key in keys:
        name = prefix + key
        check(name)
        try:
            fd = os.open(f"{root}/{key}", os.O_RDONLY)
        except FileNotFoundError:
            missing.append(key)
            continue
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size + 1)
            while len(data) < size and (more := os.read(fd, size - len(data))):
                data += more
        finally:
            os.close(fd)
        if len(data) != size:
            raise OSError(f"{root}/{key} changed size while it was archived")
        write(member_header(name, size, mtime) + data + zeros[:-size % BLOCK])
        record(name, size, blob_sha256(key))
    return missing
