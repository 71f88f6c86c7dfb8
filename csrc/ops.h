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

// (y (M, N) in x's dtype, kl 0-dim, std (M, N) for lrt in the work type (float32, float64 for float64 x) or empty
// for reparam).
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
// kl 0-dim, std shaped like y for lrt (in the work type) or empty for reparam).
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

// Bayesian LoRA (bnn_kernels/registry.py): y = base(x; weight) + bias + scale * up(down(x; lora_a); lora_b), the factor
// named by bayes ("A" or "B") Gaussian with sigma from rho.  Linear: x (M, K), weight (N, K), lora_a (r, K), lora_b
// (N, r).  Returns (y in x's dtype, kl 0-dim, h the rank-space activation kept for backward, aux = t's standard
// deviation for lrt "A" or empty); h and aux are float32, or float64 when x or the factors are.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed, double scale, c10::string_view bayes,
    double prior_sigma, c10::string_view sigma_param, c10::string_view estimator);

// (dx in x's dtype or an empty tensor when not need_dx, d lora_a, d lora_b, drho in the factors' dtype), the KL
// gradient included in the Bayesian factor's.  The frozen weight gets no gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed,
    const at::Tensor& h, const at::Tensor& aux, double scale, c10::string_view bayes, double prior_sigma,
    c10::string_view sigma_param, c10::string_view estimator, bool need_dx);

// The conv: x (B, C, H, W), weight (N, C, kh, kw), lora_a (r, C, kh, kw), lora_b (N, r, 1, 1); groups 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_conv2d_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double scale, c10::string_view bayes, double prior_sigma,
    c10::string_view sigma_param, c10::string_view estimator);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_conv2d_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed,
    const at::Tensor& h, const at::Tensor& aux, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, double scale, c10::string_view bayes, double prior_sigma, c10::string_view sigma_param,
    c10::string_view estimator, bool need_dx);

}  // namespace bnn
