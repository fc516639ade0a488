/*
 * _jpeg8: decode a baseline JPEG at 1/8 scale on two cores, bit-identical to libjpeg-turbo.
 *
 * At 1/8 scale libjpeg keeps one pixel per 8x8 luma block (its DC term) and, for 4:2:0 photos, a
 * 2x2 reduced IDCT of each chroma block. The pixels are cheap; what costs is the Huffman decode of
 * the whole bitstream (about 20 ms for a 12-megapixel phone photo), which is serial. This module
 * splits it across two threads:
 *
 *   - with restart markers (DRI), each thread takes whole restart intervals;
 *   - without them, the second thread starts decoding just past the middle of the bitstream with a
 *     guessed state, and records where each block it decoded began. Huffman codes resynchronise: the first
 *     thread, decoding from the start, soon reaches a block start that the second thread recorded
 *     with the same bit position and block phase. From that point the two decodes are the same
 *     (decoding is deterministic from there), so the first thread stops and takes the second
 *     thread's results. DC terms are stored as differences and summed at the end, so the second
 *     thread's unknown starting predictors do not matter. When no match is found the first thread
 *     simply decodes everything: the result is always the serial decode.
 *
 * The IDCT reductions and the YCbCr->RGB conversion replicate libjpeg-turbo's integer arithmetic
 * (jidctred.c's 1x1 and 2x2 IDCTs, jdcolor.c's tables), so the pixels equal what Pillow's
 * `draft()` decode gives; tests compare them on real photos. Anything this decoder does not handle
 * exactly (progressive or arithmetic coding, 12-bit, CMYK, Adobe/RGB colour, 4:2:2, multiple scans,
 * 16-bit quantisation tables, damaged data, values outside the ranges where libjpeg-turbo's SIMD and
 * C code agree) returns None, and the caller decodes with Pillow as before. 4:2:0 MCUs are rendered
 * straight to RGB, on both threads once the decode is done, and by the first thread early while the
 * second one is still decoding.
 */
#ifndef JPEG8_NO_PYTHON /* fuzz/ builds the decoder alone (see fuzz/README.md) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <pthread.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FAST_BITS 9
#define PAD_BYTES 1024
#define BAD UINT64_MAX
#define MAX_COMPS 3
#define MAX_PHASES 6
#define PUBLISH_EVERY 64
#define MIN_PARALLEL_BYTES (256 * 1024)
#define MAX_PIXELS ((int64_t)200 * 1000 * 1000)
#define JPEG_MAX_DIMENSION 65500 /* jmorecfg.h: libjpeg refuses wider or taller frames */
#define MAX_SAMP_FACTOR 4        /* jpeglib.h: sampling factors are 1..4 */

typedef struct {
    uint16_t fast[1 << FAST_BITS]; /* (length << 8) | symbol; 0 when the code is longer */
    int32_t maxcode[18];
    int32_t valoffset[18];
    uint8_t huffval[256];
    uint32_t lut[1 << 11];  /* AC: see build_ac_lookup; DC: see build_dc_lookup */
    uint32_t pair[1 << 11]; /* AC only: see build_pair_lookup */
    int fast_vmax;          /* AC only: the largest |value| a one-lookup entry of `lut` yields */
    int defined;
} Huff;

typedef struct {
    int id, h, v, tq, td, ta;
} Comp;

typedef struct {
    /* frame */
    int width, height, ncomp, hmax, vmax;
    Comp comp[MAX_COMPS];
    uint16_t qt[4][64]; /* natural order */
    int qt_defined[4];
    Huff dc[4], ac[4];
    int dri;
    /* layout */
    int mcux, mcuy, nmcu, bpm;          /* MCUs across, down, total; blocks per MCU */
    int phase_comp[MAX_PHASES];         /* component of each block in an MCU */
    int phase_dx[MAX_PHASES], phase_dy[MAX_PHASES];
    int chroma2x2;                      /* chroma blocks get the 2x2 reduced IDCT (4:2:0) */
    int phase_chroma_slot[MAX_PHASES];  /* -1 for 1x1 blocks, else slot within the MCU */
    int chroma_per_mcu;
    int64_t kq[MAX_COMPS][64];           /* 2x2 IDCT pass-1 factor of each zigzag position */
    int32_t qz[MAX_COMPS][64];           /* quantiser of each zigzag position */
    int check_fast[MAX_COMPS];           /* one-lookup values can overflow 16 bits when dequantised */
    /* entropy-coded data, unstuffed, padded with zeros */
    uint8_t *buf;
    uint64_t nbits;
    uint32_t *rst_start;                /* byte offset where each restart interval starts */
    int nintervals;
    /* results, in absolute block order */
    int16_t *dcdiff;                    /* per block */
    int32_t *ws;                        /* per chroma block: 2x2 IDCT pass-1 workspace, DC excluded */
} Jpeg;

static const uint8_t ZIGZAG_TO_NATURAL[64] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,  7,  14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63};

static uint8_t IDCT_LIMIT[1024]; /* libjpeg's post-IDCT range limit, indexed by (x & 1023) */
static int32_t CR_R[256], CB_B[256], CR_G[256], CB_G[256];
static uint8_t SATURATE[1024]; /* x + 384 -> x clamped to 0..255 */

static void init_tables(void)
{
    for (int i = 0; i < 1024; i++) {
        if (i < 128) IDCT_LIMIT[i] = (uint8_t)(128 + i);
        else if (i < 512) IDCT_LIMIT[i] = 255;
        else if (i < 896) IDCT_LIMIT[i] = 0;
        else IDCT_LIMIT[i] = (uint8_t)(i - 896);
    }
    for (int i = 0; i < 1024; i++) SATURATE[i] = (uint8_t)(i < 384 ? 0 : i > 384 + 255 ? 255 : i - 384);
#define SCALEBITS 16
#define ONE_HALF ((int64_t)1 << (SCALEBITS - 1))
#define FIX(x) ((int64_t)((x) * (1L << SCALEBITS) + 0.5))
    for (int i = 0; i < 256; i++) {
        int64_t x = i - 128;
        CR_R[i] = (int)((FIX(1.40200) * x + ONE_HALF) >> SCALEBITS);
        CB_B[i] = (int)((FIX(1.77200) * x + ONE_HALF) >> SCALEBITS);
        CR_G[i] = (int32_t)((-FIX(0.71414)) * x);
        CB_G[i] = (int32_t)((-FIX(0.34414)) * x + ONE_HALF);
    }
}

/* ---- Huffman tables ------------------------------------------------------------------------ */

static void build_ac_lookup(Huff *h, const uint8_t *counts, uint32_t *lut);
static void build_dc_lookup(const Huff *h, const uint8_t *counts, uint32_t *lut);
static void build_pair_lookup(const uint32_t *lut, uint32_t *pair);

static int build_huff(Huff *h, const uint8_t *counts, const uint8_t *vals, int nvals, int is_dc)
{
    uint16_t huffcode[257];
    uint8_t huffsize[257];
    int k = 0;
    for (int l = 1; l <= 16; l++)
        for (int i = 0; i < counts[l - 1]; i++) {
            if (k >= 256) return -1;
            huffsize[k++] = (uint8_t)l;
        }
    if (k != nvals) return -1;
    huffsize[k] = 0;
    int code = 0, si = huffsize[0], p = 0;
    while (huffsize[p]) {
        while (huffsize[p] == si) {
            huffcode[p++] = (uint16_t)code;
            code++;
        }
        if (code >= (1 << si)) return -1; /* libjpeg: JERR_BAD_HUFF_TABLE */
        code <<= 1;
        si++;
    }
    memset(h, 0, sizeof *h);
    memcpy(h->huffval, vals, (size_t)nvals);
    if (is_dc)
        for (int i = 0; i < nvals; i++)
            if (vals[i] > 15) return -1;
    p = 0;
    for (int l = 1; l <= 16; l++) {
        if (counts[l - 1]) {
            h->valoffset[l] = p - huffcode[p];
            p += counts[l - 1];
            h->maxcode[l] = huffcode[p - 1];
        } else {
            h->maxcode[l] = -1;
        }
    }
    h->maxcode[17] = INT32_MAX;
    for (p = 0; p < nvals; p++) {
        int size = huffsize[p];
        if (size > FAST_BITS) continue;
        int base = huffcode[p] << (FAST_BITS - size);
        for (int i = 0; i < (1 << (FAST_BITS - size)); i++)
            h->fast[base + i] = (uint16_t)((size << 8) | vals[p]);
    }
    if (is_dc) {
        build_dc_lookup(h, counts, h->lut);
    } else {
        build_ac_lookup(h, counts, h->lut);
        build_pair_lookup(h->lut, h->pair);
    }
    h->defined = 1;
    return 0;
}

static inline uint64_t peek64(const uint8_t *buf, uint64_t pos)
{
    uint64_t v;
    memcpy(&v, buf + (pos >> 3), 8);
    return __builtin_bswap64(v) << (pos & 7); /* at least 57 valid bits */
}

static inline int huff_decode(const Huff *h, uint64_t w, int *len)
{
    uint16_t e = h->fast[w >> (64 - FAST_BITS)];
    if (e) {
        *len = e >> 8;
        return e & 0xFF;
    }
    for (int l = FAST_BITS + 1; l <= 16; l++) {
        int32_t code = (int32_t)(w >> (64 - l));
        if (code <= h->maxcode[l]) {
            *len = l;
            return h->huffval[(code + h->valoffset[l]) & 0xFF];
        }
    }
    return -1;
}

/* The signed 16-bit value of the low 16 bits of v: what libjpeg's (JCOEF) cast of an int gives, written
 * without any conversion that is implementation-defined. */
static inline int as_int16(uint32_t v)
{
    int x = (int)(v & 0xFFFF);
    return x - ((x & 0x8000) << 1);
}

static inline int extend(uint32_t v, int s)
{
    /* v below 2^(s-1) is negative: v - 2^s + 1, without a branch (sign bits are data, unpredictable) */
    int x = (int)v;
    return x + (((x - (1 << (s - 1))) >> 31) & (int)((~0u << s) + 1));
}

/* AC symbols whose code and extra bits fit in AC_BITS decode with one lookup:
 * bits 0-4 length, 5-11 how far k advances, 12 end of block, 13 zero run, 16-31 the value. */
#define AC_BITS 11
#define AC_EOB (1u << 12)
#define AC_ZRL (1u << 13)

static void build_ac_lookup(Huff *h, const uint8_t *counts, uint32_t *lut)
{
    memset(lut, 0, sizeof(uint32_t) << AC_BITS);
    int code = 0, p = 0;
    for (int len = 1; len <= 16; len++, code <<= 1)
        for (int i = 0; i < counts[len - 1]; i++, code++, p++) {
            int rs = h->huffval[p], r = rs >> 4, s = rs & 15;
            if (s == 0) {
                if (len > AC_BITS) continue;
                uint32_t e = (uint32_t)len | (r == 15 ? (16u << 5) | AC_ZRL : AC_EOB);
                int base = code << (AC_BITS - len);
                for (int k = 0; k < (1 << (AC_BITS - len)); k++) lut[base + k] = e;
            } else {
                if (len + s > AC_BITS) continue;
                if ((1 << s) - 1 > h->fast_vmax) h->fast_vmax = (1 << s) - 1;
                for (int extra = 0; extra < (1 << s); extra++) {
                    int value = extend((uint32_t)extra, s);
                    uint32_t e = (uint32_t)(len + s) | ((uint32_t)(r + 1) << 5) | ((uint32_t)(uint16_t)value << 16);
                    int base = ((code << s) | extra) << (AC_BITS - len - s);
                    for (int k = 0; k < (1 << (AC_BITS - len - s)); k++) lut[base + k] = e;
                }
            }
        }
}

/* DC differences whose code and extra bits fit in AC_BITS decode with one lookup: bits 0-4 length
 * (never 0 for an entry), bits 16-31 the difference. */
static void build_dc_lookup(const Huff *h, const uint8_t *counts, uint32_t *lut)
{
    memset(lut, 0, sizeof(uint32_t) << AC_BITS);
    int code = 0, p = 0;
    for (int len = 1; len <= 16; len++, code <<= 1)
        for (int i = 0; i < counts[len - 1]; i++, code++, p++) {
            int s = h->huffval[p];
            if (len + s > AC_BITS) continue;
            for (int extra = 0; extra < (1 << s); extra++) {
                int value = s ? extend((uint32_t)extra, s) : 0;
                uint32_t e = (uint32_t)(len + s) | ((uint32_t)(uint16_t)value << 16);
                int base = ((code << s) | extra) << (AC_BITS - len - s);
                for (int k = 0; k < (1 << (AC_BITS - len - s)); k++) lut[base + k] = e;
            }
        }
}

/* For blocks whose AC values are not needed (all but 4:2:0 chroma), two symbols per lookup when
 * both fit in AC_BITS: bits 0-4 length, bit 5 the second symbol is a coefficient (its position must
 * be checked), bits 8-15 how far k advances, an end of block counting 64 so that it ends the loop.
 * Only used while k <= 47, so the first symbol can never be the block's last coefficient. */
#define PAIR_COEF2 (1u << 5)

static void build_pair_lookup(const uint32_t *lut, uint32_t *pair)
{
    const int mask = (1 << AC_BITS) - 1;
    for (int i = 0; i <= mask; i++) {
        uint32_t e1 = lut[i];
        int len1 = e1 & 31;
        if (!e1) {
            pair[i] = 0;
            continue;
        }
        if (e1 & AC_EOB) {
            pair[i] = (uint32_t)len1 | (64u << 8);
            continue;
        }
        uint32_t inc = (e1 >> 5) & 127, flags = 0;
        uint32_t e2 = lut[(i << len1) & mask];
        int len2 = e2 & 31;
        if (e2 && len1 + len2 <= AC_BITS) {
            if (e2 & AC_EOB) {
                inc += 64;
            } else {
                inc += (e2 >> 5) & 127;
                if (!(e2 & AC_ZRL)) flags = PAIR_COEF2;
            }
        } else {
            len2 = 0;
        }
        pair[i] = (uint32_t)(len1 + len2) | (inc << 8) | flags;
    }
}

/* The 2x2 reduced IDCT reads rows and columns 0, 1, 3, 5, 7. Its first pass is, per column, two sums
 * of dequantised coefficients times constants; they are accumulated as the coefficients are decoded:
 * acc[c] for row 0 (tmp10), acc[5 + c] for the odd rows (tmp0), acc[10] for the coefficients it
 * ignores. ACC_OF_ZIGZAG maps a zigzag position to its sum; Jpeg.kq holds the factor. */
#define ACC_SIZE 11
static int8_t ACC_OF_ZIGZAG[64];
static const int64_t ODD_ROW_FACTOR[5] = {0, 29692, -10426, 6967, -5906}; /* rows 1, 3, 5, 7 (jidctred.c) */

static int reduced_index(int i) { return (i == 0) ? 0 : (i & 1) ? (i + 1) / 2 : -1; } /* 0,1,3,5,7 -> 0..4 */

static void init_acc_tables(void)
{
    for (int k = 0; k < 64; k++) {
        int n = ZIGZAG_TO_NATURAL[k], r = reduced_index(n / 8), c = reduced_index(n % 8);
        ACC_OF_ZIGZAG[k] = (int8_t)((r < 0 || c < 0 || k == 0) ? 10 : r == 0 ? c : 5 + c);
    }
}

/* the factor of each zigzag position for quantisation table q (natural order) */
static void acc_factors(const uint16_t *q, int64_t *kq, int32_t *qz)
{
    for (int k = 0; k < 64; k++) {
        int n = ZIGZAG_TO_NATURAL[k], r = reduced_index(n / 8);
        qz[k] = q[n];
        kq[k] = ACC_OF_ZIGZAG[k] == 10 ? 0 : r == 0 ? (int64_t)q[n] : (int64_t)q[n] * ODD_ROW_FACTOR[r];
    }
}

/* libjpeg-turbo's SIMD 2x2 IDCT (what Pillow runs on x86 and Arm) dequantises in 16-bit lanes
 * (wrapping), packs pass-1 results to 16 bits (saturating) and shifts in 32 bits, where the C code
 * this file follows does not. Its 32-bit sums wrap harmlessly whenever the exact result fits. So the
 * two agree when every dequantised coefficient fits 16 bits and every pass-1 result is within
 * +-PASS1_SAFE: then pass 2's sums stay below 2^31 and its outputs within libjpeg's range table
 * (|x| <= 511). Valid photos stay far inside (|pass-1| is about 32x a sample's distance from 128);
 * a chroma block outside is declined (BAD) and Pillow decodes the photo its own way. */
#define PASS1_SAFE 6000
static inline uint32_t outside16(int64_t v) { return (uint64_t)(v + 32768) > 65535u; }
static inline uint32_t outside_pass1(int64_t v) { return (uint64_t)(v + PASS1_SAFE) > 2u * PASS1_SAFE; }

/* Decode one block from bit `pos`: the DC difference into *dcdiff and, when `acc` is given, the
 * 2x2 IDCT's first-pass sums (see ACC_OF_ZIGZAG; `kq` the factors). Returns the bit position after
 * the block, or BAD. */
static inline __attribute__((always_inline)) uint64_t
decode_block(const uint8_t *buf, uint64_t pos, const Huff *dc, const Huff *ac, const uint32_t *lut,
             int *dcdiff, int64_t *acc, const int64_t *kq, const int32_t *qz, int check_fast)
{
    int len, s;
    uint64_t w = peek64(buf, pos);
    int used, diff = 0;
    uint32_t de = dc->lut[w >> (64 - AC_BITS)];
    if (de) { /* the usual case: code and difference in one lookup */
        used = de & 31;
        w <<= used;
        diff = as_int16(de >> 16);
    } else {
        s = huff_decode(dc, w, &len);
        if (s < 0 || s > 15) return BAD;
        w <<= len;
        used = len;
        if (s) {
            diff = extend((uint32_t)(w >> (64 - s)), s);
            w <<= s;
            used += s;
        }
    }
    *dcdiff = diff;
    uint32_t declined = 0; /* a dequantised chroma coefficient outside 16 bits (see PASS1_SAFE) */
    int k = 1;
    for (;;) {
        if (!acc) {
            /* two symbols a lookup while k <= 47; a pair lookup needs only AC_BITS valid bits of the
             * 57 - used in w, so it refills less often than the paths below (fewer mispredictions) */
            uint32_t e = 0;
            while (k <= 47) {
                if (used > 57 - AC_BITS) {
                    pos += (uint64_t)used;
                    w = peek64(buf, pos);
                    used = 0;
                }
                e = ac->pair[w >> (64 - AC_BITS)];
                if (!e) break; /* a code longer than AC_BITS: one symbol below */
                int l = e & 31;
                w <<= l;
                used += l;
                k += (int)(e >> 8);
            }
            if (k > 47) {
                if (k > 64 && (e & PAIR_COEF2)) return BAD;
                if (k >= 64) break;
            }
        }
        /* one symbol: needs 31 valid bits (the longest code and its extra bits) */
        if (used > 26) {
            pos += (uint64_t)used;
            w = peek64(buf, pos);
            used = 0;
        }
        uint32_t e = lut[w >> (64 - AC_BITS)];
        if (e) {
            int l = e & 31;
            w <<= l;
            used += l;
            if (e & AC_EOB) break;
            k += (e >> 5) & 127;
            if (k > 64 && !(e & AC_ZRL)) return BAD;
            if (acc && !(e & AC_ZRL)) {
                int v = as_int16(e >> 16);
                if (check_fast) declined |= outside16(v * qz[k - 1]);
                acc[ACC_OF_ZIGZAG[k - 1]] += v * kq[k - 1];
            }
            if (k >= 64) break;
            continue;
        }
        int rs = huff_decode(ac, w, &len);
        if (rs < 0) return BAD;
        w <<= len;
        used += len;
        int r = rs >> 4;
        s = rs & 15;
        if (s) {
            k += r;
            if (k > 63) return BAD;
            if (acc) {
                int v = extend((uint32_t)(w >> (64 - s)), s);
                declined |= outside16(v * qz[k]);
                acc[ACC_OF_ZIGZAG[k]] += v * kq[k];
            }
            w <<= s;
            used += s;
            k++;
        } else {
            if (r != 15) break;
            k += 16;
        }
        if (k >= 64) break;
    }
    return declined ? BAD : pos + (uint64_t)used;
}

/* ---- reduced IDCTs (libjpeg-turbo jidctred.c arithmetic, CONST_BITS 13, PASS1_BITS 2) ---------- */

#define DESCALE(x, n) (((x) + ((int64_t)1 << ((n) - 1))) >> (n))

/* Pass 1 of the 2x2 IDCT from the sums decode_block accumulated, with the DC term left out (it is
 * added when the DC predictors are known: pass 1 is exactly linear in it). ws[2*i + row] for column
 * index i. libjpeg skips columns whose odd rows are zero; the full formula gives the same value. */
static inline uint32_t pass1_column(const int64_t *acc, int32_t *ws, int i)
{
    int64_t tmp10 = acc[i] * ((int64_t)1 << 15), tmp0 = acc[5 + i];
    int64_t a = DESCALE(tmp10 + tmp0, 13), b = DESCALE(tmp10 - tmp0, 13);
    ws[2 * i] = (int32_t)a;
    ws[2 * i + 1] = (int32_t)b;
    return outside_pass1(a) | outside_pass1(b);
}

/* (written out: a loop here mispredicts its exit once per chroma block) */
static inline int idct2x2_pass1(const int64_t *acc, int32_t *ws)
{
    pass1_column(acc, ws, 0); /* column 0 is checked once its DC is added */
    return !(pass1_column(acc, ws, 1) | pass1_column(acc, ws, 2) | pass1_column(acc, ws, 3) |
             pass1_column(acc, ws, 4));
}

static inline void clear_acc(int64_t *acc)
{
    acc[0] = acc[1] = acc[2] = acc[3] = acc[4] = acc[5] = acc[6] = acc[7] = acc[8] = acc[9] = acc[10] = 0;
}

/* Returns 0 where libjpeg-turbo's SIMD code would compute differently (see PASS1_SAFE). */
static inline int idct2x2_pass2(const int32_t *ws, int dcq, uint8_t out[2][2])
{
    uint32_t declined = outside16(dcq) | outside_pass1((int64_t)ws[0] + (int64_t)dcq * 4) |
                        outside_pass1((int64_t)ws[1] + (int64_t)dcq * 4);
    for (int row = 0; row < 2; row++) {
        int64_t w0 = (int64_t)ws[row] + (int64_t)dcq * 4, w1 = ws[2 + row], w3 = ws[4 + row],
                w5 = ws[6 + row], w7 = ws[8 + row];
        /* (libjpeg's zero-row shortcut equals the full formula: DESCALE(w0 << 15, 20) = DESCALE(w0, 5)) */
        int64_t tmp10 = w0 * ((int64_t)1 << 15);
        int64_t tmp0 = w7 * -5906 + w5 * 6967 + w3 * -10426 + w1 * 29692;
        out[row][0] = IDCT_LIMIT[DESCALE(tmp10 + tmp0, 20) & 1023];
        out[row][1] = IDCT_LIMIT[DESCALE(tmp10 - tmp0, 20) & 1023];
    }
    return !declined;
}

static inline void put_rgb(uint8_t *o, int y, int cb, int cr)
{
    /* libjpeg's sample_range_limit as a table: colours near white or black clamp often, and those
     * branches would mispredict */
    o[0] = SATURATE[384 + y + CR_R[cr]];
    o[1] = SATURATE[384 + y + ((CB_G[cb] + CR_G[cr]) >> SCALEBITS)];
    o[2] = SATURATE[384 + y + CB_B[cb]];
}

/* DC predictors. libjpeg-turbo sums DC differences in an int (jdhuff.c decode_mcu: `s +=
 * last_dc_val[ci]`) and stores the coefficient as a 16-bit JCOEF. On damaged data (65,538 blocks of
 * differences of 32,767, say) that sum overflows; libjpeg-turbo lets it wrap (it silences UBSan there),
 * so only its low 16 bits ever reach the pixels. Here the sum is unsigned (wraps by definition, no
 * undefined behaviour, no reliance on -fwrapv) and as_int16 takes the same low 16 bits. */
typedef uint32_t Pred;
static inline int pred_value(Pred p) { return as_int16(p); }

/* Where 4:2:0 MCUs become RGB: the output, and the DC predictors before the next MCU. */
typedef struct {
    uint8_t *out;
    int out_w, out_h;
    Pred pred[MAX_COMPS];
    int declined; /* a block libjpeg-turbo's SIMD code would compute differently: use Pillow */
} Emit;

/* One 4:2:0 MCU (its six DC differences `d`, its chroma pass-1 workspaces `ws`) as 2x2 RGB pixels. */
static inline void emit_420(const Jpeg *j, Emit *e, int mx, int my, const int16_t *d, const int32_t *ws)
{
    const int qy = j->qt[j->comp[0].tq][0], qcb = j->qt[j->comp[1].tq][0], qcr = j->qt[j->comp[2].tq][0];
    uint8_t yv[2][2], cb[2][2], cr[2][2];
    Pred py = e->pred[0];
    py += (Pred)d[0];
    yv[0][0] = IDCT_LIMIT[DESCALE((int64_t)pred_value(py) * qy, 3) & 1023];
    py += (Pred)d[1];
    yv[0][1] = IDCT_LIMIT[DESCALE((int64_t)pred_value(py) * qy, 3) & 1023];
    py += (Pred)d[2];
    yv[1][0] = IDCT_LIMIT[DESCALE((int64_t)pred_value(py) * qy, 3) & 1023];
    py += (Pred)d[3];
    yv[1][1] = IDCT_LIMIT[DESCALE((int64_t)pred_value(py) * qy, 3) & 1023];
    e->pred[0] = py;
    e->pred[1] += (Pred)d[4];
    e->declined |= !idct2x2_pass2(ws, pred_value(e->pred[1]) * qcb, cb);
    e->pred[2] += (Pred)d[5];
    e->declined |= !idct2x2_pass2(ws + 10, pred_value(e->pred[2]) * qcr, cr);
    const size_t stride = (size_t)e->out_w * 3;
    int x = 2 * mx, y = 2 * my;
    int cols = e->out_w - x >= 2 ? 2 : e->out_w - x, rows = e->out_h - y >= 2 ? 2 : e->out_h - y;
    uint8_t *p = e->out + (size_t)y * stride + (size_t)x * 3;
    if (rows == 2 && cols == 2) {
        put_rgb(p, yv[0][0], cb[0][0], cr[0][0]);
        put_rgb(p + 3, yv[0][1], cb[0][1], cr[0][1]);
        put_rgb(p + stride, yv[1][0], cb[1][0], cr[1][0]);
        put_rgb(p + stride + 3, yv[1][1], cb[1][1], cr[1][1]);
        return;
    }
    for (int r = 0; r < rows; r++) /* the cropped right or bottom edge */
        for (int c = 0; c < cols; c++) put_rgb(p + r * stride + (size_t)c * 3, yv[r][c], cb[r][c], cr[r][c]);
}

/* 4:2:0 MCUs [m0, m1) to RGB, starting from the predictors in `e` (those before m0). */
static void render_mcus_420(const Jpeg *j, Emit *e, int m0, int m1)
{
    int mx = m0 % j->mcux, my = m0 / j->mcux;
    for (int m = m0; m < m1; m++) {
        if (j->dri && m % j->dri == 0) e->pred[0] = e->pred[1] = e->pred[2] = 0;
        emit_420(j, e, mx, my, j->dcdiff + (size_t)m * 6, j->ws + (size_t)m * 20);
        if (++mx == j->mcux) {
            mx = 0;
            my++;
        }
    }
}

/* ---- buffer pool ------------------------------------------------------------------------------- */
/* A 12-megapixel photo needs about 14 MB of scratch memory (two threads). Fresh pages cost a page
 * fault each (milliseconds per photo), so the last buffers of each kind are kept for the next photo,
 * but never more than POOL_KEEP_BYTES in all: what a 12 MP photo needs stays, the buffers of a rare
 * 50 or 200 MP frame go back to the system after its call. The counters below say what is kept,
 * what is in use and the most that was in use at once (memory_stats()). */
enum { POOL_BUF, POOL_RST, POOL_DC, POOL_WS, POOL_REC, POOL_DC2, POOL_WS2, POOL_PLANES, POOL_KINDS };
#define POOL_KEEP_BYTES_DEFAULT ((size_t)24 << 20)
static pthread_mutex_t POOL_LOCK = PTHREAD_MUTEX_INITIALIZER;
static void *POOL_PTR[POOL_KINDS];
static size_t POOL_SIZE[POOL_KINDS];
static size_t POOL_KEEP_BYTES = POOL_KEEP_BYTES_DEFAULT;
/* The most scratch memory one decode may use (a 12 MP photo: ~14 MiB, 50 MP: ~45, the 200 MP cap:
 * ~175); a frame that needs more is declined before anything is allocated. */
static size_t MAX_SCRATCH_BYTES = (size_t)64 << 20;
static size_t POOL_KEPT;        /* bytes in POOL_PTR */
static size_t SCRATCH_IN_USE;   /* bytes handed out by pool_get and not yet put back */
static size_t SCRATCH_PEAK;     /* the most SCRATCH_IN_USE has been since the last reset */

/* Decodes in flight at once (each uses up to two threads and its scratch memory); a decode past the
 * limit is declined at once, and the caller's slower, leaner path (Pillow) decodes that photo. */
static atomic_int IN_FLIGHT;
static atomic_int IN_FLIGHT_PEAK;
static int MAX_IN_FLIGHT = 2;

/* A child forked while another thread held the lock would wait on it forever; the other thread's
 * decode does not exist in the child. */
static void pool_after_fork_in_child(void)
{
    pthread_mutex_init(&POOL_LOCK, NULL);
    atomic_store(&IN_FLIGHT, 0);
    SCRATCH_IN_USE = 0;
}

static void *pool_get(int kind, size_t size)
{
    void *p = NULL;
    size_t have = size;
    pthread_mutex_lock(&POOL_LOCK);
    if (POOL_PTR[kind] && POOL_SIZE[kind] >= size) {
        p = POOL_PTR[kind];
        have = POOL_SIZE[kind];
        POOL_PTR[kind] = NULL;
        POOL_KEPT -= have;
    }
    SCRATCH_IN_USE += have;
    if (SCRATCH_IN_USE > SCRATCH_PEAK) SCRATCH_PEAK = SCRATCH_IN_USE;
    pthread_mutex_unlock(&POOL_LOCK);
    if (p) return p;
    if (size > SIZE_MAX - 16) p = NULL;
    else p = malloc(size + 16);
    if (!p) {
        pthread_mutex_lock(&POOL_LOCK);
        SCRATCH_IN_USE -= have;
        pthread_mutex_unlock(&POOL_LOCK);
        return NULL;
    }
    size_t *block = p;
    block[0] = size;
    return (char *)block + 16;
}

static void pool_put(int kind, void *p)
{
    if (!p) return;
    size_t *block = (size_t *)((char *)p - 16);
    size_t size = block[0];
    void *drop = p;
    pthread_mutex_lock(&POOL_LOCK);
    SCRATCH_IN_USE -= size;
    size_t old = POOL_PTR[kind] ? POOL_SIZE[kind] : 0;
    /* keep the larger buffer of the kind, if what is kept stays within the cap */
    if (size > old && POOL_KEPT - old + size <= POOL_KEEP_BYTES) {
        drop = POOL_PTR[kind];
        POOL_PTR[kind] = p;
        POOL_SIZE[kind] = size;
        POOL_KEPT = POOL_KEPT - old + size;
    }
    pthread_mutex_unlock(&POOL_LOCK);
    if (drop) free((char *)drop - 16);
}

/* Free every kept buffer (and keep at most `keep` bytes from now on). */
static void pool_set_keep(size_t keep)
{
    void *drop[POOL_KINDS];
    pthread_mutex_lock(&POOL_LOCK);
    POOL_KEEP_BYTES = keep;
    for (int k = 0; k < POOL_KINDS; k++) {
        drop[k] = POOL_PTR[k];
        POOL_PTR[k] = NULL;
    }
    POOL_KEPT = 0;
    pthread_mutex_unlock(&POOL_LOCK);
    for (int k = 0; k < POOL_KINDS; k++)
        if (drop[k]) free((char *)drop[k] - 16);
}

static int enter_flight(void)
{
    int now = atomic_fetch_add(&IN_FLIGHT, 1) + 1;
    if (now > MAX_IN_FLIGHT) {
        atomic_fetch_sub(&IN_FLIGHT, 1);
        return 0;
    }
    int peak = atomic_load(&IN_FLIGHT_PEAK);
    while (now > peak && !atomic_compare_exchange_weak(&IN_FLIGHT_PEAK, &peak, now)) {
    }
    return 1;
}

static void leave_flight(void) { atomic_fetch_sub(&IN_FLIGHT, 1); }

/* ---- header parsing ---------------------------------------------------------------------------- */

static inline int u16(const uint8_t *p) { return (p[0] << 8) | p[1]; }

/* Parse markers up to the start of scan; returns the offset of the entropy-coded data, or -1 when
 * this decoder should not handle the file. */
static ptrdiff_t parse_headers(Jpeg *j, const uint8_t *d, ptrdiff_t n)
{
    ptrdiff_t i = 2;
    int have_sof = 0;
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) return -1;
    while (i + 4 <= n) {
        if (d[i] != 0xFF) return -1;
        int m = d[i + 1];
        if (m == 0xFF) { i++; continue; }
        int len = u16(d + i + 2);
        if (len < 2 || i + 2 + len > n) return -1;
        const uint8_t *s = d + i + 4;
        int sl = len - 2;
        switch (m) {
        case 0xC0: case 0xC1: { /* baseline / extended sequential, Huffman */
            if (have_sof || sl < 6 || s[0] != 8) return -1;
            j->height = u16(s + 1);
            j->width = u16(s + 3);
            j->ncomp = s[5];
            if (j->height == 0 || j->width == 0) return -1; /* DNL; libjpeg: JERR_EMPTY_IMAGE */
            if (!(j->ncomp == 1 || j->ncomp == 3) || sl != 6 + 3 * j->ncomp) return -1; /* libjpeg: BAD_LENGTH */
            /* jdinput.c initial_setup: JERR_IMAGE_TOO_BIG */
            if (j->height > JPEG_MAX_DIMENSION || j->width > JPEG_MAX_DIMENSION) return -1;
            for (int c = 0; c < j->ncomp; c++) {
                j->comp[c].id = s[6 + 3 * c];
                j->comp[c].h = s[7 + 3 * c] >> 4;
                j->comp[c].v = s[7 + 3 * c] & 15;
                j->comp[c].tq = s[8 + 3 * c];
                /* initial_setup: JERR_BAD_SAMPLING, whatever the layout (a grayscale frame too) */
                if (j->comp[c].h < 1 || j->comp[c].h > MAX_SAMP_FACTOR || j->comp[c].v < 1 ||
                    j->comp[c].v > MAX_SAMP_FACTOR)
                    return -1;
                if (j->comp[c].tq > 3) return -1; /* latch_quant_tables: JERR_NO_QUANT_TABLE */
            }
            have_sof = 1;
            break;
        }
        case 0xC4: { /* DHT */
            int off = 0;
            while (off + 17 <= sl) {
                int tc = s[off] >> 4, th = s[off] & 15;
                const uint8_t *counts = s + off + 1;
                int total = 0;
                for (int l = 0; l < 16; l++) total += counts[l];
                if (tc > 1 || th > 3 || total > 256 || off + 17 + total > sl) return -1;
                Huff *h = tc ? &j->ac[th] : &j->dc[th];
                if (build_huff(h, counts, s + off + 17, total, tc == 0) != 0) return -1;
                off += 17 + total;
            }
            if (off != sl) return -1;
            break;
        }
        case 0xDB: { /* DQT */
            int off = 0;
            while (off < sl) {
                int pq = s[off] >> 4, tq = s[off] & 15;
                int size = pq ? 128 : 64;
                /* 16-bit tables (not for 8-bit baseline photos) would overflow libjpeg's int products
                 * in ways this decoder does not mimic: leave them to libjpeg */
                if (pq != 0 || tq > 3 || off + 1 + size > sl) return -1;
                for (int k = 0; k < 64; k++)
                    j->qt[tq][ZIGZAG_TO_NATURAL[k]] =
                        (uint16_t)(pq ? u16(s + off + 1 + 2 * k) : s[off + 1 + k]);
                j->qt_defined[tq] = 1;
                off += 1 + size;
            }
            break;
        }
        case 0xDD: /* DRI */
            if (sl != 2) return -1; /* libjpeg refuses other lengths */
            j->dri = u16(s);
            break;
        case 0xEE: /* APP14: an Adobe marker may say the colours are RGB or CMYK */
            if (sl >= 5 && memcmp(s, "Adobe", 5) == 0) return -1;
            break;
        case 0xDA: { /* SOS */
            if (!have_sof || sl < 1) return -1;
            int ns = s[0];
            if (ns != j->ncomp || sl != 1 + 2 * ns + 3) return -1; /* libjpeg refuses other lengths */
            for (int c = 0; c < ns; c++) {
                if (s[1 + 2 * c] != j->comp[c].id) return -1;
                j->comp[c].td = s[2 + 2 * c] >> 4;
                j->comp[c].ta = s[2 + 2 * c] & 15;
                if (j->comp[c].td > 3 || j->comp[c].ta > 3) return -1;
                if (!j->dc[j->comp[c].td].defined || !j->ac[j->comp[c].ta].defined) return -1;
                if (!j->qt_defined[j->comp[c].tq]) return -1;
            }
            const uint8_t *t = s + 1 + 2 * ns;
            if (t[0] != 0 || t[1] != 63 || t[2] != 0) return -1;
            return i + 2 + len;
        }
        case 0xDC: /* DNL: libjpeg skips it */
        case 0xFE: /* COM */
            break;
        default:
            /* APPn: skipped by libjpeg and here (APP14 above). Everything else before SOS is declined:
             * libjpeg refuses DHP, EXP (0xDF), JPGn (0xF0-0xFD), reserved codes (0x02-0xBF) and the
             * SOFn it does not support; it takes RSTn and TEM (0x01) without a length and FF 00 as
             * garbage to skip, where a length would be read here; and progressive, arithmetic (DAC),
             * a second SOI or an early EOI are not for this decoder. */
            if (m >= 0xE0 && m <= 0xEF) break;
            return -1;
        }
        i += 2 + len;
    }
    return -1;
}

/* Which layouts: grayscale, 4:4:4 and 4:2:0 YCbCr. */
static int plan_layout(Jpeg *j)
{
    if (j->ncomp == 1) {
        j->hmax = j->vmax = 1;
        j->mcux = (j->width + 7) / 8;
        j->mcuy = (j->height + 7) / 8;
        j->bpm = 1;
        j->phase_comp[0] = 0;
        j->phase_dx[0] = j->phase_dy[0] = 0;
        j->phase_chroma_slot[0] = -1;
        j->chroma2x2 = 0;
        j->chroma_per_mcu = 0;
    } else {
        /* libjpeg treats component ids 'R','G','B' (without JFIF) as RGB colour: leave those to it. */
        if (j->comp[0].id == 'R' && j->comp[1].id == 'G' && j->comp[2].id == 'B') return -1;
        int y_h = j->comp[0].h, y_v = j->comp[0].v;
        for (int c = 1; c < 3; c++)
            if (j->comp[c].h != 1 || j->comp[c].v != 1) return -1;
        if (!((y_h == 1 && y_v == 1) || (y_h == 2 && y_v == 2))) return -1;
        j->hmax = y_h;
        j->vmax = y_v;
        j->mcux = (j->width + 8 * y_h - 1) / (8 * y_h);
        j->mcuy = (j->height + 8 * y_v - 1) / (8 * y_v);
        j->chroma2x2 = (y_h == 2);
        int b = 0;
        for (int dy = 0; dy < y_v; dy++)
            for (int dx = 0; dx < y_h; dx++, b++) {
                j->phase_comp[b] = 0;
                j->phase_dx[b] = dx;
                j->phase_dy[b] = dy;
                j->phase_chroma_slot[b] = -1;
            }
        for (int c = 1; c < 3; c++, b++) {
            j->phase_comp[b] = c;
            j->phase_dx[b] = j->phase_dy[b] = 0;
            j->phase_chroma_slot[b] = j->chroma2x2 ? c - 1 : -1;
        }
        j->bpm = b;
        j->chroma_per_mcu = j->chroma2x2 ? 2 : 0;
    }
    j->nmcu = j->mcux * j->mcuy;
    return 0;
}

/* Copy the entropy-coded segment without byte stuffing, noting where each restart interval starts.
 * Returns 0, or -1 when the data does not end with EOI after well-ordered restart markers. */
static int unstuff(Jpeg *j, const uint8_t *d, ptrdiff_t start, ptrdiff_t n)
{
    int max_rst = j->dri ? (j->nmcu + j->dri - 1) / j->dri : 1;
    j->buf = pool_get(POOL_BUF, (size_t)(n - start) + PAD_BYTES);
    j->rst_start = pool_get(POOL_RST, sizeof(uint32_t) * (size_t)max_rst);
    if (!j->buf || !j->rst_start) return -1;
    uint8_t *o = j->buf;
    j->rst_start[0] = 0;
    j->nintervals = 1;
    ptrdiff_t i = start;
    for (;;) {
        const uint8_t *ff = memchr(d + i, 0xFF, (size_t)(n - i));
        if (!ff) return -1; /* no EOI: truncated */
        ptrdiff_t at = ff - d;
        memcpy(o, d + i, (size_t)(at - i));
        o += at - i;
        i = at + 1;
        while (i < n && d[i] == 0xFF) i++; /* fill bytes */
        if (i >= n) return -1;
        int m = d[i++];
        if (m == 0x00) {
            *o++ = 0xFF;
        } else if (m >= 0xD0 && m <= 0xD7) {
            if (!j->dri || j->nintervals >= max_rst) return -1;
            if (m - 0xD0 != (j->nintervals - 1) % 8) return -1;
            j->rst_start[j->nintervals++] = (uint32_t)(o - j->buf);
        } else if (m == 0xD9) {
            break;
        } else {
            return -1; /* another scan, DNL, ...: not for this decoder */
        }
    }
    if (j->dri && j->nintervals != max_rst) return -1;
    size_t used = (size_t)(o - j->buf);
    if (used > (size_t)UINT32_MAX / 8) return -1;
    memset(o, 0, PAD_BYTES);
    j->nbits = (uint64_t)used * 8;
    return 0;
}

/* ---- decoding ---------------------------------------------------------------------------------- */

typedef struct {
    uint32_t pos;  /* where the block starts */
    uint8_t phase; /* its place in the MCU; 0xFF: a decode error started here */
} Record;

typedef struct {
    Jpeg *j;
    uint64_t start;
    Record *rec;
    int16_t *dc;      /* DC difference of each record */
    int32_t *ws;      /* 2x2 pass-1 workspace of each chroma record */
    size_t cap;
    size_t last_err;  /* index of the last record that failed to decode, or SIZE_MAX */
    _Atomic size_t published;
    atomic_int stop;
    atomic_int done;
    size_t count;
} Speculator;

/* Decode MCUs [m0, m1) from bit `pos` into the absolute arrays, restarting at interval boundaries.
 * With `spec`, stop at the first block start the speculating thread also reached: *sync_block is
 * set to the absolute block index and *sync_rec to its record. Returns the end position or BAD. */
static uint64_t decode_mcus(Jpeg *j, int m0, int m1, uint64_t pos, Speculator *spec, size_t *sync_block,
                            size_t *sync_rec)
{
    int64_t acc[ACC_SIZE];
    size_t r = 0;
    uint64_t watch_from = spec ? spec->start : UINT64_MAX;
    for (int m = m0; m < m1; m++) {
        if (j->dri && m > m0 && m % j->dri == 0) {
            uint64_t next = (uint64_t)j->rst_start[m / j->dri] * 8;
            if (pos > next || next - pos >= 8) return BAD; /* interval did not end at its marker */
            pos = next;
        }
        for (int b = 0; b < j->bpm; b++) {
            if (pos >= watch_from) {
                int done = atomic_load_explicit(&spec->done, memory_order_acquire);
                size_t avail = atomic_load_explicit(&spec->published, memory_order_acquire);
                while (r < avail && spec->rec[r].pos < pos) r++;
                if (r < avail && spec->rec[r].pos == pos && spec->rec[r].phase == b) {
                    *sync_block = (size_t)m * j->bpm + b;
                    *sync_rec = r;
                    return pos;
                }
                if (r >= avail && done) watch_from = UINT64_MAX; /* it stopped short of here */
            }
            int ci = j->phase_comp[b];
            const Comp *c = &j->comp[ci];
            int slot = j->phase_chroma_slot[b];
            int diff;
            if (slot >= 0) {
                clear_acc(acc);
                pos = decode_block(j->buf, pos, &j->dc[c->td], &j->ac[c->ta], j->ac[c->ta].lut, &diff, acc, j->kq[ci],
                                   j->qz[ci], j->check_fast[ci]);
                if (pos != BAD && !idct2x2_pass1(acc, j->ws + ((size_t)m * j->chroma_per_mcu + slot) * 10)) pos = BAD;
            } else {
                pos = decode_block(j->buf, pos, &j->dc[c->td], &j->ac[c->ta], j->ac[c->ta].lut, &diff, NULL, NULL, NULL, 0);
            }
            if (pos == BAD || pos > j->nbits) return BAD;
            j->dcdiff[(size_t)m * j->bpm + b] = (int16_t)diff;
        }
    }
    return pos;
}

static void *speculate(void *arg)
{
    Speculator *sp = arg;
    Jpeg *j = sp->j;
    int64_t acc[ACC_SIZE];
    uint64_t pos = sp->start;
    int phase = 0;
    uint32_t cslot = 0;
    size_t n = 0;
    sp->last_err = SIZE_MAX;
    while (n < sp->cap && pos < j->nbits) {
        if ((n & 1023) == 0 && atomic_load_explicit(&sp->stop, memory_order_relaxed)) break;
        Record *rec = &sp->rec[n];
        rec->pos = (uint32_t)pos;
        rec->phase = (uint8_t)phase;
        int ci = j->phase_comp[phase];
        const Comp *c = &j->comp[ci];
        int slot = j->phase_chroma_slot[phase];
        int diff;
        uint64_t next;
        if (slot >= 0) {
            clear_acc(acc);
            next = decode_block(j->buf, pos, &j->dc[c->td], &j->ac[c->ta], j->ac[c->ta].lut, &diff, acc, j->kq[ci],
                                j->qz[ci], j->check_fast[ci]);
            if (next != BAD && !idct2x2_pass1(acc, sp->ws + (size_t)cslot * 10)) next = BAD;
        } else {
            next = decode_block(j->buf, pos, &j->dc[c->td], &j->ac[c->ta], j->ac[c->ta].lut, &diff, NULL, NULL, NULL, 0);
        }
        if (next == BAD || next > j->nbits) {
            rec->phase = 0xFF; /* garbage (before synchronising) or a real error: never matches */
            sp->last_err = n;
            pos++;
            phase = 0;
        } else {
            sp->dc[n] = (int16_t)diff;
            if (slot >= 0) cslot++; /* its workspace was written above */
            pos = next;
            if (++phase == j->bpm) phase = 0;
        }
        n++;
        if ((n % PUBLISH_EVERY) == 0) atomic_store_explicit(&sp->published, n, memory_order_release);
    }
    sp->count = n;
    atomic_store_explicit(&sp->published, n, memory_order_release);
    atomic_store_explicit(&sp->done, 1, memory_order_release);
    return NULL;
}

typedef struct {
    Jpeg *j;
    int m0, m1;
    uint64_t result;
} Range;

static void *decode_range_thread(void *arg)
{
    Range *rg = arg;
    rg->result = decode_mcus(rg->j, rg->m0, rg->m1, (uint64_t)rg->j->rst_start[rg->m0 / rg->j->dri] * 8,
                             NULL, NULL, NULL);
    return NULL;
}

/* Decode all blocks; returns 0, or -1 on anything libjpeg might treat differently. With `early`
 * (4:2:0), the first thread renders the MCUs before the sync point while the speculating thread is
 * still decoding: *rendered is set to the first MCU not rendered, early->pred to the predictors
 * before it. */
static int decode_all(Jpeg *j, int threads, Emit *early, int *rendered)
{
    *rendered = 0;
    size_t total = (size_t)j->nmcu * j->bpm;
    int parallel = threads > 1 && j->nbits >= (uint64_t)MIN_PARALLEL_BYTES * 8;
    if (j->dri && parallel && j->nintervals >= 2) {
        /* Split at the restart interval nearest the middle of the data. */
        int best = 1;
        for (int k = 1; k < j->nintervals; k++)
            if ((uint64_t)j->rst_start[k] * 16 <= j->nbits) best = k;
        Range second = {j, best * j->dri, j->nmcu, 0};
        pthread_t t;
        if (pthread_create(&t, NULL, decode_range_thread, &second) != 0) return -1;
        uint64_t first = decode_mcus(j, 0, best * j->dri, 0, NULL, NULL, NULL);
        pthread_join(t, NULL);
        if (first == BAD || second.result == BAD) return -1;
        uint64_t next = (uint64_t)j->rst_start[best] * 8;
        return (first <= next && next - first < 8) ? 0 : -1;
    }
    if (j->dri || !parallel) return decode_mcus(j, 0, j->nmcu, 0, NULL, NULL, NULL) == BAD ? -1 : 0;

    Speculator sp;
    memset(&sp, 0, sizeof sp);
    sp.j = j;
    /* The speculating thread keeps records and starts a little later: give it a little less. */
    sp.start = j->nbits / 100 * 52;
    sp.cap = total;
    sp.rec = pool_get(POOL_REC, sizeof(Record) * total);
    sp.dc = pool_get(POOL_DC2, sizeof(int16_t) * total);
    sp.ws = pool_get(POOL_WS2, sizeof(int32_t) * 10 * ((size_t)j->nmcu * j->chroma_per_mcu + 1));
    atomic_init(&sp.published, 0);
    atomic_init(&sp.stop, 0);
    atomic_init(&sp.done, 0);
    pthread_t t;
    if (!sp.rec || !sp.dc || !sp.ws || pthread_create(&t, NULL, speculate, &sp) != 0) {
        pool_put(POOL_REC, sp.rec);
        pool_put(POOL_DC2, sp.dc);
        pool_put(POOL_WS2, sp.ws);
        return decode_mcus(j, 0, j->nmcu, 0, NULL, NULL, NULL) == BAD ? -1 : 0;
    }
    size_t sync_block = SIZE_MAX, sync_rec = 0;
    int rc = 0;
    uint64_t pos = decode_mcus(j, 0, j->nmcu, 0, &sp, &sync_block, &sync_rec);
    if (pos != BAD && sync_block != SIZE_MAX) {
        if (early) {
            /* The predictors are known up to here: render while the other thread still decodes,
             * a few rows at a time, and stop as soon as it is done (the rest renders on both). */
            int sync_mcu = (int)(sync_block / j->bpm), m = 0;
            while (m < sync_mcu && !atomic_load_explicit(&sp.done, memory_order_acquire)) {
                int end = m + 4 * j->mcux < sync_mcu ? m + 4 * j->mcux : sync_mcu;
                render_mcus_420(j, early, m, end);
                m = end;
            }
            *rendered = m;
        }
        pthread_join(t, NULL);
        size_t need = total - sync_block;
        int ok = sp.count >= sync_rec + need;
        if (ok && sp.last_err != SIZE_MAX && sp.last_err >= sync_rec)
            for (size_t i = sync_rec; ok && i < sync_rec + need; i++) ok = sp.rec[i].phase != 0xFF;
        if (ok) memcpy(j->dcdiff + sync_block, sp.dc + sync_rec, need * sizeof(int16_t));
        if (ok && j->chroma_per_mcu) {
            /* chroma blocks from the sync point on, in both numberings */
            size_t m = sync_block / j->bpm;
            int b = (int)(sync_block % j->bpm);
            size_t abs_slot = m * j->chroma_per_mcu;
            for (int k = 0; k < b; k++) abs_slot += j->phase_chroma_slot[k] >= 0;
            size_t nslots = (size_t)j->nmcu * j->chroma_per_mcu - abs_slot;
            size_t spec_slot = 0; /* chroma blocks the speculating thread decoded before the sync record */
            for (size_t k = 0; k < sync_rec; k++)
                spec_slot += sp.rec[k].phase != 0xFF && j->phase_chroma_slot[sp.rec[k].phase] >= 0;
            memcpy(j->ws + abs_slot * 10, sp.ws + spec_slot * 10, nslots * 10 * sizeof(int32_t));
        }
        if (!ok) {
            /* The speculating thread ran out of room or hit damaged data: finish serially. The
             * serial decode reports the damage itself. */
            int m = (int)(sync_block / j->bpm);
            if (sync_block % j->bpm) rc = -1; /* cannot resume mid-MCU cheaply; let Pillow decode */
            else if (decode_mcus(j, m, j->nmcu, pos, NULL, NULL, NULL) == BAD) rc = -1;
        }
    } else {
        atomic_store(&sp.stop, 1);
        pthread_join(t, NULL);
        if (pos == BAD) rc = -1;
    }
    pool_put(POOL_REC, sp.rec);
    pool_put(POOL_DC2, sp.dc);
    pool_put(POOL_WS2, sp.ws);
    return rc;
}

/* DC sums, reduced IDCTs and colour conversion into `out` (width8 x height8 x ncomp). */
typedef struct {
    Jpeg *j;
    uint8_t *plane[MAX_COMPS];
    uint8_t *out;
    int out_w, out_h, my0, my1;
} RenderJob;

/* DC sums, reduced IDCTs and colour conversion of MCU rows [my0, my1). */
static void *render_rows(void *arg)
{
    RenderJob *rj = arg;
    Jpeg *j = rj->j;
    const int pw = j->mcux * j->hmax, bpm = j->bpm;
    Pred pred[MAX_COMPS] = {0, 0, 0};
    int m0 = rj->my0 * j->mcux;
    /* the DC predictors where this range starts */
    int first = j->dri ? m0 - m0 % j->dri : 0;
    const int16_t *d = j->dcdiff + (size_t)first * bpm, *end = j->dcdiff + (size_t)m0 * bpm;
    for (; d < end; d += bpm)
        for (int b = 0; b < bpm; b++) pred[j->phase_comp[b]] += (Pred)d[b];
    /* per block of an MCU: its plane, its offset from the MCU's corner, its DC quantiser */
    uint8_t *plane_of[MAX_PHASES];
    int offset[MAX_PHASES], qdc[MAX_PHASES];
    for (int b = 0; b < bpm; b++) {
        plane_of[b] = rj->plane[j->phase_comp[b]];
        offset[b] = j->phase_dy[b] * pw + j->phase_dx[b];
        qdc[b] = j->qt[j->comp[j->phase_comp[b]].tq][0];
    }
    d = j->dcdiff + (size_t)m0 * bpm;
    int until_restart = j->dri ? j->dri - (m0 - first) : -1;
    for (int my = rj->my0; my < rj->my1; my++) {
        size_t base = (size_t)my * j->vmax * pw;
        for (int mx = 0; mx < j->mcux; mx++, base += (size_t)j->hmax, d += bpm) {
            if (until_restart == 0) {
                pred[0] = pred[1] = pred[2] = 0;
                until_restart = j->dri;
            }
            until_restart--;
            for (int b = 0; b < bpm; b++) {
                int ci = j->phase_comp[b];
                pred[ci] += (Pred)d[b];
                int dcq = pred_value(pred[ci]) * qdc[b];
                /* every block is 1x1 here: 4:2:0's 2x2 chroma goes through render_420 */
                plane_of[b][base + offset[b]] = IDCT_LIMIT[DESCALE((int64_t)dcq, 3) & 1023];
            }
        }
    }
    int y0 = rj->my0 * j->vmax, y1 = rj->my1 * j->vmax;
    if (y1 > rj->out_h) y1 = rj->out_h;
    int out_w = rj->out_w;
    for (int y = y0; y < y1; y++) {
        const uint8_t *py = rj->plane[0] + (size_t)y * pw;
        if (j->ncomp == 1) {
            memcpy(rj->out + (size_t)y * out_w, py, (size_t)out_w);
            continue;
        }
        const uint8_t *pb = rj->plane[1] + (size_t)y * pw, *pr = rj->plane[2] + (size_t)y * pw;
        uint8_t *o = rj->out + (size_t)y * out_w * 3;
        for (int x = 0; x < out_w; x++) put_rgb(o + 3 * x, py[x], pb[x], pr[x]);
    }
    return NULL;
}

/* Render the decoded blocks into `out` (out_w x out_h x ncomp), the lower half on a second thread. */
typedef struct {
    const Jpeg *j;
    Emit emit;
    int m0, m1;
} Rest420;

static void *render_rest_420(void *arg)
{
    Rest420 *r = arg;
    render_mcus_420(r->j, &r->emit, r->m0, r->m1);
    return NULL;
}

/* The 4:2:0 MCUs [from, nmcu) not rendered yet (predictors in `emit`), the second half on a thread. */
static int render_420(const Jpeg *j, const Emit *emit, int from, int threads)
{
    Rest420 first = {j, *emit, from, j->nmcu}, second = first;
    pthread_t t;
    int split = threads > 1 && j->nmcu - from >= 2048;
    if (split) {
        first.m1 = second.m0 = from + (j->nmcu - from) / 2;
        for (int m = from; m < second.m0; m++) { /* the predictors where the second half starts */
            if (j->dri && m % j->dri == 0) second.emit.pred[0] = second.emit.pred[1] = second.emit.pred[2] = 0;
            const int16_t *d = j->dcdiff + (size_t)m * 6;
            second.emit.pred[0] += (Pred)d[0] + (Pred)d[1] + (Pred)d[2] + (Pred)d[3];
            second.emit.pred[1] += (Pred)d[4];
            second.emit.pred[2] += (Pred)d[5];
        }
        split = pthread_create(&t, NULL, render_rest_420, &second) == 0;
        if (!split) first.m1 = j->nmcu;
    }
    render_mcus_420(j, &first.emit, first.m0, first.m1);
    if (split) pthread_join(t, NULL);
    return first.emit.declined | second.emit.declined;
}

/* Grayscale and 4:4:4: planes of DC pixels, then colour conversion, by MCU rows on two threads. */
static int render(Jpeg *j, uint8_t *out, int out_w, int out_h, int threads)
{
    size_t plane_size = (size_t)j->mcux * j->hmax * j->mcuy * j->vmax;
    uint8_t *planes = pool_get(POOL_PLANES, plane_size * j->ncomp);
    if (!planes) return -1;
    RenderJob top = {j, {NULL, NULL, NULL}, out, out_w, out_h, 0, j->mcuy};
    for (int c = 0; c < j->ncomp; c++) top.plane[c] = planes + (size_t)c * plane_size;
    RenderJob bottom = top;
    pthread_t t;
    int split = threads > 1 && j->nmcu >= 4096;
    if (split) {
        top.my1 = bottom.my0 = j->mcuy / 2;
        split = pthread_create(&t, NULL, render_rows, &bottom) == 0;
        if (!split) top.my1 = j->mcuy;
    }
    render_rows(&top);
    if (split) pthread_join(t, NULL);
    pool_put(POOL_PLANES, planes);
    return 0;
}

static void free_jpeg(Jpeg *j)
{
    pool_put(POOL_BUF, j->buf);
    pool_put(POOL_RST, j->rst_start);
    pool_put(POOL_DC, j->dcdiff);
    pool_put(POOL_WS, j->ws);
}

/* ---- the decoder, without Python (fuzz/ links this part alone) ------------------------------------ */

static void jpeg8_init(void)
{
    init_tables();
    init_acc_tables();
}

/* Read the headers into `j`; returns the offset of the entropy-coded data, or -1: declined. The
 * output is j->width/8 x j->height/8 (rounded up) x j->ncomp bytes. */
static ptrdiff_t jpeg8_prepare(Jpeg *j, const uint8_t *d, ptrdiff_t n)
{
    ptrdiff_t start = parse_headers(j, d, n);
    if (start < 0 || plan_layout(j) != 0) return -1;
    if ((int64_t)j->width * j->height > MAX_PIXELS) return -1; /* callers check far lower limits first */
    for (int c = 0; c < j->ncomp; c++) {
        acc_factors(j->qt[j->comp[c].tq], j->kq[c], j->qz[c]);
        int qmax = 0; /* over the coefficients the 2x2 IDCT reads */
        for (int k = 1; k < 64; k++)
            if (ACC_OF_ZIGZAG[k] != 10 && j->qz[c][k] > qmax) qmax = j->qz[c][k];
        j->check_fast[c] = (int64_t)j->ac[j->comp[c].ta].fast_vmax * qmax > 32767;
    }
    return start;
}

/* The most scratch memory a decode of `j` allocates (with `data_bytes` of entropy-coded data). */
static size_t scratch_estimate(const Jpeg *j, size_t data_bytes, int threads)
{
    size_t total = (size_t)j->nmcu * j->bpm, chroma = (size_t)j->nmcu * j->chroma_per_mcu + 1;
    size_t intervals = j->dri ? ((size_t)j->nmcu + j->dri - 1) / j->dri : 1;
    size_t est = data_bytes + PAD_BYTES + sizeof(uint32_t) * intervals + sizeof(int16_t) * total +
                 sizeof(int32_t) * 10 * chroma;
    if (!j->chroma2x2) est += (size_t)j->mcux * j->hmax * j->mcuy * j->vmax * j->ncomp; /* planes */
    if (threads > 1 && !j->dri) est += (sizeof(Record) + sizeof(int16_t)) * total + sizeof(int32_t) * 10 * chroma;
    return est;
}

/* Decode the data of a prepared `j` into `out`; 0, or -1: declined. Call free_jpeg(j) after. */
static int jpeg8_run(Jpeg *j, const uint8_t *d, ptrdiff_t start, ptrdiff_t n, uint8_t *out, int threads)
{
    int out_w = (j->width + 7) / 8, out_h = (j->height + 7) / 8;
    /* a frame that needs more scratch than one decode may take goes to Pillow (leaner at 1/8) */
    if (scratch_estimate(j, (size_t)(n - start), threads) > MAX_SCRATCH_BYTES) return -1;
    int rc = unstuff(j, d, start, n);
    if (rc != 0) return -1;
    size_t total = (size_t)j->nmcu * j->bpm;
    j->dcdiff = pool_get(POOL_DC, sizeof(int16_t) * total);
    j->ws = pool_get(POOL_WS, sizeof(int32_t) * 10 * ((size_t)j->nmcu * j->chroma_per_mcu + 1));
    Emit emit = {out, out_w, out_h, {0, 0, 0}, 0};
    int rendered = 0;
    rc = (j->dcdiff && j->ws) ? decode_all(j, threads, j->chroma2x2 ? &emit : NULL, &rendered) : -1;
    if (rc == 0 && j->chroma2x2) rc = (render_420(j, &emit, rendered, threads) || emit.declined) ? -1 : 0;
    else if (rc == 0) rc = render(j, out, out_w, out_h, threads);
    return rc;
}

#ifndef JPEG8_NO_PYTHON

/* decode_eighth(data, threads) -> (width, height, channels, pixels) or None */
static PyObject *decode_eighth(PyObject *self, PyObject *args)
{
    Py_buffer view;
    int threads = 2;
    if (!PyArg_ParseTuple(args, "y*|i", &view, &threads)) return NULL;
    if (!enter_flight()) { /* as many decodes as allowed are running: Pillow takes this one */
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    const uint8_t *d = view.buf;
    Jpeg *j = calloc(1, sizeof(Jpeg));
    PyObject *result = NULL, *pixels = NULL;
    if (!j) {
        leave_flight();
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    ptrdiff_t start = jpeg8_prepare(j, d, (ptrdiff_t)view.len);
    if (start < 0) goto unsupported;
    int out_w = (j->width + 7) / 8, out_h = (j->height + 7) / 8;
    pixels = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)out_w * out_h * j->ncomp);
    if (!pixels) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = jpeg8_run(j, d, start, (ptrdiff_t)view.len, (uint8_t *)PyBytes_AS_STRING(pixels), threads);
    Py_END_ALLOW_THREADS
    if (rc != 0) goto unsupported;
    result = Py_BuildValue("(iiiN)", out_w, out_h, j->ncomp, pixels);
    pixels = NULL;
    goto done;
unsupported:
    result = Py_NewRef(Py_None);
fail:
done:
    Py_XDECREF(pixels);
    free_jpeg(j);
    free(j);
    leave_flight();
    PyBuffer_Release(&view);
    return result;
}

/* memory_stats(reset_peak=False) -> dict */
static PyObject *memory_stats(PyObject *self, PyObject *args)
{
    int reset = 0;
    if (!PyArg_ParseTuple(args, "|p", &reset)) return NULL;
    pthread_mutex_lock(&POOL_LOCK);
    size_t kept = POOL_KEPT, in_use = SCRATCH_IN_USE, peak = SCRATCH_PEAK, keep = POOL_KEEP_BYTES;
    if (reset) SCRATCH_PEAK = SCRATCH_IN_USE;
    pthread_mutex_unlock(&POOL_LOCK);
    int flight_peak = atomic_load(&IN_FLIGHT_PEAK);
    if (reset) atomic_store(&IN_FLIGHT_PEAK, atomic_load(&IN_FLIGHT));
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:n,s:i,s:i,s:i}", "kept_bytes", (Py_ssize_t)kept, "keep_limit_bytes",
                         (Py_ssize_t)keep, "scratch_in_use_bytes", (Py_ssize_t)in_use, "scratch_peak_bytes",
                         (Py_ssize_t)peak, "max_scratch_bytes", (Py_ssize_t)MAX_SCRATCH_BYTES, "in_flight",
                         atomic_load(&IN_FLIGHT), "in_flight_peak", flight_peak, "max_in_flight", MAX_IN_FLIGHT);
}

/* set_limits(max_in_flight, keep_bytes, max_scratch_bytes) -> None */
static PyObject *set_limits(PyObject *self, PyObject *args)
{
    int max_in_flight;
    Py_ssize_t keep, max_scratch = (Py_ssize_t)MAX_SCRATCH_BYTES;
    if (!PyArg_ParseTuple(args, "in|n", &max_in_flight, &keep, &max_scratch)) return NULL;
    if (max_in_flight < 1 || keep < 0 || max_scratch < 0) {
        PyErr_SetString(PyExc_ValueError, "max_in_flight must be >= 1, keep_bytes and max_scratch_bytes >= 0");
        return NULL;
    }
    MAX_IN_FLIGHT = max_in_flight;
    MAX_SCRATCH_BYTES = (size_t)max_scratch;
    pool_set_keep((size_t)keep);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_eighth", decode_eighth, METH_VARARGS,
     "decode_eighth(data, threads=2) -> (width, height, channels, pixels) or None.\n\n"
     "Decode a baseline JPEG at 1/8 scale exactly as libjpeg-turbo does, on up to two threads. None\n"
     "means: not a file this decoder handles exactly, or max_in_flight decodes already running;\n"
     "decode it with Pillow."},
    {"memory_stats", memory_stats, METH_VARARGS,
     "memory_stats(reset_peak=False) -> dict: scratch bytes kept between calls, in use, the peak in\n"
     "use since the last reset, and decodes in flight (now, peak, allowed)."},
    {"set_limits", set_limits, METH_VARARGS,
     "set_limits(max_in_flight, keep_bytes, max_scratch_bytes=64 MiB): decodes allowed at once, the most\n"
     "scratch memory kept between calls (kept buffers are freed now), the most one decode may use."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg8", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpeg8(void)
{
    jpeg8_init();
    pthread_atfork(NULL, NULL, pool_after_fork_in_child);
    return PyModule_Create(&module);
}

#endif /* JPEG8_NO_PYTHON */
