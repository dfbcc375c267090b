"""Reading and rewriting the metadata walship puts in front of every object (docs/FORMAT.md),
for tests that plant crafted objects in a replica: a pure-Python XXH64 (the metadata's
checksum) and a rewrite that keeps that checksum valid, so that only the field under test is
wrong."""
import struct

META_BYTES = 136   # LZ4 skippable frame header (8) + metadata body (128)
_M = (1 << 64) - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc, lane):
    return (_rotl((acc + lane * P2) & _M, 31) * P1) & _M


def _merge(h, v):
    return ((h ^ _round(0, v)) * P1 + P4) & _M


def xxh64(data, seed=0):
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + P1 + P2) & _M, (seed + P2) & _M, seed & _M, (seed - P1) & _M]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], struct.unpack_from("<Q", data, i + 8 * k)[0])
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for x in v:
            h = _merge(h, x)
    else:
        h = (seed + P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h = ((_rotl(h ^ _round(0, struct.unpack_from("<Q", data, i)[0]), 27) * P1) + P4) & _M
        i += 8
    if i + 4 <= n:
        h = ((_rotl(h ^ (struct.unpack_from("<I", data, i)[0] * P1 & _M), 23) * P2) + P3) & _M
        i += 4
    while i < n:
        h = (_rotl(h ^ (data[i] * P5 & _M), 11) * P1) & _M
        i += 1
    h ^= h >> 33
    h = (h * P2) & _M
    h ^= h >> 29
    h = (h * P3) & _M
    return h ^ (h >> 32)


# field: (offset, struct format) in the object's first META_BYTES bytes
FIELDS = {"version": (16, "<H"), "kind": (18, "<B"), "flags": (19, "<B"), "page_size": (20, "<I"),
          "first_txid": (24, "<Q"), "last_txid": (32, "<Q"), "first_time_us": (40, "<q"),
          "last_time_us": (48, "<q"), "db_pages": (56, "<I"), "transactions": (60, "<I"),
          "checksum": (64, "<Q"), "payload_bytes": (72, "<Q"), "key_id": (112, "<Q"),
          "database_id": (120, "<Q")}


def read_metadata(path):
    b = open(path, "rb").read(META_BYTES)
    return {k: struct.unpack_from(f, b, o)[0] for k, (o, f) in FIELDS.items()}


def rewrite_metadata(path, **fields):
    """Sets metadata fields of the object at path and recomputes the metadata checksum."""
    b = bytearray(open(path, "rb").read())
    for k, v in fields.items():
        o, f = FIELDS[k]
        struct.pack_into(f, b, o, v)
    struct.pack_into("<Q", b, 128, xxh64(bytes(b[8:128])))
    open(path, "wb").write(bytes(b))
