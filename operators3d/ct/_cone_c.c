/* Compiled CPU kernels of the cone-beam projector: the same pair discretisation as
 * operators3d/ct/_cone_kernels.py (pair_gather / pair_scatter), fused into one pass per pair.
 *
 * Plain C, no Python or torch headers: operators3d/ct/_cone_native.py compiles this file on
 * first use and calls it through ctypes. Float32 and float64 versions are made by the macro
 * below from one body.
 *
 * Tables (one entry per (ray column, plane) pair q, as built by ConeBeamCT._ray_tables):
 *   row_index (Q, 2) int32: the two padded D-rows the ray column crosses in plane q;
 *   row_weight (Q, 2): their in-plane weights; zslope (Q,): D-position per unit of height;
 *   ray (Q,) int64: the ray column of the pair.
 * Rows are padded: row length P = L + 3, data at 1..L, zeros at 0, L + 1, L + 2.
 *
 * Position of detector row m in pair q, in exactly the torch kernel's arithmetic (dtype T):
 *   pos = clamp(zslope[q] * zcoord[m] + (T)(zoff - W + 1), -W, L + 1 - W),  W = floor(zoff)
 *   i = floor(pos) + W (padded index), f = pos - floor(pos)
 *   forward  out[ray, c, m] += l(i) + f * (l(i + 1) - l(i)),  l(k) = w0 s0[c, k] + w1 s1[c, k]
 *   adjoint  the transpose: s0[c, i] += w0 (g - g f), s0[c, i + 1] += w0 g f, likewise s1.
 *
 * Rows m whose exact position p = zslope * zcoord[m] + zoff lies outside (-1, L) only read or
 * write zero pads; each pair visits only the rows of (-1, L) (widened by a bound on the
 * rounding of the position arithmetic, so no row that can touch data is skipped): a thin slab
 * costs its own samples plus a fixed cost per pair.
 *
 * Pairs go in blocks of CONE_BLOCK: first every pair's rows, positions and fractions (four
 * float32 or two float64 rows at a time with SSE2, the same operations in the same order as
 * the scalar code) and prefetches of its D-rows and output row, then the samples; so one
 * pair's latencies (the row window, the positions, the first loads) overlap the others'.
 * The adjoint keeps the two line entries a sample writes in registers while the index does
 * not move (it is non-decreasing in m for a positive slope and increasing heights), so every
 * padded entry is added to memory once per pair instead of once per sample: for windows of
 * fewer than CONE_LONG rows by a branch when the index moves, for longer ones by selects
 * (both registers stored into a line buffer at every sample, the line added afterwards), which
 * measured about 10 % faster on whole volumes and slower on thin slabs. The branching one
 * forms f g and (1 - f) g as it goes (same operations, no buffer pass). gcc compiles the
 * selects to two branches per sample, which the predictor mostly gets right and which keep the
 * registers' dependency chain short: the same selects forced branch-free (SSE bit masks)
 * measured 1.5-2x slower on whole volumes (2026-12-05, in-process A/B at 128^3 x 180), and
 * forming f g inside the long loop (as the short one does) slower too (whole adjoint 0.52-0.54 s
 * against 0.42-0.45 s, separate processes under load 2.5-4).
 *
 * Long windows (CONE_LONG rows or more: whole volumes and thick slabs) also prefetch, in phase
 * one, every cache line of both D-rows their samples reach, not only the first: a whole
 * volume's padded rows (8.6 MB at 128^3 in float32) do not stay in the core's cache, and the
 * hardware prefetcher does not follow each pair's jump to two new rows. Measured (2026-12-05,
 * both builds loaded in one process and alternated, 128^3 x 180, float32, 1 thread, load
 * 3.5-4): whole-volume forward -7 %, adjoint -6.5 %; thin slabs unchanged (their windows
 * span one or two lines, already prefetched).
 *
 * Thin slabs: every pair meets every D-slab of a volume the detector sees whole, so a slab call
 * visits all pairs for a few samples each (about 9 for 8 slices at 128^3); what a pair costs
 * beside its samples is kept small: its row bounds go two pairs at a time with SSE2 and
 * branch-free int32 (rows_for), and a block's scratch is not cleared. Measured alternatives
 * that were slower on 8-slice slabs: pairs in ray order instead of slope order, samples padded
 * to whole vectors (windows rounded up to 4 rows), no prefetches, blocks of 16 or 64 pairs,
 * the plain adjoint (four read-modify-writes per sample) or the line buffer for short windows.
 * Also measured and left out (2026-12-05): every window of a block as long as its longest
 * (the slope-sorted pairs' counts differ by a row or two, so each pair's loops would run a
 * count the branch predictor knows; extra rows read or write only pads): no gain on 8-slice
 * slabs (pieces within 2 %); the adjoint's long lines of two pairs interleaved in one loop
 * (two independent dependency chains): no change in the OpenMP build, in the build without
 * OpenMP adjoint -24 % but forward +6-10 % (code layout), so not kept.
 *
 * Each entry point returns 0, or 1 when it could not allocate its per-pair buffers (then
 * nothing was added).
 *
 * Threads (only when compiled with OpenMP and called with nthreads > 1): the forward splits
 * the detector rows, the adjoint the padded D-entries, among threads; every thread walks all
 * pairs over its share, so results do not depend on scheduling.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

int cone_c_abi_version(void) { return 2; }

int cone_c_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* pairs per block: positions of a block computed before its samples */
#ifndef CONE_BLOCK
#define CONE_BLOCK 32
#endif

/* Per call: the rows m whose exact position p = zslope * zcoord[m] + zoff can lie in
 * (plo, phi) are those with  lo_a / zslope + lo_b < m < hi_a / zslope + hi_b  when the heights
 * are increasing and the slope positive (zcoord affine in m; the bounds are widened by a bound
 * on the rounding of the position arithmetic in dtype T and of the heights, eps relative). */
typedef struct {
    double lo_a, lo_b, hi_a, hi_b;
    int affine;
} row_bounds;

static row_bounds make_bounds(double z0, double z1, int64_t num_m, double zoff, double plo,
                              double phi, double eps) {
    row_bounds r = {0, 0, 0, 0, 0};
    if (num_m < 2 || !(z1 > z0)) return r;
    double dz = (z1 - z0) / (double)(num_m - 1);
    double zmax = fmax(fabs(z0), fabs(z1));
    double slack = 16 * eps * (fabs(zoff) + 4), zslack = 16 * eps * zmax;
    r.lo_a = (plo - slack - zoff) / dz;
    r.lo_b = (-zslack - z0) / dz - 1e-6; /* and a millionth of a row for this arithmetic */
    r.hi_a = (phi + slack - zoff) / dz;
    r.hi_b = (zslack - z0) / dz + 1e-6;
    r.affine = 1;
    return r;
}

/* The rows [first, first + count) of n slopes, clipped to [v0, v1): every row unless the bounds
 * apply and the slope is positive. A thin slab's call spends a good part of its per-pair time
 * here, so the double part goes two slopes at a time with SSE2 (the same operations as the
 * scalar code: selects, clamps by max/min, truncations of positive values) and the rest in
 * branch-free int32 (row counts below 2^31). */
static inline void rows_one(double lo_a, double lo_b, double hi_a, double hi_b, double top,
                            int32_t affine, double z, int32_t *ta, int32_t *tb, int32_t *full) {
    int32_t f = !affine | !(z > 0);
    double inv = 1 / (f ? 1.0 : z);
    double a = lo_a * inv + lo_b, b = hi_a * inv + hi_b;
    a = a < -2 ? -2 : a;
    a = a > top + 2 ? top + 2 : a;
    b = b < -2 ? -2 : b;
    b = b > top + 2 ? top + 2 : b;
    *ta = (int32_t)(a + 3);
    *tb = (int32_t)(top + 3 - b);
    *full = f;
}

static void rows_for(const row_bounds *r, const double *zs, int64_t n, int64_t num_m, int64_t v0,
                     int64_t v1, int32_t *restrict first, int32_t *restrict count) {
    double top = (double)num_m;
    int32_t ta[CONE_BLOCK], tb[CONE_BLOCK], full[CONE_BLOCK];
    int32_t m = (int32_t)num_m, w0 = (int32_t)v0, w1 = (int32_t)v1;
    int64_t p = 0;
#if defined(__SSE2__)
    if (r->affine) {
        __m128d vla = _mm_set1_pd(r->lo_a), vlb = _mm_set1_pd(r->lo_b);
        __m128d vha = _mm_set1_pd(r->hi_a), vhb = _mm_set1_pd(r->hi_b);
        __m128d one = _mm_set1_pd(1), lo = _mm_set1_pd(-2), hi = _mm_set1_pd(top + 2);
        __m128d three = _mm_set1_pd(3), top3 = _mm_set1_pd(top + 3), zero = _mm_setzero_pd();
        for (; p + 2 <= n; p += 2) {
            __m128d z = _mm_loadu_pd(zs + p);
            __m128d pos = _mm_cmpgt_pd(z, zero); /* not full */
            __m128d zz = _mm_or_pd(_mm_and_pd(pos, z), _mm_andnot_pd(pos, one));
            __m128d inv = _mm_div_pd(one, zz);
            __m128d a = _mm_add_pd(_mm_mul_pd(vla, inv), vlb);
            __m128d b = _mm_add_pd(_mm_mul_pd(vha, inv), vhb);
            a = _mm_min_pd(_mm_max_pd(a, lo), hi);
            b = _mm_min_pd(_mm_max_pd(b, lo), hi);
            __m128i ia = _mm_cvttpd_epi32(_mm_add_pd(a, three));
            __m128i ib = _mm_cvttpd_epi32(_mm_sub_pd(top3, b));
            __m128i fm = _mm_shuffle_epi32(_mm_castpd_si128(pos), _MM_SHUFFLE(3, 3, 2, 0));
            _mm_storel_epi64((__m128i *)(ta + p), ia);
            _mm_storel_epi64((__m128i *)(tb + p), ib);
            _mm_storel_epi64((__m128i *)(full + p), _mm_add_epi32(fm, _mm_set1_epi32(1)));
        }
    }
#endif
    for (; p < n; ++p)
        rows_one(r->lo_a, r->lo_b, r->hi_a, r->hi_b, top, r->affine, zs[p], ta + p, tb + p,
                 full + p);
    for (p = 0; p < n; ++p) {
        int32_t lo = ta[p] - 2;        /* floor(a) + 1 */
        int32_t hi = m + 3 - tb[p];    /* ceil(b) */
        lo = full[p] ? 0 : lo;
        hi = full[p] ? m : hi;
        lo = lo < w0 ? w0 : lo;
        hi = hi > w1 ? w1 : hi;
        first[p] = lo;
        count[p] = hi > lo ? hi - lo : 0;
    }
}

#if defined(__SSE2__)
#include <emmintrin.h>
#define CONE_SIMD_POSITIONS(SUF, T, W, VEC, SET1, LOADU, STOREU, MUL, ADD, SUB, MAX, MIN, CMPGT,  \
                            AND, TOINT, FROMINT, STOREI)                                        \
    static void positions_##SUF(T zs, const T *zc, int64_t n, T shift, T lo, T hi,             \
                                int32_t whole, int32_t *restrict index, T *restrict frac) {    \
        VEC vzs = SET1(zs), vsh = SET1(shift), vlo = SET1(lo), vhi = SET1(hi), one = SET1(1);  \
        __m128i vwh = _mm_set1_epi32(whole);                                                   \
        int64_t j = 0;                                                                         \
        for (; j + W <= n; j += W) {                                                           \
            VEC pos = ADD(MUL(vzs, LOADU(zc + j)), vsh);                                       \
            pos = MIN(MAX(pos, vlo), vhi);                                                     \
            __m128i t = TOINT(pos);                                                            \
            VEC ft = FROMINT(t);                                                               \
            VEC down = CMPGT(ft, pos);                                                         \
            STOREI(index + j, _mm_add_epi32(_mm_add_epi32(t, CONE_MASK_##SUF(down)), vwh));    \
            STOREU(frac + j, SUB(pos, SUB(ft, AND(down, one))));                               \
        }                                                                                      \
        positions_scalar_##SUF(zs, zc + j, n - j, shift, lo, hi, whole, index + j, frac + j);  \
    }
/* a comparison mask (all ones where true) as int32 lanes of -1 or 0 */
#define CONE_MASK_f32(m) _mm_castps_si128(m)
#define CONE_MASK_f64(m) _mm_shuffle_epi32(_mm_castpd_si128(m), _MM_SHUFFLE(3, 3, 2, 0))
static inline void cone_store4(int32_t *p, __m128i v) { _mm_storeu_si128((__m128i *)p, v); }
static inline void cone_store2(int32_t *p, __m128i v) { _mm_storel_epi64((__m128i *)p, v); }
#endif

#define CONE_KERNELS(T, SUF, EPS)                                                              \
    /* Padded index i = floor(pos) + W and fraction pos - floor(pos) of rows [0, n) of zc, in  \
     * the torch kernel's arithmetic; positions_##SUF does the same operations in the same     \
     * order four (float32) or two (float64) rows at a time where SSE2 exists. */              \
    static void positions_scalar_##SUF(T zs, const T *zc, int64_t n, T shift, T lo, T hi,      \
                                int32_t whole, int32_t *restrict index, T *restrict frac) {    \
        for (int64_t j = 0; j < n; ++j) {                                                      \
            T pos = zs * zc[j];                                                                \
            pos = pos + shift;                                                                 \
            pos = pos < lo ? lo : pos;                                                         \
            pos = pos > hi ? hi : pos;                                                         \
            int32_t t = (int32_t)pos;                                                          \
            T ft = (T)t;                                                                       \
            int32_t down = ft > pos;                                                           \
            ft = down ? ft - 1 : ft; /* floor */                                               \
            index[j] = t - down + whole;                                                       \
            frac[j] = pos - ft;                                                                \
        }                                                                                      \
    }                                                                                          \
    CONE_POSITIONS_##SUF                                                                       \
                                                                                               \
    /* The heights and four copies of the last (so that positions_##SUF may run whole          \
     * vectors past a pair's last row), or NULL without memory. */                             \
    static T *padded_heights_##SUF(const T *zcoord, int64_t num_m) {                           \
        T *z = malloc(sizeof(T) * (num_m + 4));                                                \
        if (z)                                                                                 \
            for (int64_t j = 0; j < num_m + 4; ++j)                                            \
                z[j] = num_m ? zcoord[j < num_m ? j : num_m - 1] : 0;                          \
        return z;                                                                              \
    }                                                                                          \
    /* Phase one of a block of pairs: each pair's rows [m0, m0 + n) (n = 0: none), positions   \
     * and fractions (stride apart), and prefetches of its rows; phase two then finds the      \
     * positions computed and the rows on their way, so the pairs' latencies overlap. */       \
    static void plan_block_##SUF(const row_bounds *rb, const T *zslope, const int32_t *rows,   \
                                 int64_t q0, int64_t q1, int64_t num_m, int64_t v0, int64_t v1, \
                                 const T *zpad, T shift, T lo, T hi, int32_t whole,            \
                                 const T *data, int64_t plane, const int64_t *ray,             \
                                 const T *other, int64_t column, int32_t *first,               \
                                 int32_t *count, int32_t *index, T *frac, int64_t stride) {    \
        double slopes[CONE_BLOCK]; /* only the first q1 - q0 are read */                      \
        for (int64_t q = q0; q < q1; ++q) slopes[q - q0] = (double)zslope[q];                  \
        rows_for(rb, slopes, q1 - q0, num_m, v0, v1, first, count);                      \
        for (int64_t q = q0; q < q1; ++q) {                                                    \
            int64_t p = q - q0, m0 = first[p];                                                 \
            if (!count[p]) continue;                                                           \
            positions_##SUF(zslope[q], zpad + m0, (count[p] + 3) & ~(int64_t)3, shift, lo, hi, \
                            whole, index + p * stride, frac + p * stride);                     \
            CONE_PREFETCH(data + (int64_t)rows[2 * q] * plane + index[p * stride]);            \
            CONE_PREFETCH(data + (int64_t)rows[2 * q + 1] * plane + index[p * stride]);        \
            if (count[p] >= CONE_LONG) { /* long windows: every line their samples reach */    \
                int64_t e0 = index[p * stride], e1 = index[p * stride + count[p] - 1];         \
                int64_t lo_e = e0 < e1 ? e0 : e1, hi_e = (e0 < e1 ? e1 : e0) + 2;              \
                const T *ra = data + (int64_t)rows[2 * q] * plane;                             \
                const T *rb_ = data + (int64_t)rows[2 * q + 1] * plane;                        \
                for (int64_t e = lo_e; e < hi_e; e += CONE_LINE_ELEMS(T)) {                    \
                    CONE_PREFETCH(ra + e);                                                     \
                    CONE_PREFETCH(rb_ + e);                                                    \
                }                                                                              \
                CONE_PREFETCH(ra + hi_e - 1);                                                  \
                CONE_PREFETCH(rb_ + hi_e - 1);                                                 \
            }                                                                                  \
            CONE_PREFETCH(other + ray[q] * column + m0);                                       \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    static int gather_rows_##SUF(const T *src, int64_t channels, int64_t width,                \
                                  const int32_t *row_index, const T *row_weight,               \
                                  const T *zslope, const int64_t *ray, int64_t num_q,          \
                                  const T *zcoord, int64_t num_m, double zoff, T *out,         \
                                  int64_t v0, int64_t v1) {                                    \
        int64_t length = width - 3;                                                            \
        double whole_d = floor(zoff);                                                          \
        int32_t whole = (int32_t)whole_d;                                                      \
        T shift = (T)(zoff - whole_d + 1), lo = (T)(-whole_d), hi = (T)(length + 1 - whole_d); \
        double z0 = num_m ? (double)zcoord[0] : 0, z1 = num_m ? (double)zcoord[num_m - 1] : 0; \
        row_bounds rb = make_bounds(z0, z1, num_m, zoff, -1.0, (double)length, EPS);           \
        int64_t plane = channels * width, column = channels * num_m;                           \
        int64_t stride = (num_m + 4 + 7) & ~(int64_t)7;                                        \
        int32_t first[CONE_BLOCK], count[CONE_BLOCK];                                          \
        int32_t *index = malloc(sizeof(int32_t) * stride * CONE_BLOCK);                        \
        T *frac = malloc(sizeof(T) * stride * CONE_BLOCK);                                     \
        T *zpad = padded_heights_##SUF(zcoord, num_m);                                         \
        int failed = !index || !frac || !zpad;                                                 \
        if (failed) num_q = 0;                                                                 \
        for (int64_t q0 = 0; q0 < num_q; q0 += CONE_BLOCK) {                                   \
            int64_t q1 = q0 + CONE_BLOCK < num_q ? q0 + CONE_BLOCK : num_q;                    \
            plan_block_##SUF(&rb, zslope, row_index, q0, q1, num_m, v0, v1, zpad, shift, lo, hi, \
                             whole, src, plane, ray, out, column, first, count, index, frac,  \
                             stride);                                                         \
            for (int64_t q = q0; q < q1; ++q) {                                                \
                int64_t p = q - q0, m0 = first[p], n = count[p];                               \
                if (!n) continue;                                                              \
                const int32_t *ix = index + p * stride;                                        \
                const T *fr = frac + p * stride;                                               \
                const T *s0 = src + (int64_t)row_index[2 * q] * plane;                         \
                const T *s1 = src + (int64_t)row_index[2 * q + 1] * plane;                     \
                T w0 = row_weight[2 * q], w1 = row_weight[2 * q + 1];                          \
                T *o = out + ray[q] * column;                                                  \
                for (int64_t c = 0; c < channels; ++c) {                                       \
                    const T *a = s0 + c * width, *b = s1 + c * width;                          \
                    T *oc = o + c * num_m + m0;                                                \
                    for (int64_t j = 0; j < n; ++j) {                                          \
                        int64_t i = ix[j];                                                     \
                        T l0 = w0 * a[i] + w1 * b[i];                                          \
                        T l1 = w0 * a[i + 1] + w1 * b[i + 1];                                  \
                        oc[j] += l0 + fr[j] * (l1 - l0);                                       \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        free(index);                                                                           \
        free(frac);                                                                            \
        free(zpad);                                                                            \
        return failed;                                                                         \
    }                                                                                          \
    int cone_gather_##SUF(const T *src, int64_t channels, int64_t width,                       \
                           const int32_t *row_index, const T *row_weight, const T *zslope,     \
                           const int64_t *ray, int64_t num_q, const T *zcoord, int64_t num_m,  \
                           double zoff, T *out, int nthreads) {                                \
        if (nthreads <= 1 || num_m < 2 * nthreads) {                                           \
            return gather_rows_##SUF(src, channels, width, row_index, row_weight, zslope, ray, \
                                     num_q, zcoord, num_m, zoff, out, 0, num_m);               \
        }                                                                                      \
        int failed = 0;                                                                        \
        _Pragma("omp parallel num_threads(nthreads) reduction(|: failed)") {                   \
            int t = 0, n = 1;                                                                  \
            CONE_THREAD_IDS(t, n);                                                             \
            failed |= gather_rows_##SUF(src, channels, width, row_index, row_weight, zslope,   \
                                        ray, num_q, zcoord, num_m, zoff, out, num_m * t / n,   \
                                        num_m * (t + 1) / n);                                  \
        }                                                                                      \
        return failed;                                                                         \
    }                                                                                          \
                                                                                               \
    /* Adds the pairs' shares to the padded entries [k0, k1) of each row. */                    \
    static int scatter_entries_##SUF(                                       \
        const T *grad, int64_t channels, int64_t width, const int32_t *row_index,  \
        const T *row_weight, const T *zslope, const int64_t *ray, int64_t num_q,               \
        const T *zcoord, int64_t num_m, double zoff, T *dst, int64_t k0, int64_t k1) {         \
        int64_t length = width - 3;                                                            \
        double whole_d = floor(zoff);                                                          \
        int32_t whole = (int32_t)whole_d;                                                      \
        T shift = (T)(zoff - whole_d + 1), lo = (T)(-whole_d), hi = (T)(length + 1 - whole_d); \
        double z0 = num_m ? (double)zcoord[0] : 0, z1 = num_m ? (double)zcoord[num_m - 1] : 0; \
        int monotone = num_m >= 1 && (num_m < 2 || z1 > z0);                                   \
        for (int64_t m = 1; monotone && m < num_m; ++m)                                        \
            if (!(zcoord[m] >= zcoord[m - 1])) monotone = 0;                                   \
        /* padded entry k = floor(p) + 1 and k + 1 are written: p in [k0 - 2, k1 - 1) */       \
        double plo = fmax(-1.0, (double)k0 - 2), phi = fmin((double)length, (double)k1 - 1);   \
        row_bounds rb = make_bounds(z0, z1, num_m, zoff, plo, phi, EPS);                       \
        int64_t plane = channels * width, column = channels * num_m;                           \
        int64_t stride = (num_m + 4 + 7) & ~(int64_t)7;                                        \
        int32_t first[CONE_BLOCK], count[CONE_BLOCK];                                          \
        int32_t *index = malloc(sizeof(int32_t) * stride * CONE_BLOCK);                        \
        T *frac = malloc(sizeof(T) * stride * CONE_BLOCK);                                     \
        T *up = malloc(sizeof(T) * stride);                                                    \
        T *down = malloc(sizeof(T) * stride);                                                  \
        T *line = malloc(sizeof(T) * (width + 2));                                             \
        T *zpad = padded_heights_##SUF(zcoord, num_m);                                         \
        int failed = !index || !frac || !up || !down || !line || !zpad;                        \
        if (failed) num_q = 0;                                                                 \
        for (int64_t q0 = 0; q0 < num_q; q0 += CONE_BLOCK) {                                   \
            int64_t q1 = q0 + CONE_BLOCK < num_q ? q0 + CONE_BLOCK : num_q;                    \
            plan_block_##SUF(&rb, zslope, row_index, q0, q1, num_m, 0, num_m, zpad, shift, lo, \
                             hi, whole, dst, plane, ray, grad, column, first, count, index,    \
                             frac, stride);                                                    \
            for (int64_t q = q0; q < q1; ++q) {                                                \
                int64_t p = q - q0, m0 = first[p], n = count[p];                               \
                if (!n) continue;                                                              \
                const int32_t *ix = index + p * stride;                                        \
                const T *fr = frac + p * stride;                                               \
                T *s0 = dst + (int64_t)row_index[2 * q] * plane;                               \
                T *s1 = dst + (int64_t)row_index[2 * q + 1] * plane;                           \
                T w0 = row_weight[2 * q], w1 = row_weight[2 * q + 1];                          \
                const T *g = grad + ray[q] * column + m0;                                      \
                int carry = monotone && zslope[q] > 0;                                         \
                for (int64_t c = 0; c < channels; ++c) {                                       \
                    T *a = s0 + c * width, *b = s1 + c * width;                                \
                    const T *gc = g + c * num_m;                                               \
                    if (!carry || n >= CONE_LONG) /* short windows: in the loop below */       \
                        for (int64_t j = 0; j < n; ++j) { /* f g and (1 - f) g, as torch */    \
                            up[j] = gc[j] * fr[j];                                             \
                            down[j] = gc[j] - up[j];                                           \
                        }                                                                      \
                    if (!carry) {                                                              \
                        for (int64_t j = 0; j < n; ++j) {                                      \
                            int64_t i = ix[j];                                                 \
                            if (i >= k0 && i < k1) {                                           \
                                a[i] += w0 * down[j];                                          \
                                b[i] += w1 * down[j];                                          \
                            }                                                                  \
                            if (i + 1 >= k0 && i + 1 < k1) {                                   \
                                a[i + 1] += w0 * up[j];                                        \
                                b[i + 1] += w1 * up[j];                                        \
                            }                                                                  \
                        }                                                                      \
                        continue;                                                              \
                    }                                                                          \
                    if (n >= CONE_LONG) {                                                      \
                        /* Long windows: the same two registers, but each sample stores both   \
                         * into the pair's line (plain stores, no branch); an entry holds its  \
                         * full sum once k has passed it. */                                   \
                        int64_t kl = ix[0], span = ix[n - 1] - kl + 2;                         \
                        for (int64_t r = 0; r < span; ++r) line[r] = 0;                        \
                        int64_t kk = 0;                                                        \
                        T here = 0, next = 0;                                                  \
                        for (int64_t j = 0; j < n; ++j) {                                      \
                            int64_t d = ix[j] - kl - kk;                                       \
                            T moved = d == 1 ? next : 0;                                       \
                            here = d == 0 ? here : moved;                                      \
                            next = d == 0 ? next : 0;                                          \
                            kk += d;                                                           \
                            here += down[j];                                                   \
                            next += up[j];                                                     \
                            line[kk] = here;                                                   \
                            line[kk + 1] = next;                                               \
                        }                                                                      \
                        int64_t r0 = k0 - kl > 0 ? k0 - kl : 0;                                \
                        int64_t r1 = k1 - kl < span ? k1 - kl : span;                          \
                        for (int64_t r = r0; r < r1; ++r) {                                    \
                            a[kl + r] += w0 * line[r];                                         \
                            b[kl + r] += w1 * line[r];                                         \
                        }                                                                      \
                        continue;                                                              \
                    }                                                                          \
                    /* Registers hold the line's entries k and k + 1; k only grows. */         \
                    int64_t k = ix[0];                                                         \
                    T here = 0, next = 0;                                                      \
                    for (int64_t j = 0; j < n; ++j) {                                          \
                        int64_t i = ix[j];                                                     \
                        while (k < i) {                                                        \
                            if (k >= k0 && k < k1) {                                           \
                                a[k] += w0 * here;                                             \
                                b[k] += w1 * here;                                             \
                            }                                                                  \
                            here = next;                                                       \
                            next = 0;                                                          \
                            ++k;                                                               \
                        }                                                                      \
                        T u = gc[j] * fr[j]; /* up[j] and down[j] as above */                  \
                        here += gc[j] - u;                                                     \
                        next += u;                                                             \
                    }                                                                          \
                    if (k >= k0 && k < k1) {                                                   \
                        a[k] += w0 * here;                                                     \
                        b[k] += w1 * here;                                                     \
                    }                                                                          \
                    if (k + 1 >= k0 && k + 1 < k1) {                                           \
                        a[k + 1] += w0 * next;                                                 \
                        b[k + 1] += w1 * next;                                                 \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        free(index);                                                                           \
        free(frac);                                                                            \
        free(up);                                                                              \
        free(down);                                                                            \
        free(line);                                                                            \
        free(zpad);                                                                            \
        return failed;                                                                         \
    }                                                                                          \
    int cone_scatter_##SUF(const T *grad, int64_t channels, int64_t width,                     \
                            const int32_t *row_index, const T *row_weight, const T *zslope,    \
                            const int64_t *ray, int64_t num_q, const T *zcoord, int64_t num_m, \
                            double zoff, T *dst, int nthreads) {                               \
        if (nthreads <= 1 || width < 2 * nthreads) {                                           \
            return scatter_entries_##SUF(grad, channels, width, row_index, row_weight,      \
                                         zslope, ray, num_q, zcoord, num_m, zoff, dst, 0,      \
                                         width);                                               \
        }                                                                                      \
        int failed = 0;                                                                        \
        _Pragma("omp parallel num_threads(nthreads) reduction(|: failed)") {                   \
            int t = 0, n = 1;                                                                  \
            CONE_THREAD_IDS(t, n);                                                             \
            failed |= scatter_entries_##SUF(grad, channels, width, row_index, row_weight,   \
                                            zslope, ray, num_q, zcoord, num_m, zoff, dst,      \
                                            width * t / n, width * (t + 1) / n);               \
        }                                                                                      \
        return failed;                                                                         \
    }

#if defined(CONE_PREFETCH)
#elif defined(__GNUC__)
#define CONE_PREFETCH(p) __builtin_prefetch(p)
#else
#define CONE_PREFETCH(p) ((void)(p))
#endif
/* elements of type T per 64-byte cache line */
#define CONE_LINE_ELEMS(T) ((int64_t)(64 / sizeof(T)))
/* rows from which the adjoint's line buffer (see the top) beats the branching one, and from
 * which a window prefetches every line of its D-rows */
#ifndef CONE_LONG
#define CONE_LONG 24
#endif

#ifdef _OPENMP
#define CONE_THREAD_IDS(t, n)        \
    do {                             \
        t = omp_get_thread_num();    \
        n = omp_get_num_threads();   \
    } while (0)
#else
#define CONE_THREAD_IDS(t, n) \
    do {                      \
        (void)t;              \
        (void)n;              \
    } while (0)
#endif

#if defined(__SSE2__)
#define CONE_POSITIONS_f32                                                                     \
    CONE_SIMD_POSITIONS(f32, float, 4, __m128, _mm_set1_ps, _mm_loadu_ps, _mm_storeu_ps,       \
                        _mm_mul_ps, _mm_add_ps, _mm_sub_ps, _mm_max_ps, _mm_min_ps,            \
                        _mm_cmpgt_ps, _mm_and_ps, _mm_cvttps_epi32, _mm_cvtepi32_ps,           \
                        cone_store4)
#define CONE_POSITIONS_f64                                                                     \
    CONE_SIMD_POSITIONS(f64, double, 2, __m128d, _mm_set1_pd, _mm_loadu_pd, _mm_storeu_pd,     \
                        _mm_mul_pd, _mm_add_pd, _mm_sub_pd, _mm_max_pd, _mm_min_pd,            \
                        _mm_cmpgt_pd, _mm_and_pd, _mm_cvttpd_epi32, _mm_cvtepi32_pd,           \
                        cone_store2)
#else
#define CONE_POSITIONS_f32 CONE_SCALAR_POSITIONS(f32, float)
#define CONE_POSITIONS_f64 CONE_SCALAR_POSITIONS(f64, double)
#endif
#define CONE_SCALAR_POSITIONS(SUF, T)                                                          \
    static void positions_##SUF(T zs, const T *zc, int64_t n, T shift, T lo, T hi,             \
                                int32_t whole, int32_t *restrict index, T *restrict frac) {    \
        positions_scalar_##SUF(zs, zc, n, shift, lo, hi, whole, index, frac);                  \
    }

CONE_KERNELS(float, f32, FLT_EPSILON)
CONE_KERNELS(double, f64, DBL_EPSILON)
