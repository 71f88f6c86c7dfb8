// The operators of the bnn_cpu library (registered in bindings.cpp), with the conventions of
// bnn_kernels/registry.py: x (M, K) and mu/rho (N, K) contiguous; seed a 0-dim int64 CPU tensor; prior_mu of mu's
// shape or absent; float32/float16/bfloat16 (float64 for gradcheck).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <tuple>

namespace bnn {

// float32 (numel,): normal numbers offset .. offset + numel - 1 of stream seed.
at::Tensor philox_normal(const at::Tensor& seed, int64_t numel, int64_t offset);

// KL(N(mu, s(rho)^2) || N(prior_mu, prior_sigma^2)) summed: 0-dim float32 (float64 for float64 mu).
at::Tensor gaussian_kl_fwd(const at::Tensor& mu, const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu,
                           double prior_sigma, c10::string_view sigma_param);

// (dmu, drho) of grad_kl * KL, in mu's dtype.
std::tuple<at::Tensor, at::Tensor> gaussian_kl_bwd(const at::Tensor& grad_kl, const at::Tensor& mu,
                                                   const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu,
                                                   double prior_sigma, c10::string_view sigma_param);

// (y (M, N) in x's dtype, kl 0-dim, std (M, N) in x's dtype for lrt or empty for reparam).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd(const at::Tensor& x, const at::Tensor& mu,
                                                          const at::Tensor& rho, const c10::optional<at::Tensor>& bias,
                                                          const c10::optional<at::Tensor>& prior_mu,
                                                          const at::Tensor& seed, double prior_sigma,
                                                          c10::string_view sigma_param, c10::string_view estimator);

// (dx in x's dtype or an empty tensor when not need_dx, dmu, drho in mu's dtype), KL gradient included.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu, const at::Tensor& seed, const at::Tensor& std,
    double prior_sigma, c10::string_view sigma_param, c10::string_view estimator, bool need_dx);

// Bayesian conv2d, with the conventions of bnn_kernels/registry.py: x (B, C_in, H, W), mu/rho
// (C_out, C_in / groups, kh, kw), stride/padding/dilation two values each.  (y (B, C_out, H_out, W_out) in x's dtype,
// kl 0-dim, std shaped like y for lrt or empty for reparam).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_fwd(const at::Tensor& x, const at::Tensor& mu,
                                                        const at::Tensor& rho, const c10::optional<at::Tensor>& bias,
                                                        const c10::optional<at::Tensor>& prior_mu,
                                                        const at::Tensor& seed, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, double prior_sigma,
                                                        c10::string_view sigma_param, c10::string_view estimator);

// (dx in x's dtype or an empty tensor when not need_dx, dmu, drho in mu's dtype), KL gradient included.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu, const at::Tensor& seed, const at::Tensor& std,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double prior_sigma,
    c10::string_view sigma_param, c10::string_view estimator, bool need_dx);

}  // namespace bnn
