"""A structural check of an LMDB file, in Python, before LMDB touches it.

LMDB trusts its file: a damaged one (for example written by two unlocked
writers at once, as ``postmap -i`` on a live file can) makes it fail C
assertions such as ``mp->mp_pgno != pgno`` in mdb_page_touch(), which abort
the whole process, or silently overwrite live pages.  check_lmdb() reads the
file as bytes and walks it the way LMDB would, so a bad file is found
without LMDB ever reading it:

- both meta pages, the newest one valid (magic, version, page size, last
  page within the file);
- every page of the main and free-list B-trees reachable from the newest
  meta: in range, its header naming its own number, the type its parent
  expects, node offsets and sizes inside the page, keys in order, all leaves
  at the tree's depth, no page reached twice;
- overflow pages of large values: in range, typed, not shared;
- the free list: every page it lists in range, listed once, and not in use
  by a tree (the state that makes mdb_page_touch() abort);
- the page and entry counts the meta page records for each tree.

Only what Postfix's lmdb tables use is accepted: the main database, no
named sub-databases or duplicate keys, on a 64-bit host's layout.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

# LMDB's on-disk layout (mdb.c, 64-bit): a 16-byte page header, MDB_meta
# after it on the two meta pages, 8-byte node headers.
_PAGE_HEADER = 16
_NODE_HEADER = 8
_MAGIC = 0xBEEFC0DE
_DATA_VERSION = 1
_P_INVALID = 2**64 - 1
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 0x01, 0x02, 0x04, 0x08
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
_FREE_DBI, _MAIN_DBI = 0, 1

_HEADER = struct.Struct("<QHHHH")  # pgno, pad, flags, lower, upper
_PAGES = struct.Struct("<I")  # an overflow page's page count, at offset 12
_NODE = struct.Struct("<HHHH")  # lo, hi, flags, key size
_PGNO = struct.Struct("<Q")
# MDB_db: pad (the page size, in the free DB of a meta), flags, depth,
# branch, leaf and overflow page counts, entries, root.
_DB = struct.Struct("<IHHQQQQQ")
_META = struct.Struct("<IIQQ")  # magic, version, address, map size
_META_DBS = _PAGE_HEADER + _META.size
_META_LAST = _META_DBS + 2 * _DB.size  # last page number, then txn id


class LmdbCorrupt(Exception):
    """The file is not a sound LMDB file; the message says where."""


@dataclass(frozen=True)
class _Db:
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int


@dataclass
class _Walk:
    data: memoryview
    psize: int
    last: int
    used: set[int] = field(default_factory=set)
    free_lists: list[tuple[int, memoryview]] = field(default_factory=list)


def check_lmdb(data: bytes | memoryview | mmap.mmap) -> None:
    """Raise LmdbCorrupt unless ``data`` (a whole .lmdb file) is sound; an
    empty file (not written yet) is."""
    view = memoryview(data)
    if len(view) == 0:
        return
    meta = _newest_meta(view)
    psize, last, dbs = meta
    walk = _Walk(view, psize, last)
    _tree(walk, "free list", dbs[_FREE_DBI], free=True)
    _tree(walk, "main database", dbs[_MAIN_DBI], free=False)
    listed: set[int] = set()
    for txnid, idl in walk.free_lists:
        for pgno in _idl(idl, txnid):
            if not 2 <= pgno <= last:
                raise LmdbCorrupt(f"free list of txn {txnid}: page {pgno} out of range "
                                  f"2..{last}")
            if pgno in walk.used:
                raise LmdbCorrupt(f"page {pgno} is both free and in use")
            if pgno in listed:
                raise LmdbCorrupt(f"page {pgno} is free twice")
            listed.add(pgno)


def _newest_meta(view: memoryview) -> tuple[int, int, tuple[_Db, _Db]]:
    """(page size, last page, (free db, main db)) of the newest valid meta."""
    if len(view) < _META_LAST + 16:
        raise LmdbCorrupt(f"file of {len(view)} bytes is too short for its meta pages")
    # The page size is read from meta page 0, as LMDB does.
    psize = _DB.unpack_from(view, _META_DBS)[0]
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        raise LmdbCorrupt(f"meta page 0: bad page size {psize}")
    # LMDB refuses a file unless both meta pages are valid, then uses the
    # one with the higher transaction id.
    found = []
    for number in (0, 1):
        offset = number * psize
        if len(view) < offset + _META_LAST + 16:
            raise LmdbCorrupt(f"file of {len(view)} bytes ends inside meta page {number}")
        pgno, _, flags, _, _ = _HEADER.unpack_from(view, offset)
        magic, version, _, _ = _META.unpack_from(view, offset + _PAGE_HEADER)
        if pgno != number or not flags & _P_META or magic != _MAGIC or version != _DATA_VERSION:
            raise LmdbCorrupt(f"meta page {number} is not an LMDB meta page (not an LMDB "
                              "file, or its first pages are overwritten)")
        last, txnid = struct.unpack_from("<QQ", view, offset + _META_LAST)
        free, main = (_Db(*_DB.unpack_from(view, offset + _META_DBS + i * _DB.size)[2:])
                      for i in (0, 1))
        found.append((txnid, number, last, free, main))
    txnid, number, last, free, main = max(found, key=lambda meta: (meta[0], meta[1]))
    if _DB.unpack_from(view, number * psize + _META_DBS)[0] != psize:
        raise LmdbCorrupt(f"meta page {number}: page size differs from meta page 0")
    if (last + 1) * psize > len(view):
        raise LmdbCorrupt(f"meta page {number} (txn {txnid}): last page {last} is beyond the "
                          f"end of the file ({len(view) // psize} pages)")
    return psize, last, (free, main)


def _tree(walk: _Walk, name: str, db: _Db, *, free: bool) -> None:
    """Walk one B-tree from its root, checking each page and the counts."""
    if db.root == _P_INVALID:
        if db.depth or db.entries or db.branch_pages or db.leaf_pages or db.overflow_pages:
            raise LmdbCorrupt(f"{name}: empty, yet the meta page counts pages or entries")
        return
    counts = [0, 0, 0, 0]  # branch, leaf, overflow pages; entries
    level: list[int] = [db.root]
    depth = 0
    while level:
        depth += 1
        if depth > db.depth:
            raise LmdbCorrupt(f"{name}: deeper than its recorded depth {db.depth}")
        below: list[int] = []
        for pgno in level:
            below.extend(_page(walk, name, pgno, leaf=depth == db.depth, free=free,
                               counts=counts))
        level = below
    if depth != db.depth:
        raise LmdbCorrupt(f"{name}: depth {depth}, recorded {db.depth}")
    recorded = [db.branch_pages, db.leaf_pages, db.overflow_pages, db.entries]
    if counts != recorded:
        raise LmdbCorrupt(f"{name}: {counts[0]} branch, {counts[1]} leaf and {counts[2]} "
                          f"overflow pages with {counts[3]} entries; the meta page records "
                          f"{recorded[0]}, {recorded[1]}, {recorded[2]} and {recorded[3]}")


def _claim(walk: _Walk, name: str, pgno: int) -> int:
    """Mark page ``pgno`` in use; its offset in the file."""
    if not 2 <= pgno <= walk.last:
        raise LmdbCorrupt(f"{name}: page {pgno} out of range 2..{walk.last}")
    if pgno in walk.used:
        raise LmdbCorrupt(f"{name}: page {pgno} is used twice")
    walk.used.add(pgno)
    return pgno * walk.psize


def _page(walk: _Walk, name: str, pgno: int, *, leaf: bool, free: bool,
          counts: list[int]) -> list[int]:
    """Check one branch or leaf page; the children of a branch page."""
    offset = _claim(walk, name, pgno)
    view, psize = walk.data, walk.psize
    own, _, flags, lower, upper = _HEADER.unpack_from(view, offset)
    where = f"{name}: page {pgno}"
    if own != pgno:
        if own > walk.last:  # garbage, such as all ones (-1 read unsigned)
            raise LmdbCorrupt(f"{where} is overwritten: what it holds is not a page "
                              "of this file")
        raise LmdbCorrupt(f"{where} holds page {own}'s header (overwritten)")
    want = _P_LEAF if leaf else _P_BRANCH
    if flags & (_P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META) != want:
        raise LmdbCorrupt(f"{where}: type {flags:#x}, expected a "
                          f"{'leaf' if leaf else 'branch'} page")
    if not _PAGE_HEADER <= lower <= upper <= psize or (lower - _PAGE_HEADER) % 2:
        raise LmdbCorrupt(f"{where}: bad bounds lower={lower} upper={upper}")
    keys = (lower - _PAGE_HEADER) // 2
    if keys == 0:
        raise LmdbCorrupt(f"{where}: no entries")
    counts[1 if leaf else 0] += 1
    children: list[int] = []
    previous: bytes | None = None
    for index in range(keys):
        node = struct.unpack_from("<H", view, offset + _PAGE_HEADER + 2 * index)[0]
        if not upper <= node <= psize - _NODE_HEADER:
            raise LmdbCorrupt(f"{where}: node {index} at offset {node} outside the page")
        lo, hi, node_flags, ksize = _NODE.unpack_from(view, offset + node)
        start = offset + node + _NODE_HEADER
        if node + _NODE_HEADER + ksize > psize:
            raise LmdbCorrupt(f"{where}: key of node {index} runs past the page")
        # The first key of a branch page is implicit (empty); the rest sort.
        if leaf or index > 0:
            key = bytes(view[start:start + ksize])
            if free:
                # The free list's keys are native (little-endian) integers.
                if ksize != 8:
                    raise LmdbCorrupt(f"{where}: free list key of {ksize} bytes")
                key = key[::-1]  # big-endian: sorts as bytes the way it does as a number
            if previous is not None and key <= previous:
                raise LmdbCorrupt(f"{where}: keys out of order at node {index}")
            previous = key
        if not leaf:
            children.append(lo | hi << 16 | node_flags << 32)
            continue
        counts[3] += 1
        if node_flags & (_F_SUBDATA | _F_DUPDATA) or node_flags & ~_F_BIGDATA:
            raise LmdbCorrupt(f"{where}: node {index} has flags {node_flags:#x} (sub-database "
                              "or duplicate keys: not a Postfix table)")
        size = lo | hi << 16
        data_at = start + ksize
        if node_flags & _F_BIGDATA:
            if node + _NODE_HEADER + ksize + _PGNO.size > psize:
                raise LmdbCorrupt(f"{where}: node {index} runs past the page")
            value = _overflow(walk, where, _PGNO.unpack_from(view, data_at)[0], size, counts)
        else:
            if node + _NODE_HEADER + ksize + size > psize:
                raise LmdbCorrupt(f"{where}: value of node {index} runs past the page")
            value = view[data_at:data_at + size]
        if free:
            walk.free_lists.append((int.from_bytes(key, "big"), value))
    return children


def _overflow(walk: _Walk, where: str, pgno: int, size: int,
              counts: list[int]) -> memoryview:
    """Check and claim a large value's overflow pages; the value."""
    offset = _claim(walk, where, pgno)
    own, _, flags, _, _ = _HEADER.unpack_from(walk.data, offset)
    pages = _PAGES.unpack_from(walk.data, offset + 12)[0]
    if own != pgno or not flags & _P_OVERFLOW:
        raise LmdbCorrupt(f"{where}: overflow page {pgno} is not one (page {own}, "
                          f"type {flags:#x})")
    if pages < 1 or pgno + pages - 1 > walk.last or size > pages * walk.psize - _PAGE_HEADER:
        raise LmdbCorrupt(f"{where}: overflow page {pgno}: {pages} pages for {size} bytes")
    for extra in range(pgno + 1, pgno + pages):
        _claim(walk, where, extra)
    counts[2] += pages
    return walk.data[offset + _PAGE_HEADER:offset + _PAGE_HEADER + size]


def _idl(value: memoryview, txnid: int) -> list[int]:
    """The page numbers of one free-list record (count, then the pages)."""
    if len(value) < 8 or len(value) % 8:
        raise LmdbCorrupt(f"free list of txn {txnid}: record of {len(value)} bytes")
    numbers = [n for (n,) in _PGNO.iter_unpack(value.tobytes())]
    if numbers[0] != len(numbers) - 1:
        raise LmdbCorrupt(f"free list of txn {txnid}: says {numbers[0]} pages, holds "
                          f"{len(numbers) - 1}")
    return numbers[1:]
