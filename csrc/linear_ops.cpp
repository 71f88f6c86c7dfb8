// linear_fwd / linear_bwd: the Bayesian linear layer, one block of weight rows at a time.
//
// reparam: for each block of rows of W, draw eps, form W_block = mu + sigma * eps (and the block's KL terms),
// round it to x's dtype and hand it to an ATen GEMM for y[:, block]; then drop it.  Backward regenerates the same
// blocks: dx += g[:, block] @ W_block, G_block = g[:, block]^T @ x, and an elementwise epilogue writes dmu / drho
// with the KL gradient.  lrt: the mean and variance GEMMs run per block (sigma^2 formed per block), the output
// noise is drawn in the output epilogue.  eps, the weight sample and sigma^2 exist for one block at a time
// (64..256 rows, about 2**18 elements: block_rows in tensor_utils.h), so only a weight that small is ever held
// whole; the dmu / drho outputs have the weight's size, and nothing weight-sized is kept for backward.  GEMMs
// accumulate in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>

#include "blockwise.h"
#include "kernels.h"
#include "ops.h"
#include "tensor_utils.h"

namespace bnn {
namespace {

// x (M, K), mu (N, K): N rows of K weight elements, in blocks of max_rows rows.
struct LinearProblem : BlockwiseProblem {
  int64_t m, n, k;
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
  p.init(op, x, mu, rho, prior_mu, seed, sigma_param, estimator);
  p.m = x.size(0);
  p.n = mu.size(0);
  p.k = mu.size(1);
  p.row_size = p.k;
  p.max_rows = block_rows(p.n, p.k);
  return p;
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
  const at::Tensor xg = as_type(p.x, p.work_type);
  at::Tensor y = at::empty({p.m, p.n}, p.x.options().dtype(p.work_type));
  at::Tensor w_buffer = p.block_buffer<P>();
  double kl = 0.0;
  for (int64_t row = 0; row < p.n; row += p.max_rows) {
    const int64_t rows = std::min(p.max_rows, p.n - row);
    const at::Tensor w = p.block_view(w_buffer, rows);
    kl += p.sample<P>(row, p.posterior<P>(row, rows), prior, w, nullptr, true);
    mm_into_columns(y, row, rows, xg, p.operand(w));
  }
  if (bias.defined()) y.add_(bias.to(p.work_type));
  return {y.to(p.x_type), p.kl_tensor(kl), p.none()};
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_bwd(const LinearProblem& p, const at::Tensor& grad_y,
                                                           const PriorTerms& prior, bool need_dx) {
  const at::Tensor xg = as_type(p.x, p.work_type);
  const at::Tensor gg = as_type(grad_y, p.work_type);
  at::Tensor dx = need_dx ? at::zeros({p.m, p.k}, xg.options()) : at::Tensor();
  PosteriorGrads<P> grads(p);
  at::Tensor w_buffer = p.block_buffer<P>();
  at::Tensor eps_buffer = p.block_buffer<float>();
  for (int64_t row = 0; row < p.n; row += p.max_rows) {
    const int64_t rows = std::min(p.max_rows, p.n - row);
    const PosteriorRows<P> post = p.posterior<P>(row, rows);
    const at::Tensor w = p.block_view(w_buffer, rows);
    float* eps = eps_buffer.data_ptr<float>();
    p.sample<P>(row, post, prior, w, eps, false);
    const at::Tensor g_block = gg.narrow(1, row, rows);  // (M, rows), row stride N
    if (need_dx) dx.addmm_(g_block, p.operand(w));
    grads.reparam(p, prior, row, rows, post, at::mm(g_block.t(), xg), eps);  // G = g^T x, (rows, K)
  }
  return {need_dx ? dx.to(p.x_type) : p.none(), grads.dmu, grads.drho};
}

// --- lrt ---------------------------------------------------------------------------------------------------------

// The output variance (x*x) @ (sigma^2)^T, per block; adds the KL terms to *kl when kl is not null.
template <typename P>
at::Tensor lrt_variance(const LinearProblem& p, const at::Tensor& x_sq, const PriorTerms& prior, double* kl) {
  at::Tensor var = at::empty({p.m, p.n}, x_sq.options());
  at::Tensor s2_buffer = p.block_buffer<P>();
  for (int64_t row = 0; row < p.n; row += p.max_rows) {
    const int64_t rows = std::min(p.max_rows, p.n - row);
    const at::Tensor s2 = p.block_view(s2_buffer, rows);
    const double block_kl =
        sigma_squared<P>(p.posterior<P>(row, rows).block(), p.sigma_param, prior, s2.data_ptr<P>(), kl != nullptr);
    if (kl != nullptr) *kl += block_kl;
    mm_into_columns(var, row, rows, x_sq, as_type(s2, p.work_type));
  }
  return var;
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrt_fwd(const LinearProblem& p, const at::Tensor& bias,
                                                       const PriorTerms& prior) {
  const at::Tensor xg = as_type(p.x, p.work_type);
  const at::Tensor x_sq = xg * xg;
  at::Tensor mean = at::empty({p.m, p.n}, xg.options());
  for (int64_t row = 0; row < p.n; row += p.max_rows) {
    const int64_t rows = std::min(p.max_rows, p.n - row);
    mm_into_columns(mean, row, rows, xg, p.operand(p.mu.narrow(0, row, rows)));
  }
  double kl = 0.0;
  at::Tensor var = lrt_variance<P>(p, x_sq, prior, &kl);
  lrt_output_in_place(p, p.m, p.n, mean, var, bias);  // mean becomes y and var becomes std
  return {mean.to(p.x_type), p.kl_tensor(kl), var};  // std stays in the work type (float32 for 16-bit x)
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrt_bwd(const LinearProblem& p, const at::Tensor& grad_y,
                                                       const at::Tensor& std, const PriorTerms& prior, bool need_dx) {
  const LrtBackward in = lrt_backward_operands(
      p, grad_y, std, [&](const at::Tensor& x_sq) { return lrt_variance<P>(p, x_sq, prior, nullptr); });
  const at::Tensor& xg = in.x;
  const at::Tensor& gg = in.g;
  const at::Tensor& x_sq = in.x_sq;
  const at::Tensor& u = in.u;
  at::Tensor dx_mean = need_dx ? at::zeros({p.m, p.k}, xg.options()) : at::Tensor();
  at::Tensor dx_var = need_dx ? at::zeros({p.m, p.k}, xg.options()) : at::Tensor();
  PosteriorGrads<P> grads(p);
  at::Tensor s2_buffer = p.block_buffer<P>();
  for (int64_t row = 0; row < p.n; row += p.max_rows) {
    const int64_t rows = std::min(p.max_rows, p.n - row);
    const PosteriorRows<P> post = p.posterior<P>(row, rows);
    const at::Tensor s2 = p.block_view(s2_buffer, rows);
    sigma_squared<P>(post.block(), p.sigma_param, prior, s2.data_ptr<P>(), false);
    const at::Tensor g_block = gg.narrow(1, row, rows);
    const at::Tensor u_block = u.narrow(1, row, rows);
    if (need_dx) {
      dx_mean.addmm_(g_block, p.operand(p.mu.narrow(0, row, rows)));
      dx_var.addmm_(u_block, as_type(s2, p.work_type));
    }
    grads.lrt(p, prior, row, rows, post, at::mm(g_block.t(), xg), at::mm(u_block.t(), x_sq));
  }
  return {lrt_input_grad(p, need_dx, dx_mean, dx_var, xg), grads.dmu, grads.drho};  // g @ mu + 2 x (u @ sigma^2)
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd(const at::Tensor& x, const at::Tensor& mu,
                                                          const at::Tensor& rho, const c10::optional<at::Tensor>& bias,
                                                          const c10::optional<at::Tensor>& prior_mu,
                                                          const at::Tensor& seed, double prior_sigma,
                                                          c10::string_view sigma_param, c10::string_view estimator) {
  const LinearProblem p = make_problem("linear_fwd", x, mu, rho, prior_mu, seed, sigma_param, estimator);
  const at::Tensor bias_t = p.bias_of("linear_fwd", bias, p.n);
  const PriorTerms prior(prior_sigma);
  return with_posterior_type(p, [&](auto type) {
    using P = decltype(type);
    return p.estimator == Estimator::kReparam ? reparam_fwd<P>(p, bias_t, prior) : lrt_fwd<P>(p, bias_t, prior);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu, const at::Tensor& seed, const at::Tensor& std,
    double prior_sigma, c10::string_view sigma_param, c10::string_view estimator, bool need_dx) {
  const LinearProblem p = make_problem("linear_bwd", x, mu, rho, prior_mu, seed, sigma_param, estimator);
  check_cpu_float(grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == p.m && grad_y.size(1) == p.n,
              "bnn_cpu.linear_bwd: grad_y must have shape (", p.m, ", ", p.n, "), got ", grad_y.sizes());
  const PriorTerms prior(prior_sigma, BlockwiseProblem::grad_kl_value("linear_bwd", grad_kl));
  if (p.estimator == Estimator::kLrt && std.numel() > 0) {
    check_cpu_float(std, "std");
    TORCH_CHECK(std.dim() == 2 && std.size(0) == p.m && std.size(1) == p.n,
                "bnn_cpu.linear_bwd: std must be empty or have shape (", p.m, ", ", p.n, "), got ", std.sizes());
  }
  return with_posterior_type(p, [&](auto type) {
    using P = decltype(type);
    return p.estimator == Estimator::kReparam ? reparam_bwd<P>(p, grad_y, prior, need_dx)
                                              : lrt_bwd<P>(p, grad_y, std, prior, need_dx);
  });
}

}  // namespace bnn
