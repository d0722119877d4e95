"""Damage a real LMDB file the ways the field does, for the corruption tests.

Written from LMDB's on-disk layout (mdb.c, 64-bit) on its own, apart from
memtable.backends.lmdb_check, so that the check is tested against files its
own code did not shape: a 16-byte page header (pgno, pad, flags, lower,
upper), MDB_meta after it on pages 0 and 1 (magic, version, address, map
size, the free and main MDB_db of 48 bytes each, last page, txn id), 8-byte
nodes (lo, hi, flags, key size).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

HEADER = 16
DB_SIZE = 48
DBS_AT = HEADER + 24
P_LEAF = 0x02


@dataclass(frozen=True)
class Layout:
    psize: int
    free_root: int
    free_depth: int
    main_root: int
    main_depth: int


def layout(data: bytes) -> Layout:
    """Roots and depths of the newest meta page."""
    psize = struct.unpack_from("<I", data, DBS_AT)[0]
    metas = []
    for number in (0, 1):
        at = number * psize
        txnid = struct.unpack_from("<Q", data, at + DBS_AT + 2 * DB_SIZE + 8)[0]
        free_depth, free_root = _db(data, at + DBS_AT)
        main_depth, main_root = _db(data, at + DBS_AT + DB_SIZE)
        metas.append((txnid, Layout(psize, free_root, free_depth, main_root, main_depth)))
    return max(metas, key=lambda meta: meta[0])[1]


def _db(data: bytes, at: int) -> tuple[int, int]:
    depth = struct.unpack_from("<H", data, at + 6)[0]
    root = struct.unpack_from("<Q", data, at + 40)[0]
    return depth, root


def free_main_root(db_file: Path) -> int:
    """What two unlocked writers (``postmap -i`` on a live file) leave: the
    oldest free-list record lists pages in use, the main tree's root the
    first to be handed out.  LMDB's next write transaction then allocates
    the root page to copy the root into, and aborts the process with
    ``Assertion 'mp->mp_pgno != pgno' failed in mdb_page_touch()``.
    Returns the root page number."""
    data = bytearray(db_file.read_bytes())
    shape = layout(bytes(data))
    assert shape.free_depth == 1, "a free list of one leaf page (a small file)"
    page = shape.free_root * shape.psize
    lower = struct.unpack_from("<H", data, page + 12)[0]
    assert lower > HEADER, "the file has a free list"
    node = page + struct.unpack_from("<H", data, page + HEADER)[0]
    lo, hi, flags, ksize = struct.unpack_from("<HHHH", data, node)
    assert flags == 0, "the record is on the page"
    size = lo | hi << 16
    count = size // 8 - 1
    # Page numbers in descending order (an LMDB ID list), the root last:
    # the smallest, allocated first.
    pages = [shape.main_root + count - 1 - i for i in range(count)]
    record = struct.pack(f"<{count + 1}Q", count, *pages)
    at = node + 8 + ksize
    data[at:at + size] = record
    db_file.write_bytes(bytes(data))
    return shape.main_root


def overwrite_page(db_file: Path, target: int, source: int) -> None:
    """Copy page ``source`` over page ``target`` (a torn or misdirected write)."""
    data = bytearray(db_file.read_bytes())
    psize = layout(bytes(data)).psize
    data[target * psize:(target + 1) * psize] = data[source * psize:(source + 1) * psize]
    db_file.write_bytes(bytes(data))


def zero_page(db_file: Path, pgno: int, fill: int = 0) -> None:
    """Overwrite page ``pgno`` with ``fill`` bytes (0xff: a page number of
    all ones, LMDB's P_INVALID)."""
    data = bytearray(db_file.read_bytes())
    psize = layout(bytes(data)).psize
    data[pgno * psize:(pgno + 1) * psize] = bytes([fill]) * psize
    db_file.write_bytes(bytes(data))


def leaf_pages(db_file: Path) -> list[int]:
    """The main tree's leaf pages, for a tree of depth 1 or 2."""
    data = db_file.read_bytes()
    shape = layout(data)
    if shape.main_depth == 1:
        return [shape.main_root]
    assert shape.main_depth == 2
    page = shape.main_root * shape.psize
    lower = struct.unpack_from("<H", data, page + 12)[0]
    children = []
    for index in range((lower - HEADER) // 2):
        node = page + struct.unpack_from("<H", data, page + HEADER + 2 * index)[0]
        lo, hi, flags, _ = struct.unpack_from("<HHHH", data, node)
        children.append(lo | hi << 16 | flags << 32)
    return children
