/* BatchNorm (training mode) and ReLU, in either order, fused one pass each way, for channels_last tensors seen as
 * P rows (batch x height x width) of C channels, in bf16 (uint16 bits) or fp32.
 *
 * Stock PyTorch reads and writes each activation 5 times forward (statistics, normalise,
 * ReLU in place) and 8 times backward (ReLU mask, BatchNorm's two passes); these kernels do
 * it in 3 and 5. Sums are kept per thread in float over blocks of BLOCK rows, then in double:
 * the shifted sums (x - x[0]) keep the variance exact to float rounding for any mean.
 *
 * Built at first use by vggkit.training.fused_bn with the machine's own compiler:
 *   cc -O3 -march=native -fopenmp -shared -fPIC bn_relu.c
 * and linked to the libgomp torch has already loaded, so one OpenMP pool serves both. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64
#define RELU(v) ((v) > 0.0f ? (v) : 0.0f)

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* The row range of this thread. */
static inline void rows_of(int64_t rows, int64_t *lo, int64_t *hi) {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t per = (rows + n - 1) / n;
    *lo = per * t < rows ? per * t : rows;
    *hi = *lo + per < rows ? *lo + per : rows;
}

/* Adds a block of float sums into the double totals and clears it. */
static inline void flush(float *block, double *total, int64_t c) {
    for (int64_t j = 0; j < c; j++) {
        total[j] += block[j];
        block[j] = 0.0f;
    }
}

/* Column j of the per-thread partial sums (two rows of c per thread), added in thread order:
 * the same bits every run. */
static inline void add_parts(const double *part, int threads, int64_t c, int64_t j, double *a,
                             double *b) {
    *a = 0;
    *b = 0;
    for (int t = 0; t < threads; t++) {
        *a += part[(size_t)t * 2 * c + j];
        *b += part[(size_t)t * 2 * c + c + j];
    }
}

#define DEFINE_KERNELS(SUFFIX, T, LOAD, STORE)                                                   \
/* Forward: mean, invstd and biased variance per channel, then y = relu(x * a + b); with        \
 * relu_first, of r = relu(x) and y = r * a + b (the Keras order: ReLU, then BatchNorm). */     \
void bn_relu_forward_##SUFFIX(const T *x, T *y, int64_t rows, int64_t c, const float *gamma,     \
                              const float *beta, double eps, float *mean_out,                   \
                              float *invstd_out, float *var_out, int relu_first) {              \
    int threads = omp_get_max_threads();                                                        \
    double *part = calloc((size_t)threads * 2 * c, sizeof(double));                             \
    float *shift = malloc(3 * c * sizeof(float)), *a = shift + c, *b = a + c;                   \
    for (int64_t j = 0; j < c; j++) shift[j] = relu_first ? RELU(LOAD(x[j])) : LOAD(x[j]);      \
    _Pragma("omp parallel num_threads(threads)") {                                              \
        int64_t lo, hi;                                                                         \
        rows_of(rows, &lo, &hi);                                                                \
        double *ts = part + (size_t)omp_get_thread_num() * 2 * c, *tq = ts + c;                 \
        float *bs = calloc(2 * c, sizeof(float)), *bq = bs + c;                                 \
        for (int64_t p = lo; p < hi; p++) {                                                     \
            const T *row = x + p * c;                                                           \
            for (int64_t j = 0; j < c; j++) {                                                   \
                float v = (relu_first ? RELU(LOAD(row[j])) : LOAD(row[j])) - shift[j];         \
                bs[j] += v;                                                                     \
                bq[j] += v * v;                                                                 \
            }                                                                                   \
            if ((p - lo) % BLOCK == BLOCK - 1) { flush(bs, ts, c); flush(bq, tq, c); }          \
        }                                                                                       \
        flush(bs, ts, c); flush(bq, tq, c);                                                     \
        free(bs);                                                                               \
        _Pragma("omp barrier")                                                                  \
        _Pragma("omp single")                                                                   \
        for (int64_t j = 0; j < c; j++) {                                                       \
            double sum, sq;                                                                     \
            add_parts(part, omp_get_num_threads(), c, j, &sum, &sq);                            \
            double m = sum / rows, var = sq / rows - m * m;                                     \
            var = var > 0 ? var : 0;                                                            \
            double inv = 1.0 / sqrt(var + eps);                                                 \
            mean_out[j] = (float)(m + shift[j]);                                                \
            invstd_out[j] = (float)inv;                                                         \
            var_out[j] = (float)var;                                                            \
            a[j] = (float)(gamma[j] * inv);                                                     \
            b[j] = (float)(beta[j] - (m + shift[j]) * gamma[j] * inv);                          \
        }                                                                                       \
        for (int64_t p = lo; p < hi; p++) {                                                     \
            const T *row = x + p * c;                                                           \
            T *out = y + p * c;                                                                 \
            for (int64_t j = 0; j < c; j++) {                                                   \
                float v = (relu_first ? RELU(LOAD(row[j])) : LOAD(row[j])) * a[j] + b[j];      \
                out[j] = STORE(relu_first ? v : RELU(v));                                       \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    free(part); free(shift);                                                                    \
}                                                                                               \
                                                                                                \
/* Backward: dz = dy where y > 0; dbeta = sum dz, dgamma = sum dz * xhat; then                  \
 * dx = gamma * invstd * (dz - dbeta / P - xhat * dgamma / P). With relu_first: dz = dy,         \
 * xhat from r = relu(x), and dx is that where x > 0, else 0 (y is not read). */                \
void bn_relu_backward_##SUFFIX(const T *x, const T *y, const T *dy, T *dx, int64_t rows,         \
                               int64_t c, const float *gamma, const float *mean,                \
                               const float *invstd, float *dgamma, float *dbeta,                \
                               int relu_first) {                                                \
    int threads = omp_get_max_threads();                                                        \
    double *part = calloc((size_t)threads * 2 * c, sizeof(double));                             \
    float *ka = malloc(3 * c * sizeof(float)), *kb = ka + c, *kc = kb + c;                      \
    _Pragma("omp parallel num_threads(threads)") {                                              \
        int64_t lo, hi;                                                                         \
        rows_of(rows, &lo, &hi);                                                                \
        double *ts = part + (size_t)omp_get_thread_num() * 2 * c, *tx = ts + c;                 \
        float *bs = calloc(2 * c, sizeof(float)), *bx = bs + c;                                 \
        for (int64_t p = lo; p < hi; p++) {                                                     \
            const T *xr = x + p * c, *yr = y + p * c, *gr = dy + p * c;                         \
            for (int64_t j = 0; j < c; j++) {                                                   \
                float xv = LOAD(xr[j]);                                                         \
                float dz = relu_first || LOAD(yr[j]) > 0.0f ? LOAD(gr[j]) : 0.0f;               \
                bs[j] += dz;                                                                    \
                bx[j] += dz * ((relu_first ? RELU(xv) : xv) - mean[j]);                         \
            }                                                                                   \
            if ((p - lo) % BLOCK == BLOCK - 1) { flush(bs, ts, c); flush(bx, tx, c); }          \
        }                                                                                       \
        flush(bs, ts, c); flush(bx, tx, c);                                                     \
        free(bs);                                                                               \
        _Pragma("omp barrier")                                                                  \
        _Pragma("omp single")                                                                   \
        for (int64_t j = 0; j < c; j++) {                                                       \
            double sdz, sdx;                                                                    \
            add_parts(part, omp_get_num_threads(), c, j, &sdz, &sdx);                           \
            double inv = invstd[j], k = gamma[j] * inv;                                         \
            double mdz = sdz / rows, mdxh = sdx * inv / rows; /* means of dz, dz*xhat */        \
            dbeta[j] = (float)sdz;                                                              \
            dgamma[j] = (float)(sdx * inv);                                                     \
            /* dx = k*dz - k*mdz - k*inv*mdxh*(x - mean) = ka*dz + kb + kc*(x - mean) */        \
            ka[j] = (float)k;                                                                   \
            kb[j] = (float)(-k * mdz);                                                          \
            kc[j] = (float)(-k * inv * mdxh);                                                   \
        }                                                                                       \
        for (int64_t p = lo; p < hi; p++) {                                                     \
            const T *xr = x + p * c, *yr = y + p * c, *gr = dy + p * c;                         \
            T *out = dx + p * c;                                                                \
            for (int64_t j = 0; j < c; j++) {                                                   \
                float xv = LOAD(xr[j]);                                                         \
                float dz = relu_first || LOAD(yr[j]) > 0.0f ? LOAD(gr[j]) : 0.0f;               \
                float d = ka[j] * dz + kb[j] + kc[j] * ((relu_first ? RELU(xv) : xv) - mean[j]);\
                out[j] = STORE(relu_first && !(xv > 0.0f) ? 0.0f : d);                          \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    free(part); free(ka);                                                                       \
}

#define LOAD_F32(v) (v)
#define STORE_F32(v) (v)
DEFINE_KERNELS(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_KERNELS(f32, float, LOAD_F32, STORE_F32)

/* Dropout (training): y = x * scale where element i is kept, else 0. Element i is kept when
 * the high 32 bits of splitmix64(seed + i) are at least `threshold` (p * 2^32): a counter-based
 * stream, so the mask does not depend on how the threads split the work, and the backward
 * applies the same mask to the gradient by running this again with the same seed. PyTorch's
 * CPU bernoulli_ draws each element from one Mersenne Twister in turn, which made the mask
 * 13% of the compact VGG's training step. */
static inline uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

#define DEFINE_DROPOUT(SUFFIX, T, LOAD, STORE)                                                   \
void dropout_##SUFFIX(const T *x, T *y, int64_t n, uint64_t seed, uint32_t threshold,            \
                      float scale) {                                                            \
    _Pragma("omp parallel for schedule(static)")                                                \
    for (int64_t i = 0; i < n; i++) {                                                           \
        uint32_t r = (uint32_t)(splitmix64(seed + (uint64_t)i) >> 32);                          \
        y[i] = STORE(r >= threshold ? LOAD(x[i]) * scale : 0.0f);                               \
    }                                                                                           \
}

DEFINE_DROPOUT(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_DROPOUT(f32, float, LOAD_F32, STORE_F32)
