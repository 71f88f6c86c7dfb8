// The elementwise work of the CPU ops on raw contiguous buffers: Philox noise, weight samples, sigma^2, the KL and
// its gradient, the lrt output epilogues.  Each function splits its range into fixed chunks run in parallel with
// OpenMP; every chunk is one SIMD loop (compiled for several instruction sets where the compiler allows).
// Sums are taken per chunk in double and added in chunk order, so they do not depend on the thread count.
//
// T is float or double: the precision the posterior (mu, rho, prior_mu) or the GEMM operands are handled in.
#pragma once

#include <cstdint>

#include "philox.h"
#include "posterior.h"

namespace bnn {

// Elements per parallel chunk.
constexpr int64_t kChunk = 2048;

// A block of the posterior: n contiguous elements of mu, rho and (optionally) prior_mu.
template <typename T>
struct PosteriorBlock {
  const T* mu;
  const T* rho;
  const T* prior_mu;  // nullptr: prior mean 0
  int64_t n;
};

// out[i] = tl.randn(seed, offset + i) for i < n.
void fill_normals(PhiloxKey key, uint64_t offset, int64_t n, float* out);

// reparam weight block: eps[i] = tl.randn(seed, offset + i), w = mu + s(rho) * eps.  Writes eps when eps_out is
// not null.  Returns the sum of the block's KL terms when with_kl (0 otherwise).
template <typename T>
double sample_weight(PhiloxKey key, uint64_t offset, const PosteriorBlock<T>& post, SigmaParam sp,
                     const PriorTerms& prior, T* w, float* eps_out, bool with_kl);

// lrt variance weights: s2 = s(rho)^2.  Returns the block's KL sum when with_kl.
template <typename T>
double sigma_squared(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior, T* s2, bool with_kl);

// Sum of the KL terms of a block.
template <typename T>
double kl_sum(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior);

// Posterior gradients, with gk = prior.grad_scale, pm = prior_mu or 0, ps = prior sigma:
//   dmu  = gmu + gk * (mu - pm) / ps^2
//   drho = (gsigma + gk * (sigma / ps^2 - 1 / sigma)) * s'(rho)
// reparam: gmu = G, gsigma = G * eps (G = g^T x for the block's rows).
template <typename T>
void posterior_grad_reparam(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior, const T* g,
                            const float* eps, T* dmu, T* drho);

// lrt: gmu = g^T x, gsigma = 2 * sigma * (u^T x^2).
template <typename T>
void posterior_grad_lrt(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior, const T* g_mean,
                        const T* g_var, T* dmu, T* drho);

// The KL alone: gmu = gsigma = 0.
template <typename T>
void posterior_grad_kl(const PosteriorBlock<T>& post, SigmaParam sp, const PriorTerms& prior, T* dmu, T* drho);

// lrt forward over a row-major (rows, cols) output: std = sqrt(var),
// y = mean + bias[col] + std * tl.randn(seed, row * cols + col).  bias may be null.
template <typename T>
void lrt_output(PhiloxKey key, int64_t rows, int64_t cols, const T* mean, const T* var, const T* bias, T* y,
                T* std_out);

// lrt backward: u = g * tl.randn(seed, i) / (2 * std), 0 where std == 0, over n elements.
template <typename T>
void lrt_scaled_grad(PhiloxKey key, int64_t n, const T* g, const T* std_in, T* u);

}  // namespace bnn
