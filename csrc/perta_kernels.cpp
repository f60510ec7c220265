// CPU fast path for perta-fast's elementwise kernels: squared/signed gradient accumulation, the PerTA
// ratio, and the fused merge. Bound with pybind11 and kept free of libtorch: the Python launcher
// (perta_fast/ops.py) checks devices, shapes, dtypes and contiguity and passes raw pointers, so the
// extension builds in seconds with any compiler that has OpenMP.
//
// Math is fp32 throughout (as in the torch reference); bf16 and fp16 are converted here with
// round-to-nearest-even, bit-exact with torch's own casts.
#include <pybind11/pybind11.h>

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
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return uint16_t(u >> 16);
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

static void check_dtype(int dt) {
    if (dt != F32 && dt != BF16 && dt != F16) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16), 2 (f16)");
}

// The dtype switch is hoisted out of the loop so each instantiation is a plain, vectorisable loop.
template <int DT>
static void accumulate_impl(float* acc, const void* g, int64_t n, bool square) {
    if (square) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) { float v = load(g, i, DT); acc[i] += v * v; }
    } else {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) acc[i] += load(g, i, DT);
    }
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

static inline float ratio_value(float sf, float sr, float alpha, float power, float eps) {
    if (power != 1.0f) { sf = std::pow(sf, power); sr = std::pow(sr, power); }
    float w = sf / (sr * alpha + sf + eps);
    return std::isnan(w) ? 0.0f : w;  // 0/0: no evidence the parameter serves the forget set
}

template <int SDT>
static void ratio_impl(const void* sf, const void* sr, void* out, int out_dt, int64_t n, float alpha, float power, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i)
        store(out, i, out_dt, ratio_value(load(sf, i, SDT), load(sr, i, SDT), alpha, power, eps));
}

// out = s_f^p / (s_f^p + α s_r^p + ε); out may alias s_f (each element is read before it is written).
static void ratio(uintptr_t sf, uintptr_t sr, int s_dt, uintptr_t out, int out_dt, int64_t n, float alpha, float power, float eps) {
    check_dtype(s_dt); check_dtype(out_dt);
    auto* o = reinterpret_cast<void*>(out);
    const void* f = reinterpret_cast<const void*>(sf);
    const void* r = reinterpret_cast<const void*>(sr);
    if (s_dt == F32) ratio_impl<F32>(f, r, o, out_dt, n, alpha, power, eps);
    else if (s_dt == BF16) ratio_impl<BF16>(f, r, o, out_dt, n, alpha, power, eps);
    else ratio_impl<F16>(f, r, o, out_dt, n, alpha, power, eps);
}

template <int DT>
static double merge_impl(const void* base, const void* ft, int ft_dt, const void* w, int w_dt, const void* sf,
                         const void* sr, int s_dt, void* out, int64_t n, float lam, float alpha, float power, float eps) {
    double w_sum = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : w_sum)
    for (int64_t i = 0; i < n; ++i) {
        float b = load(base, i, DT);
        float weight = 1.0f;
        if (w) weight = load(w, i, w_dt);
        else if (sf) weight = ratio_value(load(sf, i, s_dt), load(sr, i, s_dt), alpha, power, eps);
        w_sum += weight;
        store(out, i, DT, b - lam * (weight * (load(ft, i, ft_dt) - b)));
    }
    return w_sum;
}

// out = base − λ·(w ⊙ (ft − base)) in base's dtype, w given, formed from (s_f, s_r), or 1 (TV).
// Returns Σw, so callers can report the mean weight without a second pass.
static double merge(uintptr_t base, int base_dt, uintptr_t ft, int ft_dt, uintptr_t w, int w_dt, uintptr_t sf,
                    uintptr_t sr, int s_dt, uintptr_t out, int64_t n, float lam, float alpha, float power, float eps) {
    check_dtype(base_dt); check_dtype(ft_dt);
    if (w) check_dtype(w_dt);
    if (sf) { check_dtype(s_dt); if (!sr) throw std::invalid_argument("s_f given without s_r"); }
    auto* b = reinterpret_cast<const void*>(base);
    auto* f = reinterpret_cast<const void*>(ft);
    auto* wp = reinterpret_cast<const void*>(w);
    auto* fp = reinterpret_cast<const void*>(sf);
    auto* rp = reinterpret_cast<const void*>(sr);
    auto* o = reinterpret_cast<void*>(out);
    if (base_dt == F32) return merge_impl<F32>(b, f, ft_dt, wp, w_dt, fp, rp, s_dt, o, n, lam, alpha, power, eps);
    if (base_dt == BF16) return merge_impl<BF16>(b, f, ft_dt, wp, w_dt, fp, rp, s_dt, o, n, lam, alpha, power, eps);
    return merge_impl<F16>(b, f, ft_dt, wp, w_dt, fp, rp, s_dt, o, n, lam, alpha, power, eps);
}

PYBIND11_MODULE(_cpp, m) {
    m.doc() = "perta-fast CPU kernels (raw pointers; use perta_fast.ops, which checks arguments)";
    // Release the GIL: the loops touch no Python objects and run on OpenMP threads.
    m.def("accumulate", &accumulate, py::call_guard<py::gil_scoped_release>());
    m.def("ratio", &ratio, py::call_guard<py::gil_scoped_release>());
    m.def("merge", &merge, py::call_guard<py::gil_scoped_release>());
}
