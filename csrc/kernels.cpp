// OpenMP + SIMD loops of kernels.h.
//
// Each kernel is a loop template over one chunk [begin, end), specialised on the flags that are fixed per call
// (sigma_param, prior_mu present, ...) so that every loop vectorises.  It is instantiated twice: for float inside a
// function the compiler clones per instruction set (x86-64-v4 / v3 / baseline, picked at load time), for double in
// a plain function.  The drivers run the chunks in parallel.  Built with -ffp-contract=off, so every clone
// computes the same elementwise bits; the KL sums (omp simd reductions) may be associated differently per
// instruction set, so they agree across machines to rounding, and bit for bit on one machine whatever the
// thread count (fixed chunks, summed in order).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define BNN_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BNN_SIMD_CLONES
#endif

namespace bnn {
namespace {

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Runs chunk(begin, end) -> double over [0, n) in parallel; returns the chunk results summed in chunk order.
template <typename ChunkFn>
double for_each_chunk(int64_t n, const ChunkFn& chunk) {
  const int64_t chunks = num_chunks(n);
  if (chunks <= 1) return n > 0 ? chunk(0, n) : 0.0;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  double* out = partial.data();
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    out[c] = chunk(begin, std::min(n, begin + kChunk));
  }
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += out[c];
  return total;
}

// Runs the statement list with NAME a constexpr bool equal to cond, so loops specialise on flags fixed per call.
#define BNN_DISPATCH_BOOL(cond, NAME, ...) \
  if (cond) {                              \
    constexpr bool NAME = true;            \
    __VA_ARGS__                            \
  } else {                                 \
    constexpr bool NAME = false;           \
    __VA_ARGS__                            \
  }

// The block's pointers as locals, so that stores in a loop cannot be taken to change them.
#define BNN_UNPACK_POSTERIOR(post)          \
  const T* __restrict mu_ptr = (post).mu;   \
  const T* __restrict rho_ptr = (post).rho; \
  const T* __restrict prior_ptr = (post).prior_mu;

template <typename T, bool kPrior>
BNN_INLINE T prior_diff(const T* mu, const T* prior_mu, int64_t i) {
  return kPrior ? mu[i] - prior_mu[i] : mu[i];
}

// --- chunk kernels ---------------------------------------------------------------------------------------------

BNN_INLINE void normals_chunk_impl(PhiloxKey key, uint64_t offset, int64_t begin, int64_t end, float* out) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) out[i] = philox_normal(key, offset + static_cast<uint64_t>(i));
}

BNN_SIMD_CLONES void normals_chunk(PhiloxKey key, uint64_t offset, int64_t begin, int64_t end, float* out) {
  normals_chunk_impl(key, offset, begin, end, out);
}

template <typename T, bool kSoftplus, bool kPrior, bool kKl, bool kEps>
BNN_INLINE double sample_loop(PhiloxKey key, uint64_t offset, const PosteriorBlock<T>& post, const PriorTerms& prior,
                              T* w, float* eps_out, int64_t begin, int64_t end) {
  BNN_UNPACK_POSTERIOR(post)
  const T inv_sigma = static_cast<T>(prior.inv_sigma);
  const T inv_two_var = static_cast<T>(prior.inv_two_var);
  double kl = 0.0;
#pragma omp simd reduction(+ : kl)
  for (int64_t i = begin; i < end; ++i) {
    const float eps = philox_normal(key, offset + static_cast<uint64_t>(i));
    const T sigma = sigma_of(rho_ptr[i], kSoftplus);
    w[i] = mu_ptr[i] + sigma * static_cast<T>(eps);
    if (kEps) eps_out[i] = eps;
    if (kKl)
      kl += static_cast<double>(
          kl_term(sigma, prior_diff<T, kPrior>(mu_ptr, prior_ptr, i), inv_sigma, inv_two_var));
  }
  return kl;
}

template <typename T>
BNN_INLINE double sample_chunk_impl(PhiloxKey key, uint64_t offset, const PosteriorBlock<T>& post, bool softplus_param,
                                    const PriorTerms& prior, T* w, float* eps_out, bool with_kl, int64_t begin,
                                    int64_t end) {
  // clang-format off
  BNN_DISPATCH_BOOL(softplus_param, kSoftplus,
    BNN_DISPATCH_BOOL(post.prior_mu != nullptr, kPrior,
      BNN_DISPATCH_BOOL(with_kl, kKl,
        BNN_DISPATCH_BOOL(eps_out != nullptr, kEps,
          return sample_loop<T, kSoftplus, kPrior, kKl, kEps>(key, offset, post, prior, w, eps_out, begin, end);))))
  // clang-format on
}

BNN_SIMD_CLONES double sample_chunk(PhiloxKey key, uint64_t offset, const PosteriorBlock<float>& post,
                                    bool softplus_param, const PriorTerms& prior, float* w, float* eps_out,
                                    bool with_kl, int64_t begin, int64_t end) {
  return sample_chunk_impl(key, offset, post, softplus_param, prior, w, eps_out, with_kl, begin, end);
}

double sample_chunk(PhiloxKey key, uint64_t offset, const PosteriorBlock<double>& post, bool softplus_param,
                    const PriorTerms& prior, double* w, float* eps_out, bool with_kl, int64_t begin, int64_t end) {
  return sample_chunk_impl(key, offset, post, softplus_param, prior, w, eps_out, with_kl, begin, end);
}

// s2 = sigma^2 (when kS2) and the KL sum (when kKl).
template <typename T, bool kSoftplus, bool kPrior, bool kKl, bool kS2>
BNN_INLINE double sigma_loop(const PosteriorBlock<T>& post, const PriorTerms& prior, T* s2, int64_t begin,
                             int64_t end) {
  BNN_UNPACK_POSTERIOR(post)
  const T inv_sigma = static_cast<T>(prior.inv_sigma);
  const T inv_two_var = static_cast<T>(prior.inv_two_var);
  double kl = 0.0;
#pragma omp simd reduction(+ : kl)
  for (int64_t i = begin; i < end; ++i) {
    const T sigma = sigma_of(rho_ptr[i], kSoftplus);
    if (kS2) s2[i] = sigma * sigma;
    if (kKl)
      kl += static_cast<double>(
          kl_term(sigma, prior_diff<T, kPrior>(mu_ptr, prior_ptr, i), inv_sigma, inv_two_var));
  }
  return kl;
}

template <typename T>
BNN_INLINE double sigma_chunk_impl(const PosteriorBlock<T>& post, bool softplus_param, const PriorTerms& prior, T* s2,
                                   bool with_kl, int64_t begin, int64_t end) {
  // clang-format off
  BNN_DISPATCH_BOOL(softplus_param, kSoftplus,
    BNN_DISPATCH_BOOL(post.prior_mu != nullptr, kPrior,
      BNN_DISPATCH_BOOL(with_kl, kKl,
        BNN_DISPATCH_BOOL(s2 != nullptr, kS2,
          return sigma_loop<T, kSoftplus, kPrior, kKl, kS2>(post, prior, s2, begin, end);))))
  // clang-format on
}

BNN_SIMD_CLONES double sigma_chunk(const PosteriorBlock<float>& post, bool softplus_param, const PriorTerms& prior,
                                   float* s2, bool with_kl, int64_t begin, int64_t end) {
  return sigma_chunk_impl(post, softplus_param, prior, s2, with_kl, begin, end);
}

double sigma_chunk(const PosteriorBlock<double>& post, bool softplus_param, const PriorTerms& prior, double* s2,
                   bool with_kl, int64_t begin, int64_t end) {
  return sigma_chunk_impl(post, softplus_param, prior, s2, with_kl, begin, end);
}

// Which gradient flows into dmu / dsigma besides the KL's.
enum class GradKind { kReparam, kLrt, kKlOnly };

template <typename T, GradKind kKind, bool kSoftplus, bool kPrior>
BNN_INLINE void grad_loop(const PosteriorBlock<T>& post, const PriorTerms& prior, const T* g_mean, const T* g_sigma,
                          const float* eps, T* dmu, T* drho, int64_t begin, int64_t end) {
  BNN_UNPACK_POSTERIOR(post)
  const T gk = static_cast<T>(prior.grad_scale);
  const T gk_inv_var = static_cast<T>(prior.grad_scale * prior.inv_var);
  // no KL in the loss (gk = 0): no KL gradient either, also where sigma underflowed to 0 (gk / sigma = 0 / 0)
  const bool with_kl_grad = prior.grad_scale != 0.0;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    T sigma, derivative;
    sigma_and_derivative(rho_ptr[i], kSoftplus, sigma, derivative);
    const T kl_dmu = gk_inv_var * prior_diff<T, kPrior>(mu_ptr, prior_ptr, i);
    const T kl_dsigma = with_kl_grad ? gk_inv_var * sigma - gk / sigma : T(0);
    T dsigma;
    if (kKind == GradKind::kReparam) {
      dmu[i] = g_mean[i] + kl_dmu;
      dsigma = g_mean[i] * static_cast<T>(eps[i]) + kl_dsigma;
    } else if (kKind == GradKind::kLrt) {
      dmu[i] = g_mean[i] + kl_dmu;
      dsigma = T(2) * sigma * g_sigma[i] + kl_dsigma;
    } else {
      dmu[i] = kl_dmu;
      dsigma = kl_dsigma;
    }
    drho[i] = dsigma * derivative;
  }
}

template <typename T>
BNN_INLINE void grad_chunk_impl(const PosteriorBlock<T>& post, bool softplus_param, const PriorTerms& prior,
                                GradKind kind, const T* g_mean, const T* g_sigma, const float* eps, T* dmu, T* drho,
                                int64_t begin, int64_t end) {
  // clang-format off
  BNN_DISPATCH_BOOL(softplus_param, kSoftplus,
    BNN_DISPATCH_BOOL(post.prior_mu != nullptr, kPrior,
      switch (kind) {
        case GradKind::kReparam:
          grad_loop<T, GradKind::kReparam, kSoftplus, kPrior>(post, prior, g_mean, g_sigma, eps, dmu, drho, begin,
                                                              end);
          break;
        case GradKind::kLrt:
          grad_loop<T, GradKind::kLrt, kSoftplus, kPrior>(post, prior, g_mean, g_sigma, eps, dmu, drho, begin, end);
          break;
        default:
          grad_loop<T, GradKind::kKlOnly, kSoftplus, kPrior>(post, prior, g_mean, g_sigma, eps, dmu, drho, begin,
                                                             end);
      }))
  // clang-format on
}

BNN_SIMD_CLONES void grad_chunk(const PosteriorBlock<float>& post, bool softplus_param, const PriorTerms& prior,
                                GradKind kind, const float* g_mean, const float* g_sigma, const float* eps, float* dmu,
                                float* drho, int64_t begin, int64_t end) {
  grad_chunk_impl(post, softplus_param, prior, kind, g_mean, g_sigma, eps, dmu, drho, begin, end);
}

void grad_chunk(const PosteriorBlock<double>& post, bool softplus_param, const PriorTerms& prior, GradKind kind,
                const double* g_mean, const double* g_sigma, const float* eps, double* dmu, double* drho, int64_t begin,
                int64_t end) {
  grad_chunk_impl(post, softplus_param, prior, kind, g_mean, g_sigma, eps, dmu, drho, begin, end);
}

template <typename T, bool kBias>
BNN_INLINE void lrt_output_loop(PhiloxKey key, int64_t cols, const T* mean, const T* var, const T* bias, T* y,
                                T* std_out, int64_t begin, int64_t end) {
  // Walk the chunk one row segment at a time so that bias is indexed without a division per element.
  int64_t i = begin;
  while (i < end) {
    const int64_t col0 = i % cols;
    const int64_t len = std::min(end - i, cols - col0);
    const T* bias_row = kBias ? bias + col0 : nullptr;  // bias_row[j - i] is the bias of element j
#pragma omp simd
    for (int64_t j = i; j < i + len; ++j) {
      const T s = std::sqrt(var[j]);
      const T xi = static_cast<T>(philox_normal(key, static_cast<uint64_t>(j)));
      std_out[j] = s;
      y[j] = kBias ? mean[j] + bias_row[j - i] + s * xi : mean[j] + s * xi;
    }
    i += len;
  }
}

template <typename T>
BNN_INLINE void lrt_output_chunk_impl(PhiloxKey key, int64_t cols, const T* mean, const T* var, const T* bias, T* y,
                                      T* std_out, int64_t begin, int64_t end) {
  // clang-format off
  BNN_DISPATCH_BOOL(bias != nullptr, kBias,
    lrt_output_loop<T, kBias>(key, cols, mean, var, bias, y, std_out, begin, end);)
  // clang-format on
}

BNN_SIMD_CLONES void lrt_output_chunk(PhiloxKey key, int64_t cols, const float* mean, const float* var,
                                      const float* bias, float* y, float* std_out, int64_t begin, int64_t end) {
  lrt_output_chunk_impl(key, cols, mean, var, bias, y, std_out, begin, end);
}

void lrt_output_chunk(PhiloxKey key, int64_t cols, const double* mean, const double* var, const double* bias, double* y,
                      double* std_out, int64_t begin, int64_t end) {
  lrt_output_chunk_impl(key, cols, mean, var, bias, y, std_out, begin, end);
}

template <typename T>
BNN_INLINE void lrt_scaled_grad_chunk_impl(PhiloxKey key, const T* g, const T* std_in, T* u, int64_t begin,
                                           int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T xi = static_cast<T>(philox_normal(key, static_cast<uint64_t>(i)));
    const T s = std_in[i];
    const T safe = s > T(0) ? s : T(1);
    u[i] = s > T(0) ? g[i] * xi / (T(2) * safe) : T(0);
  }
}

BNN_SIMD_CLONES void lrt_scaled_grad_chunk(PhiloxKey key, const float* g, const float* std_in, float* u, int64_t begin,
                                           int64_t end) {
  lrt_scaled_grad_chunk_impl(key, g, std_in, u, begin, end);
}

void lrt_scaled_grad_chunk(PhiloxKey key, const double* g, const double* std_in, double* u, int64_t begin,
                           int64_t end) {
  lrt_scaled_grad_chunk_impl(key, g, std_in, u, begin, end);
}

#undef BNN_DISPATCH_BOOL
#undef BNN_UNPACK_POSTERIOR

}  // namespace

// --- drivers ---------------------------------------------------------------------------------------------------

void fill_normals(PhiloxKey key, uint64_t offset, int64_t n, float* out) {
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    normals_chunk(key, offset, begin, end, out);
    return 0.0;
  });
}

template <typename T>
double sample_weight(PhiloxKey key, uint64_t offset, const PosteriorBlock<T>& post, SigmaParam sp,
                     const PriorTerms& prior, T* w, float* eps_out, bool with_kl) {
  const bool softplus_param = sp == SigmaParam::kSoftplus;
  return for_each_chunk(post.n, [&](int64_t begin, int64_t end) {
    return sample_chunk(key, offset, post, softplus_param, prior, w, eps_out, with_kl, begin, end);
  });
}

template <typename T>
double sigma_squared(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior, T* s2, bool with_kl) {
  const bool softplus_param = sp == SigmaParam::kSoftplus;
  return for_each_chunk(post.n, [&](int64_t begin, int64_t end) {
    return sigma_chunk(post, softplus_param, prior, s2, with_kl, begin, end);
  });
}

template <typename T>
double kl_sum(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior) {
  return sigma_squared<T>(post, sp, prior, nullptr, true);
}

template <typename T>
void posterior_grad_reparam(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior, const T* g,
                            const float* eps, T* dmu, T* drho) {
  const bool softplus_param = sp == SigmaParam::kSoftplus;
  for_each_chunk(post.n, [&](int64_t begin, int64_t end) {
    grad_chunk(post, softplus_param, prior, GradKind::kReparam, g, nullptr, eps, dmu, drho, begin, end);
    return 0.0;
  });
}

template <typename T>
void posterior_grad_lrt(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior, const T* g_mean,
                        const T* g_var, T* dmu, T* drho) {
  const bool softplus_param = sp == SigmaParam::kSoftplus;
  for_each_chunk(post.n, [&](int64_t begin, int64_t end) {
    grad_chunk(post, softplus_param, prior, GradKind::kLrt, g_mean, g_var, nullptr, dmu, drho, begin, end);
    return 0.0;
  });
}

template <typename T>
void posterior_grad_kl(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior, T* dmu, T* drho) {
  const bool softplus_param = sp == SigmaParam::kSoftplus;
  for_each_chunk(post.n, [&](int64_t begin, int64_t end) {
    grad_chunk(post, softplus_param, prior, GradKind::kKlOnly, nullptr, nullptr, nullptr, dmu, drho, begin, end);
    return 0.0;
  });
}

template <typename T>
void lrt_output(PhiloxKey key, int64_t rows, int64_t cols, const T* mean, const T* var, const T* bias, T* y,
                T* std_out) {
  for_each_chunk(rows * cols, [&](int64_t begin, int64_t end) {
    lrt_output_chunk(key, cols, mean, var, bias, y, std_out, begin, end);
    return 0.0;
  });
}

template <typename T>
void lrt_scaled_grad(PhiloxKey key, int64_t n, const T* g, const T* std_in, T* u) {
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    lrt_scaled_grad_chunk(key, g, std_in, u, begin, end);
    return 0.0;
  });
}

#define BNN_INSTANTIATE(T)                                                                                             \
  template double sample_weight<T>(PhiloxKey, uint64_t, const PosteriorBlock<T>&, SigmaParam, const PriorTerms&, T*,   \
                                   float*, bool);                                                                      \
  template double sigma_squared<T>(const PosteriorBlock<T>&, SigmaParam, const PriorTerms&, T*, bool);                 \
  template double kl_sum<T>(const PosteriorBlock<T>&, SigmaParam, const PriorTerms&);                                  \
  template void posterior_grad_reparam<T>(const PosteriorBlock<T>&, SigmaParam, const PriorTerms&, const T*,           \
                                          const float*, T*, T*);                                                       \
  template void posterior_grad_lrt<T>(const PosteriorBlock<T>&, SigmaParam, const PriorTerms&, const T*, const T*, T*, \
                                      T*);                                                                             \
  template void posterior_grad_kl<T>(const PosteriorBlock<T>&, SigmaParam, const PriorTerms&, T*, T*);                 \
  template void lrt_output<T>(PhiloxKey, int64_t, int64_t, const T*, const T*, const T*, T*, T*);                      \
  template void lrt_scaled_grad<T>(PhiloxKey, int64_t, const T*, const T*, T*);

BNN_INSTANTIATE(float)
BNN_INSTANTIATE(double)

#undef BNN_INSTANTIATE

}  // namespace bnn
