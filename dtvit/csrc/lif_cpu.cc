// The fused multi-step neuron of dtvit/lif_fused.py as XLA:CPU FFI kernels: each neuron's T steps run in one
// pass, forward and backward, on XLA's intra-op thread pool. The expressions are those of
// `lif_fused._lif_forward` and `lif_fused._step_grads`, in the same order and without contraction into FMAs
// (built with -ffp-contract=off), so the forward's spikes and membranes are bitwise the fused path's; the
// reductions (dL/dVth, dL/dleak, dL/dmask) sum in another order. dtvit/cpu_kernels.py builds and registers
// this file; tests/cpu_kernels_test.py checks it against the pure-JAX recurrence.
//
// Layout: every array is [T, N] row-major (N: the neurons, flattened), or [N] for a static input fed at
// every step. Settings arrive as attributes:
//   spikformer  1: H = U + (I - U) / tau;  0: H = lam U + I ('lif'; 'if' passes lam = 1)
//   soft        1: U = H - Vth S;  0: U = H (1 - S)
//   normalized  1: x = H / Vth - 1;  0: x = H - Vth
//   surrogate   0 pwl, 1 sigmoid, 2 atan, with alpha
//   detach      1: no gradient through the reset
//   masked      1: the 'skip' step mask [T] (membrane held, no spike where 0)
//   is_static   1: the input is [N], fed at every step
//   with_lam    1: dL/dlam is accumulated ('lif')
//   init        U[0] = init * Vth

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 256;          // neurons per inner block: T * kBlock floats of state stay in L1/L2
constexpr int64_t kMinPerTask = 16384;   // below this a task is not worth scheduling

struct Settings {
  float tau, alpha, init;
  int32_t spikformer, soft, normalized, surrogate, detach, masked, is_static, with_lam;
};

// Runs body(begin, end) over [0, n) in chunks on the pool's threads and the caller's. The caller takes chunks
// itself and waits only for chunks already taken, so it never waits on a task that has not started.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t num_chunks, Body body) {
  if (num_chunks <= 1) {
    body(0, n, 0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, num_chunks, body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < num_chunks;) {
      int64_t begin = n * c / num_chunks, end = n * (c + 1) / num_chunks;
      body(begin, end, c);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t k = 1; k < num_chunks; ++k) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (state->done.load(std::memory_order_acquire) < num_chunks) std::this_thread::yield();
}

int64_t NumChunks(ffi::ThreadPool& pool, int64_t n) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(threads, n / kMinPerTask));
}

template <bool kSpikformer, bool kSoft>
inline float Charge(float u, float i, float lam, float tau) {
  if constexpr (kSpikformer) {
    return u + (i - u) / tau;
  } else {
    return lam * u + i;
  }
}

template <bool kSoft>
inline float AfterReset(float h, float s, float vth) {
  if constexpr (kSoft) {
    return h - vth * s;
  } else {
    return h * (1.0f - s);
  }
}

// exp(x) from a degree-6 polynomial on [-ln2/2, ln2/2] and an exponent scaled in by bits (Cephes' expf
// coefficients; within 2 ulp of libm's for the sigmoid's arguments), written so that the compiler vectorizes
// it, where a libm call would keep the backward loop scalar.
inline float VectorExp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // x / ln2 rounded to the nearest integer by adding and subtracting 1.5 * 2^23 (floor() stays scalar here).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

template <int kSurrogate>
inline float SurrogateGrad(float x, float alpha) {
  if constexpr (kSurrogate == 0) {
    return alpha * std::max(0.0f, 1.0f - std::fabs(x));
  } else if constexpr (kSurrogate == 1) {
    float sg = 1.0f / (1.0f + VectorExp(-(alpha * x)));
    return alpha * sg * (1.0f - sg);
  } else {
    float y = static_cast<float>(M_PI / 2.0) * alpha * x;
    return alpha / 2.0f / (1.0f + y * y);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward: spikes [T, N] and the membrane before reset h [T, N].

template <bool kSpikformer, bool kSoft>
void ForwardRange(const Settings& p, int64_t T, int64_t N, const float* cur, float lam, float vth,
                  const float* mask, float* spikes, float* hs, int64_t begin, int64_t end) {
  const int64_t stride = p.is_static ? 0 : N;
  const float tau = p.tau, init = p.init;
  const bool masked = p.masked;
  alignas(64) float u[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, end - b0);
    const float u0 = init * vth;
    for (int64_t j = 0; j < nb; ++j) u[j] = u0;
    for (int64_t t = 0; t < T; ++t) {
      const float* in = cur + t * stride + b0;
      float* s_out = spikes + t * N + b0;
      float* h_out = hs + t * N + b0;
      if (masked) {
        const float m = mask[t], keep = 1.0f - m;
        for (int64_t j = 0; j < nb; ++j) {
          float h = Charge<kSpikformer, kSoft>(u[j], in[j], lam, tau);
          float s = h >= vth ? 1.0f : 0.0f;
          float r = AfterReset<kSoft>(h, s, vth);
          u[j] = m * r + keep * u[j];
          s_out[j] = s * m;
          h_out[j] = h;
        }
      } else {
        for (int64_t j = 0; j < nb; ++j) {
          float h = Charge<kSpikformer, kSoft>(u[j], in[j], lam, tau);
          float s = h >= vth ? 1.0f : 0.0f;
          u[j] = AfterReset<kSoft>(h, s, vth);
          s_out[j] = s;
          h_out[j] = h;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: from h [T, N] and dL/dspikes [T, N], dL/dI ([T, N] or [N]) and each chunk's partial sums of
// dL/dlam, dL/dVth and dL/dmask[t].

// The sum of x[0, n) in 16 float lanes (vectorized), then in double.
inline double SumBlock(const float* x, int64_t n) {
  alignas(64) float lanes[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int l = 0; l < 16; ++l) lanes[l] += x[j + l];
  }
  double sum = 0.0;
  for (; j < n; ++j) sum += x[j];
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum;
}

struct Partials {
  double lam = 0.0, vth = 0.0;
  std::vector<double> mask;
};

template <bool kSpikformer, bool kSoft, bool kNormalized, int kSurrogate>
void BackwardRange(const Settings& p, int64_t T, int64_t N, const float* hs, const float* g_out, float lam,
                   float vth, const float* mask, float* g_in, Partials& part, int64_t begin, int64_t end) {
  // Settings copied to locals: read through `p` inside the loops, they could alias the stores and keep the
  // loops scalar.
  const float tau = p.tau, alpha = p.alpha;
  const bool masked = p.masked, detach = p.detach, is_static = p.is_static;
  alignas(64) float g_u[kBlock], acc_vth[kBlock], acc_lam[kBlock], u_prev[kBlock], tmp[kBlock],
      tmp_mask[kBlock];
  std::vector<float> held(masked ? T * kBlock : 0);  // the membrane after each step, masked only
  part.mask.assign(T, 0.0);
  const float inv = 1.0f / vth;
  const float u0 = p.init * vth;
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, end - b0);
    if (masked) {  // the held membranes, recomputed forward from h
      for (int64_t j = 0; j < nb; ++j) u_prev[j] = u0;
      for (int64_t t = 0; t < T; ++t) {
        const float* h = hs + t * N + b0;
        const float m = mask[t], keep = 1.0f - m;
        float* out = held.data() + t * kBlock;
        for (int64_t j = 0; j < nb; ++j) {
          float s = h[j] >= vth ? 1.0f : 0.0f;
          u_prev[j] = m * AfterReset<kSoft>(h[j], s, vth) + keep * u_prev[j];
          out[j] = u_prev[j];
        }
      }
    }
    for (int64_t j = 0; j < nb; ++j) g_u[j] = acc_vth[j] = acc_lam[j] = 0.0f;
    if (is_static) {
      for (int64_t j = 0; j < nb; ++j) tmp[j] = 0.0f;
    }
    for (int64_t t = T - 1; t >= 0; --t) {
      const float* h = hs + t * N + b0;
      const float* g_o = g_out + t * N + b0;
      float* g_i = is_static ? tmp : g_in + t * N + b0;
      // The membrane entering step t.
      if (t == 0) {
        for (int64_t j = 0; j < nb; ++j) u_prev[j] = u0;
      } else if (masked) {
        const float* src = held.data() + (t - 1) * kBlock;
        for (int64_t j = 0; j < nb; ++j) u_prev[j] = src[j];
      } else {
        const float* hp = hs + (t - 1) * N + b0;
        for (int64_t j = 0; j < nb; ++j) {
          float s = hp[j] >= vth ? 1.0f : 0.0f;
          u_prev[j] = AfterReset<kSoft>(hp[j], s, vth);
        }
      }
      const float m = masked ? mask[t] : 1.0f, keep = 1.0f - m;
      for (int64_t j = 0; j < nb; ++j) {
        const float hj = h[j];
        const float x = kNormalized ? hj * inv - 1.0f : hj - vth;
        const float s = hj >= vth ? 1.0f : 0.0f;
        float g_s, g_r;
        if (masked) {
          tmp_mask[j] = g_o[j] * s + g_u[j] * (AfterReset<kSoft>(hj, s, vth) - u_prev[j]);
          g_s = m * g_o[j];
          g_r = m * g_u[j];
        } else {
          g_s = g_o[j];
          g_r = g_u[j];
        }
        if (!detach) g_s = g_s - (kSoft ? vth * g_r : hj * g_r);
        const float g_x = g_s * SurrogateGrad<kSurrogate>(x, alpha);
        const float g_h = (kNormalized ? g_x * inv : g_x) + (kSoft ? g_r : g_r * (1.0f - s));
        acc_vth[j] += (kNormalized ? -g_x * hj * (inv * inv) : -g_x) - (kSoft ? s * g_r : 0.0f);
        float g_prev;
        if constexpr (kSpikformer) {
          const float gi = g_h / tau;
          g_i[j] = is_static ? g_i[j] + gi : gi;
          g_prev = g_h - g_h / tau;
        } else {
          g_i[j] = is_static ? g_i[j] + g_h : g_h;
          g_prev = lam * g_h;
          acc_lam[j] += g_h * u_prev[j];
        }
        g_u[j] = masked ? g_prev + keep * g_u[j] : g_prev;
      }
      if (masked) part.mask[t] += SumBlock(tmp_mask, nb);
    }
    double s_vth = 0.0, s_lam = 0.0;
    for (int64_t j = 0; j < nb; ++j) {
      s_vth += acc_vth[j] + p.init * g_u[j];
      s_lam += acc_lam[j];
    }
    part.vth += s_vth;
    part.lam += s_lam;
    if (is_static) {
      float* out = g_in + b0;
      for (int64_t j = 0; j < nb; ++j) out[j] = tmp[j];
    }
  }
}

Settings ReadSettings(float tau, float alpha, float init, int32_t spikformer, int32_t soft, int32_t normalized,
                      int32_t surrogate, int32_t detach, int32_t masked, int32_t is_static, int32_t with_lam) {
  return Settings{tau, alpha, init, spikformer, soft, normalized, surrogate, detach, masked, is_static, with_lam};
}

ffi::Error CheckShapes(int64_t T, int64_t N, ffi::Buffer<ffi::F32>& cur, const Settings& p) {
  auto dims = cur.dimensions();
  if (p.is_static ? (dims.size() != 1 || dims[0] != N) : (dims.size() != 2 || dims[0] != T || dims[1] != N)) {
    return ffi::Error::InvalidArgument("dtvit LIF kernel: the input must be [T, N], or [N] when static");
  }
  return ffi::Error::Success();
}

ffi::Error LifForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> cur, ffi::Buffer<ffi::F32> lam_b,
                      ffi::Buffer<ffi::F32> vth_b, ffi::Buffer<ffi::F32> mask_b,
                      ffi::ResultBuffer<ffi::F32> spikes, ffi::ResultBuffer<ffi::F32> hs, float tau, float alpha,
                      float init, int32_t spikformer, int32_t soft, int32_t normalized, int32_t surrogate,
                      int32_t detach, int32_t masked, int32_t is_static, int32_t with_lam) {
  const Settings p = ReadSettings(tau, alpha, init, spikformer, soft, normalized, surrogate, detach, masked,
                                  is_static, with_lam);
  auto out_dims = spikes->dimensions();
  const int64_t T = out_dims[0], N = out_dims[1];
  if (ffi::Error e = CheckShapes(T, N, cur, p); e.failure()) return e;
  const float lam = lam_b.typed_data()[0], vth = vth_b.typed_data()[0];
  const float* mask = mask_b.typed_data();
  const float* in = cur.typed_data();
  float* s = spikes->typed_data();
  float* h = hs->typed_data();
  auto run = [&](auto kernel) {
    ParallelFor(pool, N, NumChunks(pool, N), [&, kernel](int64_t b, int64_t e, int64_t) {
      kernel(p, T, N, in, lam, vth, mask, s, h, b, e);
    });
  };
  if (p.spikformer) {
    p.soft ? run(ForwardRange<true, true>) : run(ForwardRange<true, false>);
  } else {
    p.soft ? run(ForwardRange<false, true>) : run(ForwardRange<false, false>);
  }
  return ffi::Error::Success();
}

using BackwardFn = void (*)(const Settings&, int64_t, int64_t, const float*, const float*, float, float,
                            const float*, float*, Partials&, int64_t, int64_t);

template <bool kSpikformer, bool kSoft, bool kNormalized>
BackwardFn PickSurrogate(int32_t surrogate) {
  if (surrogate == 0) return BackwardRange<kSpikformer, kSoft, kNormalized, 0>;
  if (surrogate == 1) return BackwardRange<kSpikformer, kSoft, kNormalized, 1>;
  return BackwardRange<kSpikformer, kSoft, kNormalized, 2>;
}

template <bool kSpikformer, bool kSoft>
BackwardFn PickNormalized(const Settings& p) {
  return p.normalized ? PickSurrogate<kSpikformer, kSoft, true>(p.surrogate)
                      : PickSurrogate<kSpikformer, kSoft, false>(p.surrogate);
}

BackwardFn PickBackward(const Settings& p) {
  if (p.spikformer) return p.soft ? PickNormalized<true, true>(p) : PickNormalized<true, false>(p);
  return p.soft ? PickNormalized<false, true>(p) : PickNormalized<false, false>(p);
}

ffi::Error LifBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hs_b, ffi::Buffer<ffi::F32> g_b,
                       ffi::Buffer<ffi::F32> lam_b, ffi::Buffer<ffi::F32> vth_b, ffi::Buffer<ffi::F32> mask_b,
                       ffi::ResultBuffer<ffi::F32> g_in, ffi::ResultBuffer<ffi::F32> g_lam,
                       ffi::ResultBuffer<ffi::F32> g_vth, ffi::ResultBuffer<ffi::F32> g_mask, float tau,
                       float alpha, float init, int32_t spikformer, int32_t soft, int32_t normalized,
                       int32_t surrogate, int32_t detach, int32_t masked, int32_t is_static, int32_t with_lam) {
  const Settings p = ReadSettings(tau, alpha, init, spikformer, soft, normalized, surrogate, detach, masked,
                                  is_static, with_lam);
  auto dims = hs_b.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("dtvit LIF kernel: h must be [T, N]");
  const int64_t T = dims[0], N = dims[1];
  const float lam = lam_b.typed_data()[0], vth = vth_b.typed_data()[0];
  const int64_t chunks = NumChunks(pool, N);
  std::vector<Partials> parts(chunks);
  BackwardFn kernel = PickBackward(p);
  const float* hs = hs_b.typed_data();
  const float* g = g_b.typed_data();
  const float* mask = mask_b.typed_data();
  float* gi = g_in->typed_data();
  ParallelFor(pool, N, chunks, [&](int64_t b, int64_t e, int64_t c) {
    kernel(p, T, N, hs, g, lam, vth, mask, gi, parts[c], b, e);
  });
  double s_lam = 0.0, s_vth = 0.0;
  std::vector<double> s_mask(T, 0.0);
  for (const Partials& part : parts) {
    s_lam += part.lam;
    s_vth += part.vth;
    for (int64_t t = 0; t < T; ++t) s_mask[t] += part.mask[t];
  }
  g_lam->typed_data()[0] = p.with_lam ? static_cast<float>(s_lam) : 0.0f;
  g_vth->typed_data()[0] = static_cast<float>(s_vth);
  float* gm = g_mask->typed_data();
  const int64_t mask_len = g_mask->element_count();
  for (int64_t t = 0; t < mask_len; ++t) gm[t] = p.masked ? static_cast<float>(s_mask[t]) : 0.0f;
  return ffi::Error::Success();
}

}  // namespace

// Float32 buffers in (ARG) and out (RET), and the settings, as both handlers bind them.
#define DTVIT_ARG .Arg<ffi::Buffer<ffi::F32>>()
#define DTVIT_RET .Ret<ffi::Buffer<ffi::F32>>()
#define DTVIT_LIF_ATTRS                                                                                    \
  .Attr<float>("tau").Attr<float>("alpha").Attr<float>("init").Attr<int32_t>("spikformer")                 \
      .Attr<int32_t>("soft").Attr<int32_t>("normalized").Attr<int32_t>("surrogate").Attr<int32_t>("detach") \
      .Attr<int32_t>("masked").Attr<int32_t>("is_static").Attr<int32_t>("with_lam")

// (current, lam, vth, mask) -> (spikes, h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(DtvitLifForward, LifForward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() DTVIT_ARG DTVIT_ARG DTVIT_ARG DTVIT_ARG
                                  DTVIT_RET DTVIT_RET DTVIT_LIF_ATTRS);

// (h, dL/dspikes, lam, vth, mask) -> (dL/dcurrent, dL/dlam, dL/dVth, dL/dmask).
XLA_FFI_DEFINE_HANDLER_SYMBOL(DtvitLifBackward, LifBackward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() DTVIT_ARG DTVIT_ARG DTVIT_ARG DTVIT_ARG
                                  DTVIT_ARG DTVIT_RET DTVIT_RET DTVIT_RET DTVIT_RET DTVIT_LIF_ATTRS);
