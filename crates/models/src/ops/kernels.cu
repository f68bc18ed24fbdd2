// CUDA kernels of the fused normalisations and softmax (forward and backward), compiled at run
// time by NVRTC (see cuda.rs). Self-contained on purpose: no headers, so that NVRTC needs no
// toolkit include folder on the machine that runs it, and so that the same file also builds as
// host C++ under a small emulation of the CUDA execution model (the tests run it that way on
// machines without a GPU).
//
// One thread block per normalised row (or per affine channel, for the weight gradients); the
// threads stride over the row and meet in shared-memory tree reductions. Element-wise arithmetic
// in float (double for f64 data), every sum in double, as the CPU kernels do. Launch with
// L2S_BLOCK threads per block or any smaller power of two.

#define L2S_BLOCK 256

typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned int u32;

// Half-precision types travel as their bits; conversions are done here in software (round to
// nearest even) rather than with cuda_fp16.h / cuda_bf16.h, which NVRTC would need to find.
struct bf16 {
    u16 bits;
};
struct f16 {
    u16 bits;
};

// The type element-wise arithmetic runs in, per storage type.
template <typename T> struct Compute {
    typedef float type;
};
template <> struct Compute<double> {
    typedef double type;
};

__device__ inline float load(const float* p, u64 i) { return p[i]; }
__device__ inline double load(const double* p, u64 i) { return p[i]; }
__device__ inline float load(const bf16* p, u64 i) { return __uint_as_float(((u32)p[i].bits) << 16); }
__device__ inline float load(const f16* p, u64 i) {
    const u32 h = p[i].bits;
    const u32 sign = (h & 0x8000u) << 16;
    const u32 exponent = (h >> 10) & 0x1fu;
    const u32 mantissa = h & 0x3ffu;
    if (exponent == 0) {
        // Zero or subnormal: mantissa · 2⁻²⁴, exact in float.
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) {
        return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ inline void store(float* p, u64 i, double v) { p[i] = (float)v; }
__device__ inline void store(double* p, u64 i, double v) { p[i] = v; }
__device__ inline void store(bf16* p, u64 i, double v) {
    const u32 u = __float_as_uint((float)v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i].bits = (u16)((u >> 16) | 0x40u); // NaN stays NaN
        return;
    }
    p[i].bits = (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ inline void store(f16* p, u64 i, double v) {
    u32 u = __float_as_uint((float)v);
    const u16 sign = (u16)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    u16 bits;
    if (u > 0x7f800000u) {
        bits = 0x7e00u; // NaN
    } else if (u >= 0x477ff000u) {
        bits = 0x7c00u; // from 65520 up (and infinity): infinity
    } else if (u < 0x38800000u) {
        // Below 2⁻¹⁴: subnormal. Scaling by 2²⁴ is exact; adding and removing 2²³ rounds it to
        // the nearest integer, ties to even (no fast-math here).
        const float scaled = __uint_as_float(u) * 16777216.0f;
        bits = (u16)(u32)((scaled + 8388608.0f) - 8388608.0f);
    } else {
        // Rebias the exponent (127 → 15), then round the 13 dropped bits to nearest even; a carry
        // moves into the exponent as it should.
        u -= 112u << 23;
        u += 0xfffu + ((u >> 13) & 1u);
        bits = (u16)(u >> 13);
    }
    p[i].bits = (u16)(sign | bits);
}

__device__ inline float exp_c(float v) { return expf(v); }
__device__ inline double exp_c(double v) { return exp(v); }

// Σ v over the block (blockDim.x a power of two ≤ L2S_BLOCK); every thread gets the sum.
__device__ inline double block_sum(double v) {
    __shared__ double partial[L2S_BLOCK];
    const u32 t = threadIdx.x;
    partial[t] = v;
    __syncthreads();
    for (u32 half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) {
            partial[t] += partial[t + half];
        }
        __syncthreads();
    }
    const double total = partial[0];
    __syncthreads(); // everyone has read it before the next call writes
    return total;
}

__device__ inline double block_max(double v) {
    __shared__ double partial[L2S_BLOCK];
    const u32 t = threadIdx.x;
    partial[t] = v;
    __syncthreads();
    for (u32 half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half && partial[t + half] > partial[t]) {
            partial[t] = partial[t + half];
        }
        __syncthreads();
    }
    const double top = partial[0];
    __syncthreads();
    return top;
}

// How rows are laid out (see norm.rs's `Rows`): a row is `channels` × `spatial` elements; rows
// cycle through `groups` sets of affine channels.
struct Rows {
    u64 len, groups, channels, spatial;
    double eps;
    int centre;
};

__device__ inline u64 channel_of(const Rows& rows, u64 row, u64 i) {
    return (row % rows.groups) * rows.channels + i / rows.spatial;
}

// Mean (0 without centring) and 1/√(variance + eps) of row `row`.
template <typename T>
__device__ inline void row_stats(const Rows& rows, const T* x, u64 row, double* mean, double* rstd) {
    const u64 base = row * rows.len;
    double m = 0.0;
    if (rows.centre) {
        double s = 0.0;
        for (u64 i = threadIdx.x; i < rows.len; i += blockDim.x) {
            s += (double)load(x, base + i);
        }
        m = block_sum(s) / (double)rows.len;
    }
    double s2 = 0.0;
    for (u64 i = threadIdx.x; i < rows.len; i += blockDim.x) {
        const double d = (double)load(x, base + i) - m;
        s2 += d * d;
    }
    const double var = block_sum(s2) / (double)rows.len;
    *mean = m;
    *rstd = 1.0 / sqrt(var + rows.eps);
}

// y = (x − mean)·rstd·w + b; one block per row.
template <typename T>
__device__ void normalise_forward(Rows rows, const T* x, const T* w, const T* b, T* y) {
    typedef typename Compute<T>::type C;
    const u64 row = blockIdx.x;
    double mean, rstd;
    row_stats(rows, x, row, &mean, &rstd);
    const u64 base = row * rows.len;
    for (u64 i = threadIdx.x; i < rows.len; i += blockDim.x) {
        const u64 c = channel_of(rows, row, i);
        const C scale = (C)((double)load(w, c) * rstd);
        const C v = (C)load(x, base + i) - (C)mean;
        store(y, base + i, (double)(v * scale + (C)load(b, c)));
    }
}

// ∂x = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂)), x̂ = (x − mean)·rstd; one block per row. Also
// writes the row's (mean, rstd) for the weight-gradient kernel.
template <typename T>
__device__ void normalise_backward_input(Rows rows, const T* x, const T* w, const T* g, T* dx,
                                         double* stats) {
    typedef typename Compute<T>::type C;
    const u64 row = blockIdx.x;
    double mean, rstd;
    row_stats(rows, x, row, &mean, &rstd);
    const u64 base = row * rows.len;
    double s_gy = 0.0, s_gy_xc = 0.0;
    for (u64 i = threadIdx.x; i < rows.len; i += blockDim.x) {
        const double gy = (double)load(g, base + i) * (double)load(w, channel_of(rows, row, i));
        s_gy += gy;
        s_gy_xc += gy * ((double)load(x, base + i) - mean);
    }
    s_gy = block_sum(s_gy);
    s_gy_xc = block_sum(s_gy_xc);
    const double n = (double)rows.len;
    const C mean_gy = (C)(rows.centre ? s_gy / n : 0.0);
    const C k = (C)(s_gy_xc * rstd / n * rstd);
    const C rstd_c = (C)rstd, mean_c = (C)mean;
    for (u64 i = threadIdx.x; i < rows.len; i += blockDim.x) {
        const C gy = (C)load(g, base + i) * (C)load(w, channel_of(rows, row, i));
        const C xc = (C)load(x, base + i) - mean_c;
        store(dx, base + i, (double)(rstd_c * (gy - mean_gy - xc * k)));
    }
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// ∂w[c] = Σ g·x̂ and ∂b[c] = Σ g over every element of affine channel c; one block per channel,
// so the sums are deterministic (no atomics).
template <typename T>
__device__ void normalise_backward_affine(Rows rows, u64 n_rows, const T* x, const T* g,
                                          const double* stats, T* dw, T* db) {
    const u64 channel = blockIdx.x;
    const u64 group = channel / rows.channels;
    const u64 offset = (channel % rows.channels) * rows.spatial;
    const u64 per_row = rows.spatial;
    const u64 count = (n_rows / rows.groups) * per_row;
    double s_w = 0.0, s_b = 0.0;
    for (u64 k = threadIdx.x; k < count; k += blockDim.x) {
        const u64 row = (k / per_row) * rows.groups + group;
        const u64 at = row * rows.len + offset + k % per_row;
        const double gv = (double)load(g, at);
        s_w += gv * ((double)load(x, at) - stats[2 * row]) * stats[2 * row + 1];
        s_b += gv;
    }
    s_w = block_sum(s_w);
    s_b = block_sum(s_b);
    if (threadIdx.x == 0) {
        store(dw, channel, s_w);
        store(db, channel, s_b);
    }
}

// y = softmax(scale·x) over rows of `len`; one block per row.
template <typename T> __device__ void softmax_forward(u64 len, double scale, const T* x, T* y) {
    typedef typename Compute<T>::type C;
    const u64 base = (u64)blockIdx.x * len;
    double top = -1.0e300; // below any finite input
    for (u64 i = threadIdx.x; i < len; i += blockDim.x) {
        const double v = (double)load(x, base + i);
        top = v > top ? v : top;
    }
    const C shift = (C)block_max(top), s = (C)scale;
    double total = 0.0;
    for (u64 i = threadIdx.x; i < len; i += blockDim.x) {
        total += (double)exp_c(((C)load(x, base + i) - shift) * s);
    }
    const C inv = (C)(1.0 / block_sum(total));
    for (u64 i = threadIdx.x; i < len; i += blockDim.x) {
        store(y, base + i, (double)(exp_c(((C)load(x, base + i) - shift) * s) * inv));
    }
}

// ∂x = scale·y·(g − Σ g·y); one block per row.
template <typename T>
__device__ void softmax_backward(u64 len, double scale, const T* y, const T* g, T* dx) {
    typedef typename Compute<T>::type C;
    const u64 base = (u64)blockIdx.x * len;
    double dot = 0.0;
    for (u64 i = threadIdx.x; i < len; i += blockDim.x) {
        dot += (double)load(y, base + i) * (double)load(g, base + i);
    }
    const C d = (C)block_sum(dot), s = (C)scale;
    for (u64 i = threadIdx.x; i < len; i += blockDim.x) {
        const C yv = (C)load(y, base + i);
        store(dx, base + i, (double)(s * yv * ((C)load(g, base + i) - d)));
    }
}

// The entry points, one per storage type, named <kernel>_<dtype>.
#define L2S_KERNELS(T, NAME)                                                                      \
    extern "C" __global__ void normalise_forward_##NAME(                                          \
        u64 len, u64 groups, u64 channels, u64 spatial, double eps, int centre, const T* x,       \
        const T* w, const T* b, T* y) {                                                           \
        const Rows rows = {len, groups, channels, spatial, eps, centre};                          \
        normalise_forward<T>(rows, x, w, b, y);                                                   \
    }                                                                                             \
    extern "C" __global__ void normalise_backward_input_##NAME(                                   \
        u64 len, u64 groups, u64 channels, u64 spatial, double eps, int centre, const T* x,       \
        const T* w, const T* g, T* dx, double* stats) {                                           \
        const Rows rows = {len, groups, channels, spatial, eps, centre};                          \
        normalise_backward_input<T>(rows, x, w, g, dx, stats);                                    \
    }                                                                                             \
    extern "C" __global__ void normalise_backward_affine_##NAME(                                  \
        u64 len, u64 groups, u64 channels, u64 spatial, u64 n_rows, const T* x, const T* g,       \
        const double* stats, T* dw, T* db) {                                                      \
        const Rows rows = {len, groups, channels, spatial, 0.0, 0};                               \
        normalise_backward_affine<T>(rows, n_rows, x, g, stats, dw, db);                          \
    }                                                                                             \
    extern "C" __global__ void softmax_forward_##NAME(u64 len, double scale, const T* x, T* y) { \
        softmax_forward<T>(len, scale, x, y);                                                     \
    }                                                                                             \
    extern "C" __global__ void softmax_backward_##NAME(u64 len, double scale, const T* y,         \
                                                       const T* g, T* dx) {                       \
        softmax_backward<T>(len, scale, y, g, dx);                                                \
    }

L2S_KERNELS(float, f32)
L2S_KERNELS(double, f64)
L2S_KERNELS(bf16, bf16)
L2S_KERNELS(f16, f16)
