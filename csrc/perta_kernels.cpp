// CPU fast path for perta-fast's elementwise kernels: squared/signed gradient accumulation, the PerTA
// ratio, and the fused merge. Bound with pybind11 and kept free of libtorch: the Python launcher
// (perta_fast/ops.py) checks devices, shapes, dtypes and contiguity and passes raw pointers, so the
// extension builds in seconds with any compiler that has OpenMP.
//
// Math is fp32 throughout (as in the torch reference); bf16 and fp16 are converted here with
// round-to-nearest-even, bit-exact with torch's own casts.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace py = pybind11;

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

static inline uint16_t float_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest, ties to even
    uint32_t quiet_nan = (u >> 16) | 0x40u;  // NaN stays NaN
    // a signed compare (both sides are below 2^31): SSE/AVX have no unsigned 32-bit compare
    return uint16_t(int32_t(u & 0x7fffffffu) > int32_t(0x7f800000) ? quiet_nan : rounded);
}

static inline float f16_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
    if (exp == 0) {
        if (man == 0) return bits_to_float(sign);
        float v = std::ldexp(float(man), -24);  // subnormal: man * 2^-24, exact in fp32
        return sign ? -v : v;
    }
    return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t float_to_f16(float f) {
    uint32_t u = float_to_bits(f);
    uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // nan
    if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to inf (>= 65520)
    if (a < 0x38800000u) {  // below the smallest normal half: round to a subnormal (or zero)
        // value = a_float; subnormal unit is 2^-24. rint() rounds half to even in the default mode.
        float v = bits_to_float(a);
        return uint16_t(sign | uint16_t(std::nearbyint(std::ldexp(v, 24))));
    }
    uint32_t man_odd = (a >> 13) & 1u;
    a += 0xfffu + man_odd;  // round mantissa to 10 bits, ties to even
    return uint16_t(sign | uint16_t(((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3ffu)));
}

static inline float load(const void* p, int64_t i, int dt) {
    switch (dt) {
        case F32: return static_cast<const float*>(p)[i];
        case BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
        default: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
    }
}

static inline void store(void* p, int64_t i, int dt, float v) {
    switch (dt) {
        case F32: static_cast<float*>(p)[i] = v; break;
        case BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
        default: static_cast<uint16_t*>(p)[i] = float_to_f16(v); break;
    }
}

// Each thread takes one contiguous chunk and runs a plain `omp simd` loop over it: GCC does not
// vectorise `parallel for simd` loops that carry a reduction, but it does vectorise these.
template <class Body>
static double parallel_chunks(int64_t n, Body body) {
    double total = 0.0;
#pragma omp parallel reduction(+ : total)
    {
        int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t chunk = (n + threads - 1) / threads, lo = std::min(n, t * chunk), hi = std::min(n, lo + chunk);
        total += body(lo, hi);
    }
    return total;
}

static void check_dtype(int dt) {
    if (dt != F32 && dt != BF16 && dt != F16) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16), 2 (f16)");
}

// The dtype switch is hoisted out of the loop so each instantiation is a plain, vectorisable loop.
template <int DT>
static void accumulate_impl(float* acc, const void* g, int64_t n, bool square) {
    parallel_chunks(n, [&](int64_t lo, int64_t hi) {
        if (square) {
#pragma omp simd
            for (int64_t i = lo; i < hi; ++i) { float v = load(g, i, DT); acc[i] += v * v; }
        } else {
#pragma omp simd
            for (int64_t i = lo; i < hi; ++i) acc[i] += load(g, i, DT);
        }
        return 0.0;
    });
}

// acc (fp32) += g² (square) or += g; g in fp32/bf16/fp16.
static void accumulate(uintptr_t acc, uintptr_t g, int g_dt, int64_t n, bool square) {
    check_dtype(g_dt);
    auto* a = reinterpret_cast<float*>(acc);
    const void* gp = reinterpret_cast<const void*>(g);
    if (g_dt == F32) accumulate_impl<F32>(a, gp, n, square);
    else if (g_dt == BF16) accumulate_impl<BF16>(a, gp, n, square);
    else accumulate_impl<F16>(a, gp, n, square);
}

// POW is false when p = 1: a compile-time case, so the common loop has no pow call to block vectorisation.
template <bool POW>
static inline float ratio_value(float sf, float sr, float alpha, float power, float eps) {
    if (POW) { sf = std::pow(sf, power); sr = std::pow(sr, power); }
    float w = sf / (sr * alpha + sf + eps);
    return w != w ? 0.0f : w;  // 0/0: no evidence the parameter serves the forget set
}

template <int SDT, int ODT, bool POW>
static void ratio_pow_loop(const void* sf, const void* sr, void* out, int64_t n, float alpha, float power, float eps) {
    parallel_chunks(n, [&](int64_t lo, int64_t hi) {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i)
            store(out, i, ODT, ratio_value<POW>(load(sf, i, SDT), load(sr, i, SDT), alpha, power, eps));
        return 0.0;
    });
}

template <int SDT, int ODT>
static void ratio_loop(const void* sf, const void* sr, void* out, int64_t n, float alpha, float power, float eps) {
    if (power == 1.0f) ratio_pow_loop<SDT, ODT, false>(sf, sr, out, n, alpha, power, eps);
    else ratio_pow_loop<SDT, ODT, true>(sf, sr, out, n, alpha, power, eps);
}

template <int SDT>
static void ratio_impl(const void* sf, const void* sr, void* out, int out_dt, int64_t n, float alpha, float power, float eps) {
    if (out_dt == F32) ratio_loop<SDT, F32>(sf, sr, out, n, alpha, power, eps);
    else if (out_dt == BF16) ratio_loop<SDT, BF16>(sf, sr, out, n, alpha, power, eps);
    else ratio_loop<SDT, F16>(sf, sr, out, n, alpha, power, eps);
}

// out = s_f^p / (s_f^p + α s_r^p + ε). out may alias s_f only when both are fp32 (the launcher sees to
// it): then each element is read before it is written, by the same thread.
static void ratio(uintptr_t sf, uintptr_t sr, int s_dt, uintptr_t out, int out_dt, int64_t n, float alpha, float power, float eps) {
    check_dtype(s_dt); check_dtype(out_dt);
    auto* o = reinterpret_cast<void*>(out);
    const void* f = reinterpret_cast<const void*>(sf);
    const void* r = reinterpret_cast<const void*>(sr);
    if (s_dt == F32) ratio_impl<F32>(f, r, o, out_dt, n, alpha, power, eps);
    else if (s_dt == BF16) ratio_impl<BF16>(f, r, o, out_dt, n, alpha, power, eps);
    else ratio_impl<F16>(f, r, o, out_dt, n, alpha, power, eps);
}

enum Mode : int { TV = 0, WEIGHTS = 1, SCORES = 2, SCORES_POW = 3 };

// One loop per (base dtype, finetuned dtype, mode, weight/score dtype): no branch or dtype switch is
// left inside it, so the compiler can vectorise the fp32 math.
// x − x is 0 for finite x and NaN for NaN/±inf: a branch-free test that vectorises.
static inline bool finite(float x) { return (x - x) == 0.0f; }

struct MergeStats { double w_sum; int64_t nonfinite; };

// One loop per (base dtype, finetuned dtype, mode, weight/score dtype): no branch or dtype switch is
// left inside it, so the compiler can vectorise the fp32 math. Non-finite inputs are counted in the
// same pass (and read as 0 when ZERO), so no separate checking pass over the data is needed.
template <int BDT, int FDT, int MODE, int WDT, bool ZERO, bool DELTA>
static MergeStats merge_loop(const void* base, const void* ft, const void* w, const void* sf, const void* sr,
                             void* out, int64_t n, float lam, float alpha, float power, float eps) {
    double nonfinite = 0.0;
    double w_sum = parallel_chunks(n, [&](int64_t lo, int64_t hi) {
        double sum = 0.0;
        int64_t bad_total = 0;
        // The merge loop carries no reduction (any reduction in it made GCC's vector loop ~2x slower): it
        // leaves each element's weight and NaN probe in small L1-resident buffers, which a second loop
        // sums. Σw in float per block (a float reduction vectorises, a double one does not here), blocks
        // added in double: relative error ~1e-7 at any length.
        constexpr int64_t BLOCK = 1024;
        float wbuf[BLOCK], probe[BLOCK];
        for (int64_t start = lo; start < hi; start += BLOCK) {
            int64_t len = std::min(hi - start, BLOCK);
            const int64_t off = start;
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
                int64_t i = off + j;
                float b = load(base, i, BDT), f = load(ft, i, FDT), x = 1.0f, y = 0.0f;
                if (MODE == WEIGHTS) x = load(w, i, WDT);
                if (MODE == SCORES || MODE == SCORES_POW) { x = load(sf, i, WDT); y = load(sr, i, WDT); }
                // one probe for all inputs: NaN/inf in any of them makes it NaN
                probe[j] = (b - b) + (f - f) + (x - x) + (y - y);
                if (ZERO) {
                    b = finite(b) ? b : 0.0f; f = finite(f) ? f : 0.0f;
                    x = finite(x) ? x : 0.0f; y = finite(y) ? y : 0.0f;
                }
                float weight = x;
                if (MODE == SCORES || MODE == SCORES_POW) weight = ratio_value<MODE == SCORES_POW>(x, y, alpha, power, eps);
                wbuf[j] = weight;
                float d = DELTA ? f : f - b;  // DELTA: ft holds τ itself (a block of a LoRA product)
                store(out, i, BDT, b - lam * (weight * d));
            }
            float block = 0.0f, bad = 0.0f;
#pragma omp simd reduction(+ : block, bad)
            for (int64_t j = 0; j < len; ++j) { block += wbuf[j]; bad += probe[j] != 0.0f ? 1.0f : 0.0f; }
            sum += block;
            bad_total += int64_t(bad);
        }
#pragma omp atomic
        nonfinite += double(bad_total);
        return sum;
    });
    return {w_sum, int64_t(nonfinite)};
}

using MergeFn = MergeStats (*)(const void*, const void*, const void*, const void*, const void*, void*, int64_t, float,
                               float, float, float);

template <int BDT, int FDT, int MODE, bool ZERO, bool DELTA>
static MergeFn pick_weight_dtype(int wdt) {
    return wdt == F32 ? merge_loop<BDT, FDT, MODE, F32, ZERO, DELTA>
         : wdt == BF16 ? merge_loop<BDT, FDT, MODE, BF16, ZERO, DELTA> : merge_loop<BDT, FDT, MODE, F16, ZERO, DELTA>;
}

template <int BDT, int FDT, bool ZERO, bool DELTA>
static MergeFn pick_merge(int mode, int wdt) {
    if (mode == TV) return merge_loop<BDT, FDT, TV, F32, ZERO, DELTA>;
    if (mode == WEIGHTS) return pick_weight_dtype<BDT, FDT, WEIGHTS, ZERO, DELTA>(wdt);
    if (mode == SCORES) return pick_weight_dtype<BDT, FDT, SCORES, ZERO, DELTA>(wdt);
    return pick_weight_dtype<BDT, FDT, SCORES_POW, ZERO, DELTA>(wdt);
}

// A task vector (DELTA) is always fp32: it comes from a matmul of the LoRA factors, so only that
// combination is instantiated.
template <int BDT, bool ZERO>
static MergeFn pick_merge(int fdt, int mode, int wdt, bool delta) {
    if (delta) return pick_merge<BDT, F32, ZERO, true>(mode, wdt);
    return fdt == F32 ? pick_merge<BDT, F32, ZERO, false>(mode, wdt)
         : fdt == BF16 ? pick_merge<BDT, BF16, ZERO, false>(mode, wdt) : pick_merge<BDT, F16, ZERO, false>(mode, wdt);
}

template <bool ZERO>
static MergeFn pick_merge(int bdt, int fdt, int mode, int wdt, bool delta) {
    return bdt == F32 ? pick_merge<F32, ZERO>(fdt, mode, wdt, delta)
         : bdt == BF16 ? pick_merge<BF16, ZERO>(fdt, mode, wdt, delta) : pick_merge<F16, ZERO>(fdt, mode, wdt, delta);
}

// out = base − λ·(w ⊙ (ft − base)) in base's dtype, w given, formed from (s_f, s_r), or 1 (TV); with
// `delta`, ft is τ itself (fp32) and out = base − λ·(w ⊙ τ).
// Returns (Σw, number of elements with a non-finite input), so callers report the mean weight and refuse
// NaN/Inf without a second pass.
static py::tuple merge(uintptr_t base, int base_dt, uintptr_t ft, int ft_dt, uintptr_t w, int w_dt, uintptr_t sf,
                       uintptr_t sr, int s_dt, uintptr_t out, int64_t n, float lam, float alpha, float power, float eps,
                       bool zero_nonfinite, bool delta) {
    check_dtype(base_dt); check_dtype(ft_dt);
    if (delta && ft_dt != F32) throw std::invalid_argument("a task vector (delta) must be f32");
    if (w) check_dtype(w_dt);
    if (sf) { check_dtype(s_dt); if (!sr) throw std::invalid_argument("s_f given without s_r"); }
    int mode = w ? WEIGHTS : !sf ? TV : power == 1.0f ? SCORES : SCORES_POW;
    int wdt = w ? w_dt : s_dt;
    MergeFn fn = zero_nonfinite ? pick_merge<true>(base_dt, ft_dt, mode, wdt, delta)
                                : pick_merge<false>(base_dt, ft_dt, mode, wdt, delta);
    MergeStats stats;
    {
        py::gil_scoped_release release;
        stats = fn(reinterpret_cast<const void*>(base), reinterpret_cast<const void*>(ft), reinterpret_cast<const void*>(w),
                   reinterpret_cast<const void*>(sf), reinterpret_cast<const void*>(sr), reinterpret_cast<void*>(out), n,
                   lam, alpha, power, eps);
    }
    return py::make_tuple(stats.w_sum, stats.nonfinite);
}

PYBIND11_MODULE(_cpp, m) {
    m.doc() = "perta-fast CPU kernels (raw pointers; use perta_fast.ops, which checks arguments)";
    // Release the GIL: the loops touch no Python objects and run on OpenMP threads.
    m.def("accumulate", &accumulate, py::call_guard<py::gil_scoped_release>());
    m.def("ratio", &ratio, py::call_guard<py::gil_scoped_release>());
    m.def("merge", &merge);  // releases the GIL itself around the loop (it builds a Python tuple after)
}
