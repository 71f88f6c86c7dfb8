// linear_fwd / linear_bwd: the Bayesian linear layer, one block of weight rows at a time.
//
// reparam: for each block of rows of W, draw eps, form W_block = mu + sigma * eps (and the block's KL terms),
// round it to x's dtype and hand it to an ATen GEMM for y[:, block]; then drop it.  Backward regenerates the same
// blocks: dx += g[:, block] @ W_block, G_block = g[:, block]^T @ x, and an elementwise epilogue writes dmu / drho
// with the KL gradient.  lrt: the mean and variance GEMMs run per block (sigma^2 formed per block), the output
// noise is drawn in the output epilogue.  No weight-sized temporary (eps, weight sample, sigma^2) is ever
// allocated: only the dmu / drho outputs have the weight's size.  GEMMs accumulate in float32 (float64 for float64
// inputs).
#include <ATen/ATen.h>

#include "kernels.h"
#include "ops.h"
#include "tensor_utils.h"

namespace bnn {
namespace {

struct LinearProblem {
  at::Tensor x, mu, rho, prior_mu;  // contiguous; prior_mu undefined when absent
  int64_t m, n, k;
  at::ScalarType x_type;     // dtype of x, y and dx
  at::ScalarType gemm_type;  // float, or double for float64 x
  SigmaParam sigma_param;
  Estimator estimator;
  PhiloxKey key;
  int64_t block;  // weight rows per block
};

LinearProblem make_problem(const char* op, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& rho,
                           const c10::optional<at::Tensor>& prior_mu, const at::Tensor& seed,
                           c10::string_view sigma_param, c10::string_view estimator) {
  check_cpu_float(x, "x");
  check_cpu_float(mu, "mu");
  check_cpu_float(rho, "rho");
  TORCH_CHECK(x.dim() == 2, "bnn_cpu.", op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(mu.dim() == 2, "bnn_cpu.", op, ": mu must be 2-D (N, K), got shape ", mu.sizes());
  TORCH_CHECK(x.size(1) == mu.size(1), "bnn_cpu.", op, ": x ", x.sizes(), " and mu ", mu.sizes(), " disagree on K");
  TORCH_CHECK(rho.sizes() == mu.sizes(), "bnn_cpu.", op, ": rho must have mu's shape ", mu.sizes(), ", got ",
              rho.sizes());
  LinearProblem p;
  p.x = x.contiguous();
  p.mu = mu.contiguous();
  p.rho = rho.contiguous();
  if (prior_mu.has_value() && prior_mu->defined()) {
    check_cpu_float(*prior_mu, "prior_mu");
    TORCH_CHECK(prior_mu->sizes() == mu.sizes(), "bnn_cpu.", op, ": prior_mu must have mu's shape ", mu.sizes(),
                ", got ", prior_mu->sizes());
    p.prior_mu = prior_mu->contiguous();
  }
  p.m = x.size(0);
  p.n = mu.size(0);
  p.k = mu.size(1);
  p.x_type = x.scalar_type();
  p.gemm_type = compute_type(p.x_type);
  p.sigma_param = parse_sigma_param(sigma_param);
  p.estimator = parse_estimator(estimator);
  p.key = seed_key(seed);
  p.block = block_rows(p.n, p.k);
  return p;
}

// A block of weight values as a GEMM operand: rounded to x's dtype (what a GEMM in x's dtype would read), held in
// the GEMM type.  Both conversions are no-ops for float32.
at::Tensor gemm_operand(const at::Tensor& w, const LinearProblem& p) { return w.to(p.x_type).to(p.gemm_type); }

at::Tensor kl_tensor(double kl, const LinearProblem& p) {
  return at::scalar_tensor(kl, p.mu.options().dtype(compute_type(p.mu.scalar_type())));
}

// y[:, block] = lhs @ rhs_block^T, written in place into the column slice.
void mm_into_columns(const at::Tensor& out, int64_t begin, int64_t count, const at::Tensor& lhs,
                     const at::Tensor& rhs_block) {
  at::Tensor columns = out.narrow(1, begin, count);
  at::mm_out(columns, lhs, rhs_block.t());
}

// --- reparam -----------------------------------------------------------------------------------------------------

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_fwd(const LinearProblem& p, const at::Tensor& bias,
                                                           const PriorTerms& prior) {
  const auto pt = c10::CppTypeToScalarType<P>::value;
  const at::Tensor xg = as_type(p.x, p.gemm_type);
  at::Tensor y = at::empty({p.m, p.n}, p.x.options().dtype(p.gemm_type));
  at::Tensor w_buffer = at::empty({p.block * p.k}, p.mu.options().dtype(pt));
  double kl = 0.0;
  for (int64_t row = 0; row < p.n; row += p.block) {
    const int64_t rows = std::min(p.block, p.n - row);
    const PosteriorRows<P> post(p.mu, p.rho, p.prior_mu, row, rows);
    at::Tensor w = w_buffer.narrow(0, 0, rows * p.k).view({rows, p.k});
    kl += sample_weight<P>(p.key, static_cast<uint64_t>(row * p.k), post.block(), p.sigma_param, prior, w.data_ptr<P>(),
                           nullptr, true);
    mm_into_columns(y, row, rows, xg, gemm_operand(w, p));
  }
  if (bias.defined()) y.add_(bias.to(p.gemm_type));
  return {y.to(p.x_type), kl_tensor(kl, p), at::empty({0}, p.x.options())};
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_bwd(const LinearProblem& p, const at::Tensor& grad_y,
                                                           const PriorTerms& prior, bool need_dx) {
  const auto pt = c10::CppTypeToScalarType<P>::value;
  const at::Tensor xg = as_type(p.x, p.gemm_type);
  const at::Tensor gg = as_type(grad_y, p.gemm_type);
  at::Tensor dx = need_dx ? at::zeros({p.m, p.k}, xg.options()) : at::Tensor();
  at::Tensor dmu = at::empty(p.mu.sizes(), p.mu.options());
  at::Tensor drho = at::empty(p.rho.sizes(), p.rho.options());
  at::Tensor w_buffer = at::empty({p.block * p.k}, p.mu.options().dtype(pt));
  at::Tensor eps_buffer = at::empty({p.block * p.k}, p.mu.options().dtype(at::kFloat));
  for (int64_t row = 0; row < p.n; row += p.block) {
    const int64_t rows = std::min(p.block, p.n - row);
    const PosteriorRows<P> post(p.mu, p.rho, p.prior_mu, row, rows);
    at::Tensor w = w_buffer.narrow(0, 0, rows * p.k).view({rows, p.k});
    float* eps = eps_buffer.data_ptr<float>();
    sample_weight<P>(p.key, static_cast<uint64_t>(row * p.k), post.block(), p.sigma_param, prior, w.data_ptr<P>(), eps,
                     false);
    const at::Tensor g_block = gg.narrow(1, row, rows);  // (M, rows), row stride N
    if (need_dx) dx.addmm_(g_block, gemm_operand(w, p));
    const at::Tensor grad_w = as_type(at::mm(g_block.t(), xg), pt);  // (rows, K)
    OutputRows<P> dmu_rows(dmu, row, rows);
    OutputRows<P> drho_rows(drho, row, rows);
    posterior_grad_reparam<P>(post.block(), p.sigma_param, prior, grad_w.data_ptr<P>(), eps, dmu_rows.data(),
                              drho_rows.data());
    dmu_rows.commit();
    drho_rows.commit();
  }
  return {need_dx ? dx.to(p.x_type) : at::empty({0}, p.x.options()), dmu, drho};
}

// --- lrt ---------------------------------------------------------------------------------------------------------

// The output variance (x*x) @ (sigma^2)^T, per block; adds the KL terms to *kl when kl is not null.
template <typename P>
at::Tensor lrt_variance(const LinearProblem& p, const at::Tensor& x_sq, const PriorTerms& prior, double* kl) {
  const auto pt = c10::CppTypeToScalarType<P>::value;
  at::Tensor var = at::empty({p.m, p.n}, x_sq.options());
  at::Tensor s2_buffer = at::empty({p.block * p.k}, p.mu.options().dtype(pt));
  for (int64_t row = 0; row < p.n; row += p.block) {
    const int64_t rows = std::min(p.block, p.n - row);
    const PosteriorRows<P> post(p.mu, p.rho, p.prior_mu, row, rows);
    at::Tensor s2 = s2_buffer.narrow(0, 0, rows * p.k).view({rows, p.k});
    const double block_kl = sigma_squared<P>(post.block(), p.sigma_param, prior, s2.data_ptr<P>(), kl != nullptr);
    if (kl != nullptr) *kl += block_kl;
    mm_into_columns(var, row, rows, x_sq, as_type(s2, p.gemm_type));
  }
  return var;
}

template <typename G>
void lrt_output_typed(const LinearProblem& p, at::Tensor& mean_to_y, at::Tensor& var_to_std, const at::Tensor& bias) {
  const at::Tensor bias_g = bias.defined() ? as_type(bias, c10::CppTypeToScalarType<G>::value) : at::Tensor();
  G* y = mean_to_y.data_ptr<G>();
  G* s = var_to_std.data_ptr<G>();
  lrt_output<G>(p.key, p.m, p.n, y, s, bias_g.defined() ? bias_g.data_ptr<G>() : nullptr, y, s);
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrt_fwd(const LinearProblem& p, const at::Tensor& bias,
                                                       const PriorTerms& prior) {
  const at::Tensor xg = as_type(p.x, p.gemm_type);
  const at::Tensor x_sq = xg * xg;
  at::Tensor mean = at::empty({p.m, p.n}, xg.options());
  for (int64_t row = 0; row < p.n; row += p.block) {
    const int64_t rows = std::min(p.block, p.n - row);
    mm_into_columns(mean, row, rows, xg, gemm_operand(p.mu.narrow(0, row, rows), p));
  }
  double kl = 0.0;
  at::Tensor var = lrt_variance<P>(p, x_sq, prior, &kl);
  // mean becomes y and var becomes std, in place
  if (p.gemm_type == at::kDouble) {
    lrt_output_typed<double>(p, mean, var, bias);
  } else {
    lrt_output_typed<float>(p, mean, var, bias);
  }
  return {mean.to(p.x_type), kl_tensor(kl, p), var.to(p.x_type)};
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrt_bwd(const LinearProblem& p, const at::Tensor& grad_y,
                                                       const at::Tensor& std, const PriorTerms& prior, bool need_dx) {
  const auto pt = c10::CppTypeToScalarType<P>::value;
  const at::Tensor xg = as_type(p.x, p.gemm_type);
  const at::Tensor gg = as_type(grad_y, p.gemm_type);
  const at::Tensor x_sq = xg * xg;
  // the output std kept by the forward, or recomputed when the caller kept none
  const at::Tensor std_g =
      std.numel() > 0 ? as_type(std, p.gemm_type) : lrt_variance<P>(p, x_sq, prior, nullptr).sqrt_();
  at::Tensor u = at::empty({p.m, p.n}, xg.options());
  if (p.gemm_type == at::kDouble) {
    lrt_scaled_grad<double>(p.key, p.m * p.n, gg.data_ptr<double>(), std_g.data_ptr<double>(), u.data_ptr<double>());
  } else {
    lrt_scaled_grad<float>(p.key, p.m * p.n, gg.data_ptr<float>(), std_g.data_ptr<float>(), u.data_ptr<float>());
  }
  at::Tensor dx_mean = need_dx ? at::zeros({p.m, p.k}, xg.options()) : at::Tensor();
  at::Tensor dx_var = need_dx ? at::zeros({p.m, p.k}, xg.options()) : at::Tensor();
  at::Tensor dmu = at::empty(p.mu.sizes(), p.mu.options());
  at::Tensor drho = at::empty(p.rho.sizes(), p.rho.options());
  at::Tensor s2_buffer = at::empty({p.block * p.k}, p.mu.options().dtype(pt));
  for (int64_t row = 0; row < p.n; row += p.block) {
    const int64_t rows = std::min(p.block, p.n - row);
    const PosteriorRows<P> post(p.mu, p.rho, p.prior_mu, row, rows);
    at::Tensor s2 = s2_buffer.narrow(0, 0, rows * p.k).view({rows, p.k});
    sigma_squared<P>(post.block(), p.sigma_param, prior, s2.data_ptr<P>(), false);
    const at::Tensor g_block = gg.narrow(1, row, rows);
    const at::Tensor u_block = u.narrow(1, row, rows);
    if (need_dx) {
      dx_mean.addmm_(g_block, gemm_operand(p.mu.narrow(0, row, rows), p));
      dx_var.addmm_(u_block, as_type(s2, p.gemm_type));
    }
    const at::Tensor grad_mean = as_type(at::mm(g_block.t(), xg), pt);
    const at::Tensor grad_var = as_type(at::mm(u_block.t(), x_sq), pt);
    OutputRows<P> dmu_rows(dmu, row, rows);
    OutputRows<P> drho_rows(drho, row, rows);
    posterior_grad_lrt<P>(post.block(), p.sigma_param, prior, grad_mean.data_ptr<P>(), grad_var.data_ptr<P>(),
                          dmu_rows.data(), drho_rows.data());
    dmu_rows.commit();
    drho_rows.commit();
  }
  at::Tensor dx;
  if (need_dx) {
    dx = dx_var.mul_(xg).mul_(2.0).add_(dx_mean).to(p.x_type);  // g @ mu + 2 x (u @ sigma^2)
  } else {
    dx = at::empty({0}, p.x.options());
  }
  return {dx, dmu, drho};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd(const at::Tensor& x, const at::Tensor& mu,
                                                          const at::Tensor& rho, const c10::optional<at::Tensor>& bias,
                                                          const c10::optional<at::Tensor>& prior_mu,
                                                          const at::Tensor& seed, double prior_sigma,
                                                          c10::string_view sigma_param, c10::string_view estimator) {
  const LinearProblem p = make_problem("linear_fwd", x, mu, rho, prior_mu, seed, sigma_param, estimator);
  at::Tensor bias_t;
  if (bias.has_value() && bias->defined()) {
    check_cpu_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.n, "bnn_cpu.linear_fwd: bias must have shape (", p.n, ",), got ",
                bias->sizes());
    bias_t = *bias;
  }
  const PriorTerms prior(prior_sigma);
  const bool f64 = compute_type(p.mu.scalar_type()) == at::kDouble;
  if (p.estimator == Estimator::kReparam) {
    return f64 ? reparam_fwd<double>(p, bias_t, prior) : reparam_fwd<float>(p, bias_t, prior);
  }
  return f64 ? lrt_fwd<double>(p, bias_t, prior) : lrt_fwd<float>(p, bias_t, prior);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu, const at::Tensor& seed, const at::Tensor& std,
    double prior_sigma, c10::string_view sigma_param, c10::string_view estimator, bool need_dx) {
  const LinearProblem p = make_problem("linear_bwd", x, mu, rho, prior_mu, seed, sigma_param, estimator);
  check_cpu_float(grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == p.m && grad_y.size(1) == p.n,
              "bnn_cpu.linear_bwd: grad_y must have shape (", p.m, ", ", p.n, "), got ", grad_y.sizes());
  TORCH_CHECK(grad_kl.numel() == 1, "bnn_cpu.linear_bwd: grad_kl must have one element, got shape ", grad_kl.sizes());
  const PriorTerms prior(prior_sigma, grad_kl.item<double>());
  const bool f64 = compute_type(p.mu.scalar_type()) == at::kDouble;
  if (p.estimator == Estimator::kReparam) {
    return f64 ? reparam_bwd<double>(p, grad_y, prior, need_dx) : reparam_bwd<float>(p, grad_y, prior, need_dx);
  }
  if (std.numel() > 0) {
    check_cpu_float(std, "std");
    TORCH_CHECK(std.dim() == 2 && std.size(0) == p.m && std.size(1) == p.n,
                "bnn_cpu.linear_bwd: std must be empty or have shape (", p.m, ", ", p.n, "), got ", std.sizes());
  }
  return f64 ? lrt_bwd<double>(p, grad_y, std, prior, need_dx) : lrt_bwd<float>(p, grad_y, std, prior, need_dx);
}

}  // namespace bnn
