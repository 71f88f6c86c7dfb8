// sigma = s(rho), s'(rho) and the Gaussian KL terms: the formulas of bnn_kernels/sigma.py, per element.
//
// T is float (float32/float16/bfloat16 parameters, computed in float32) or double (float64 parameters).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <limits>
#include <string>

#include "vec_math.h"

namespace bnn {

enum class SigmaParam { kSoftplus, kDirect };

inline SigmaParam parse_sigma_param(c10::string_view name) {
  if (name == "softplus") return SigmaParam::kSoftplus;
  TORCH_CHECK_VALUE(name == "direct", "sigma_param must be 'softplus' or 'direct', got '", std::string(name), "'");
  return SigmaParam::kDirect;
}

enum class Estimator { kReparam, kLrt };

inline Estimator parse_estimator(c10::string_view name) {
  if (name == "reparam") return Estimator::kReparam;
  TORCH_CHECK_VALUE(name == "lrt", "estimator must be 'reparam' or 'lrt', got '", std::string(name), "'");
  return Estimator::kLrt;
}

constexpr double kMinSigma = 1e-7;  // the "direct" parameterisation clamps sigma here

// The prior N(prior_mu, prior_sigma^2) and how the KL and its gradient are scaled.
struct PriorTerms {
  double inv_sigma;       // 1 / prior_sigma
  double inv_two_var;     // 1 / (2 prior_sigma^2)
  double inv_var;         // 1 / prior_sigma^2
  double grad_scale = 0;  // the upstream gradient of the KL (backward only)

  explicit PriorTerms(double prior_sigma, double grad_kl = 0.0)
      : inv_sigma(1.0 / prior_sigma),
        inv_two_var(0.5 / (prior_sigma * prior_sigma)),
        inv_var(1.0 / (prior_sigma * prior_sigma)),
        grad_scale(grad_kl) {
    TORCH_CHECK(prior_sigma > 0 && std::isfinite(prior_sigma) && std::isfinite(inv_var),
                "bnn_cpu: prior_sigma must be a positive finite number, got ", prior_sigma);
  }
};

// softplus(r) = max(r, 0) + log1p(exp(-|r|)): no overflow for large r, exact tail for very negative r.
template <typename T>
BNN_INLINE T softplus(T r) {
  const T a = r < T(0) ? -r : r;
  const T pos = r > T(0) ? r : T(0);
  return pos + vec::log1p(vec::exp(-a));
}

// sigmoid(r) without overflow: exp(-|r|) / (1 + exp(-|r|)) on the negative side.
template <typename T>
BNN_INLINE T sigmoid(T r) {
  const T a = r < T(0) ? -r : r;
  const T e = vec::exp(-a);
  const T inv = T(1) / (T(1) + e);
  return r >= T(0) ? inv : e * inv;
}

template <typename T>
BNN_INLINE T sigma_of(T rho, bool softplus_param) {
  if (softplus_param) return softplus(rho);
  const T floor = static_cast<T>(kMinSigma);
  return rho < floor ? floor : rho;  // a NaN rho stays NaN, as torch.clamp_min keeps it
}

// ds/drho: sigmoid(rho) for softplus, [rho >= 1e-7] for direct (0 where the clamp holds sigma).
template <typename T>
BNN_INLINE T dsigma_drho(T rho, bool softplus_param) {
  if (softplus_param) return sigmoid(rho);
  return rho >= static_cast<T>(kMinSigma) ? T(1) : T(0);
}

// sigma = s(rho) and ds/drho together; softplus and sigmoid share one exp(-|rho|).
template <typename T>
BNN_INLINE void sigma_and_derivative(T rho, bool softplus_param, T& sigma, T& derivative) {
  if (softplus_param) {
    const T a = rho < T(0) ? -rho : rho;
    const T e = vec::exp(-a);
    const T inv = T(1) / (T(1) + e);
    sigma = (rho > T(0) ? rho : T(0)) + vec::log1p(e);
    derivative = rho >= T(0) ? inv : e * inv;
  } else {
    sigma = sigma_of(rho, false);
    derivative = dsigma_drho(rho, false);
  }
}

// KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)) of one element, diff = mu - prior_mu, as
// ((s - 1)(s + 1) - 2 log s) / 2 + diff^2 / (2 ps^2), s = sigma / ps (bnn_kernels.sigma.gaussian_kl_terms): one
// logarithm, 0 at the prior (to within 2e-14 in float32), no sigma^2 to underflow; +inf below T's smallest normal
// sigma, where the gradient (through 1 / sigma) is not finite either.
template <typename T>
BNN_INLINE T kl_term(T sigma, T diff, T inv_sigma, T inv_two_var) {
  const T s = sigma * inv_sigma;
  const T log_s = sigma < std::numeric_limits<T>::min() ? -std::numeric_limits<T>::infinity() : vec::log(s);
  return T(0.5) * ((s - T(1)) * (s + T(1)) - T(2) * log_s) + diff * diff * inv_two_var;
}

}  // namespace bnn
