#ifndef WALSHIP_CLZ4_SHIM_H
#define WALSHIP_CLZ4_SHIM_H
#include <lz4.h>
#include <lz4frame.h>
#include <stdint.h>
#include <string.h>

/*
 * XXH32, the hash an LZ4 frame's content checksum is, written out here because the system
 * liblz4's copy is built auto-vectorized for SSE2, where 32-bit multiplies are emulated: it
 * hashes at about half the speed of plain scalar code, and was half of a restore's time.
 * Readers decompress with LZ4F's own check turned off and check the frame with this instead.
 * The empty asm statement keeps the compiler from vectorizing the four lanes again.
 * Streaming: init, any number of updates, digest. Little-endian hosts only (x86-64, arm64).
 */
typedef struct {
    uint32_t lane[4];
    uint64_t total;
    uint8_t pending[16];
    uint32_t pendingCount;
} walship_xxh32_state;

static const uint32_t walship_xxh32_p1 = 0x9E3779B1U;
static const uint32_t walship_xxh32_p2 = 0x85EBCA77U;
static const uint32_t walship_xxh32_p3 = 0xC2B2AE3DU;
static const uint32_t walship_xxh32_p4 = 0x27D4EB2FU;
static const uint32_t walship_xxh32_p5 = 0x165667B1U;

static inline uint32_t walship_xxh32_rotl(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

static inline uint32_t walship_xxh32_load(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint32_t walship_xxh32_round(uint32_t acc, uint32_t input) {
    acc += input * walship_xxh32_p2;
    acc = walship_xxh32_rotl(acc, 13);
    acc *= walship_xxh32_p1;
    __asm__("" : "+r"(acc));
    return acc;
}

static inline void walship_xxh32_init(walship_xxh32_state *s, uint32_t seed) {
    s->lane[0] = seed + walship_xxh32_p1 + walship_xxh32_p2;
    s->lane[1] = seed + walship_xxh32_p2;
    s->lane[2] = seed;
    s->lane[3] = seed - walship_xxh32_p1;
    s->total = 0;
    s->pendingCount = 0;
}

static inline void walship_xxh32_stripes(walship_xxh32_state *s, const uint8_t *p, size_t stripes) {
    uint32_t a = s->lane[0], b = s->lane[1], c = s->lane[2], d = s->lane[3];
    for (size_t i = 0; i < stripes; i++, p += 16) {
        a = walship_xxh32_round(a, walship_xxh32_load(p));
        b = walship_xxh32_round(b, walship_xxh32_load(p + 4));
        c = walship_xxh32_round(c, walship_xxh32_load(p + 8));
        d = walship_xxh32_round(d, walship_xxh32_load(p + 12));
    }
    s->lane[0] = a; s->lane[1] = b; s->lane[2] = c; s->lane[3] = d;
}

static inline void walship_xxh32_update(walship_xxh32_state *s, const void *data, size_t length) {
    const uint8_t *p = (const uint8_t *)data;
    s->total += length;
    if (s->pendingCount + length < 16) {
        if (length) memcpy(s->pending + s->pendingCount, p, length);
        s->pendingCount += (uint32_t)length;
        return;
    }
    if (s->pendingCount) {
        size_t fill = 16 - s->pendingCount;
        memcpy(s->pending + s->pendingCount, p, fill);
        walship_xxh32_stripes(s, s->pending, 1);
        p += fill;
        length -= fill;
        s->pendingCount = 0;
    }
    size_t stripes = length / 16;
    walship_xxh32_stripes(s, p, stripes);
    p += stripes * 16;
    length -= stripes * 16;
    if (length) memcpy(s->pending, p, length);
    s->pendingCount = (uint32_t)length;
}

static inline uint32_t walship_xxh32_digest(const walship_xxh32_state *s) {
    uint32_t h;
    if (s->total >= 16) {
        h = walship_xxh32_rotl(s->lane[0], 1) + walship_xxh32_rotl(s->lane[1], 7)
          + walship_xxh32_rotl(s->lane[2], 12) + walship_xxh32_rotl(s->lane[3], 18);
    } else {
        h = s->lane[2] + walship_xxh32_p5;   /* the seed */
    }
    h += (uint32_t)s->total;
    const uint8_t *p = s->pending;
    uint32_t left = s->pendingCount;
    while (left >= 4) {
        h += walship_xxh32_load(p) * walship_xxh32_p3;
        h = walship_xxh32_rotl(h, 17) * walship_xxh32_p4;
        p += 4;
        left -= 4;
    }
    while (left > 0) {
        h += (uint32_t)(*p) * walship_xxh32_p5;
        h = walship_xxh32_rotl(h, 11) * walship_xxh32_p1;
        p++;
        left--;
    }
    h ^= h >> 15;
    h *= walship_xxh32_p2;
    h ^= h >> 13;
    h *= walship_xxh32_p3;
    h ^= h >> 16;
    return h;
}
#endif
