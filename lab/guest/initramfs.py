"""Writing of gzip-compressed newc cpio archives, the format the Linux kernel unpacks as initramfs.

The archive is written in Python, so device nodes such as /dev/console need
no mknod on the build host, and every header has uid 0, gid 0 and mtime 0:
the same entries always give the same bytes.
"""

from __future__ import annotations

import gzip
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: ``path`` without a leading slash, ``mode`` with its file type bits."""

    path: str
    mode: int
    data: bytes = b""
    device: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, path: str) -> CpioEntry:
        return cls(path, stat.S_IFDIR | 0o755)

    @classmethod
    def file(cls, path: str, data: bytes, permissions: int = 0o644) -> CpioEntry:
        return cls(path, stat.S_IFREG | permissions, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> CpioEntry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, permissions: int = 0o600) -> CpioEntry:
        return cls(path, stat.S_IFCHR | permissions, device=(major, minor))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(inode: int, entry: CpioEntry | None) -> bytes:
    if entry is None:
        name, mode, data, device, links = _TRAILER, 0, b"", (0, 0), 1
    else:
        name, mode, data, device = entry.path, entry.mode, entry.data, entry.device
        links = 2 if stat.S_ISDIR(mode) else 1
    encoded_name = name.encode() + b"\0"
    fields = (inode, mode, 0, 0, links, 0, len(data), 0, 0, device[0], device[1],
              len(encoded_name), 0)
    header = _NEWC_MAGIC + b"".join(b"%08X" % field for field in fields)
    # The name is padded so the data starts on a 4-byte boundary, counting the
    # 110-byte header, and the data is padded to the next member's header.
    return header + encoded_name + _padding(len(header) + len(encoded_name)) + data + _padding(len(data))


def newc_archive(entries: list[CpioEntry]) -> bytes:
    """Return the uncompressed newc cpio archive of ``entries``, in their order.

    Parent folders must come before their contents. A path must be relative
    and appear once.
    """
    seen: set[str] = set()
    parts = []
    for inode, entry in enumerate(entries, start=1):
        if entry.path.startswith("/") or not entry.path or entry.path in seen:
            raise ValueError(f"invalid cpio member path {entry.path!r}: paths must be relative, "
                             "non-empty and unique")
        seen.add(entry.path)
        parts.append(_member(inode, entry))
    parts.append(_member(0, None))
    return b"".join(parts)


def write_initramfs(entries: list[CpioEntry], target: Path) -> int:
    """Write ``entries`` as a gzip'd newc cpio archive to ``target`` and return its size in bytes."""
    compressed = gzip.compress(newc_archive(entries), compresslevel=9, mtime=0)
    target.write_bytes(compressed)
    return len(compressed)


def is_static_elf(path: Path) -> bool:
    """Return True if ``path`` is a 64-bit little-endian ELF executable without a program interpreter.

    A dynamically linked program has a PT_INTERP header naming its loader,
    which an initramfs does not contain.
    """
    with path.open("rb") as stream:
        header = stream.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return False
        table_offset, = struct.unpack_from("<Q", header, 0x20)
        entry_size, count = struct.unpack_from("<HH", header, 0x36)
        stream.seek(table_offset)
        table = stream.read(entry_size * count)
    pt_interp = 3
    for index in range(count):
        segment_type, = struct.unpack_from("<I", table, index * entry_size)
        if segment_type == pt_interp:
            return False
    return True
