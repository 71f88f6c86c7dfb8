// What the block-wise Bayesian ops (linear_ops.cpp, conv_ops.cpp) share.  Both see the weight as rows of row_size
// elements (output features or channels), handled a block of rows at a time: the posterior checks, the noise offsets
// and block buffers, the per-block sample / sigma^2 / gradient epilogues, the lrt output noise and input gradient,
// and the dispatch on the posterior's precision.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "posterior.h"
#include "tensor_utils.h"

namespace bnn {

// The arguments every block-wise op takes, checked; x made contiguous.  mu, rho and prior_mu are kept as given (a
// channels_last or transposed weight is not copied whole): each block of rows is made contiguous as it is read.
struct BlockwiseProblem {
  at::Tensor x, mu, rho, prior_mu;  // prior_mu undefined when absent
  int64_t row_size = 0;             // weight elements per row (output feature / channel); set by the op
  int64_t max_rows = 0;             // rows in the largest block; set by the op
  at::ScalarType x_type;            // dtype of x, y and dx
  at::ScalarType work_type;         // what the GEMMs / convolutions run in: float, or double for float64 x
  SigmaParam sigma_param;
  Estimator estimator;
  PhiloxKey key;

  // Takes x, mu, rho (already checked as CPU float tensors of the op's ranks), prior_mu and the options.
  void init(const char* op, const at::Tensor& x_in, const at::Tensor& mu_in, const at::Tensor& rho_in,
            const c10::optional<at::Tensor>& prior_mu_in, const at::Tensor& seed, c10::string_view sigma_param_in,
            c10::string_view estimator_in) {
    x = x_in.contiguous();
    mu = mu_in;
    rho = rho_in;
    if (prior_mu_in.has_value() && prior_mu_in->defined()) {
      check_cpu_float(*prior_mu_in, "prior_mu");
      TORCH_CHECK(prior_mu_in->sizes() == mu_in.sizes(), "bnn_cpu.", op, ": prior_mu must have mu's shape ",
                  mu_in.sizes(), ", got ", prior_mu_in->sizes());
      prior_mu = *prior_mu_in;
    }
    x_type = x.scalar_type();
    work_type = compute_type(x_type);
    sigma_param = parse_sigma_param(sigma_param_in);
    estimator = parse_estimator(estimator_in);
    key = seed_key(seed);
  }

  // Weight values as a GEMM / convolution operand: rounded to x's dtype (what an op in x's dtype would read), held in
  // the work type, contiguous (a conv with a channels_last weight would not write NCHW).  All three are no-ops for a
  // float32 block of a contiguous weight.
  at::Tensor operand(const at::Tensor& w) const { return w.to(x_type).to(work_type).contiguous(); }

  at::Tensor kl_tensor(double kl) const {
    return at::scalar_tensor(kl, mu.options().dtype(compute_type(mu.scalar_type())));
  }

  // The empty tensor that stands for an output not computed (dx without need_dx, std under reparam).
  at::Tensor none() const { return at::empty({0}, x.options()); }

  // The optional bias as a tensor (undefined when absent), checked to have `n` elements.
  at::Tensor bias_of(const char* op, const c10::optional<at::Tensor>& bias, int64_t n) const {
    if (!bias.has_value() || !bias->defined()) return at::Tensor();
    check_cpu_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bnn_cpu.", op, ": bias must have shape (", n, ",), got ",
                bias->sizes());
    return *bias;
  }

  // A flat buffer of type P holding the largest block.
  template <typename P>
  at::Tensor block_buffer() const {
    return at::empty({max_rows * row_size}, mu.options().dtype(c10::CppTypeToScalarType<P>::value));
  }

  // The first `rows` rows of a block buffer, shaped like mu's rows.
  at::Tensor block_view(const at::Tensor& buffer, int64_t rows) const {
    std::vector<int64_t> shape = mu.sizes().vec();
    shape[0] = rows;
    return buffer.narrow(0, 0, rows * row_size).view(shape);
  }

  // The posterior's rows [row, row + rows) in the compute type P.
  template <typename P>
  PosteriorRows<P> posterior(int64_t row, int64_t rows) const {
    return PosteriorRows<P>(mu, rho, prior_mu, row, rows);
  }

  // The weight sample of the block into w (a block view of type P), its noise into eps when not null; the noise of
  // weight element i is normal number i of the stream, wherever the block starts.  Returns the block's KL sum when
  // with_kl.
  template <typename P>
  double sample(int64_t row, const PosteriorRows<P>& post, const PriorTerms& prior, const at::Tensor& w, float* eps,
                bool with_kl) const {
    return sample_weight<P>(key, static_cast<uint64_t>(row * row_size), post.block(), sigma_param, prior,
                            w.data_ptr<P>(), eps, with_kl);
  }

  // The KL gradient's scalar, checked to be one element.
  static double grad_kl_value(const char* op, const at::Tensor& grad_kl) {
    TORCH_CHECK(grad_kl.numel() == 1, "bnn_cpu.", op, ": grad_kl must have one element, got shape ", grad_kl.sizes());
    return grad_kl.item<double>();
  }
};

// dmu and drho (mu's shape and dtype), written a block of rows at a time with the KL gradient included.
template <typename P>
struct PosteriorGrads {
  at::Tensor dmu, drho;

  explicit PosteriorGrads(const BlockwiseProblem& p)
      : dmu(at::empty(p.mu.sizes(), p.mu.options())), drho(at::empty(p.rho.sizes(), p.rho.options())) {}

  // reparam: from the block's weight gradient and the noise of its sample.
  void reparam(const BlockwiseProblem& p, const PriorTerms& prior, int64_t row, int64_t rows,
               const PosteriorRows<P>& post, const at::Tensor& grad_w, const float* eps) {
    const at::Tensor g = as_type(grad_w, c10::CppTypeToScalarType<P>::value);
    write(row, rows, [&](P* dmu_out, P* drho_out) {
      posterior_grad_reparam<P>(post.block(), p.sigma_param, prior, g.data_ptr<P>(), eps, dmu_out, drho_out);
    });
  }

  // lrt: from the block's mean-weight and variance-weight gradients.
  void lrt(const BlockwiseProblem& p, const PriorTerms& prior, int64_t row, int64_t rows, const PosteriorRows<P>& post,
           const at::Tensor& grad_mean, const at::Tensor& grad_var) {
    const auto pt = c10::CppTypeToScalarType<P>::value;
    const at::Tensor gm = as_type(grad_mean, pt);
    const at::Tensor gv = as_type(grad_var, pt);
    write(row, rows, [&](P* dmu_out, P* drho_out) {
      posterior_grad_lrt<P>(post.block(), p.sigma_param, prior, gm.data_ptr<P>(), gv.data_ptr<P>(), dmu_out,
                            drho_out);
    });
  }

 private:
  template <typename Epilogue>
  void write(int64_t row, int64_t rows, Epilogue&& epilogue) {
    OutputRows<P> dmu_rows(dmu, row, rows);
    OutputRows<P> drho_rows(drho, row, rows);
    epilogue(dmu_rows.data(), drho_rows.data());
    dmu_rows.commit();
    drho_rows.commit();
  }
};

// lrt forward, in place: mean becomes y = mean + bias[col] + std * noise and var becomes std = sqrt(var), over a
// row-major (rows, cols) output of the work type.  bias may be undefined.
inline void lrt_output_in_place(const BlockwiseProblem& p, int64_t rows, int64_t cols, at::Tensor& mean,
                                at::Tensor& var, const at::Tensor& bias) {
  const at::Tensor bias_w = bias.defined() ? as_type(bias, p.work_type) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(p.work_type, "lrt_output", [&] {
    scalar_t* y = mean.data_ptr<scalar_t>();
    scalar_t* s = var.data_ptr<scalar_t>();
    lrt_output<scalar_t>(p.key, rows, cols, y, s, bias_w.defined() ? bias_w.data_ptr<scalar_t>() : nullptr, y, s);
  });
}

// lrt backward: u = g * noise / (2 std) over the output's elements (g and std contiguous, of the work type).
inline at::Tensor lrt_scaled_output_grad(const BlockwiseProblem& p, const at::Tensor& g, const at::Tensor& std) {
  at::Tensor u = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(p.work_type, "lrt_scaled_grad", [&] {
    lrt_scaled_grad<scalar_t>(p.key, u.numel(), g.data_ptr<scalar_t>(), std.data_ptr<scalar_t>(),
                              u.data_ptr<scalar_t>());
  });
  return u;
}

// lrt backward's operands in the work type: x, g = grad_y, x*x and u = g * noise / (2 std), with std the output
// standard deviation the forward kept, or sqrt(variance(x*x)) when the caller kept none.
struct LrtBackward {
  at::Tensor x, g, x_sq, u;
};

template <typename Variance>
LrtBackward lrt_backward_operands(const BlockwiseProblem& p, const at::Tensor& grad_y, const at::Tensor& std,
                                  Variance&& variance) {
  LrtBackward in;
  in.x = as_type(p.x, p.work_type);
  in.g = as_type(grad_y, p.work_type);
  in.x_sq = in.x * in.x;
  const at::Tensor std_w = std.numel() > 0 ? as_type(std, p.work_type) : variance(in.x_sq).sqrt_();
  in.u = lrt_scaled_output_grad(p, in.g, std_w);
  return in;
}

// lrt backward: dx = dx_mean + 2 x dx_var (the input gradients through mu and through sigma^2, xw = x in the work
// type), in x's dtype; none() without need_dx.
inline at::Tensor lrt_input_grad(const BlockwiseProblem& p, bool need_dx, at::Tensor& dx_mean, at::Tensor& dx_var,
                                 const at::Tensor& xw) {
  if (!need_dx) return p.none();
  return dx_var.mul_(xw).mul_(2.0).add_(dx_mean).to(p.x_type);
}

// f(P()) with P = double for float64 parameters, float otherwise.
template <typename F>
auto with_posterior_type(const BlockwiseProblem& p, F&& f) {
  if (compute_type(p.mu.scalar_type()) == at::kDouble) return f(double());
  return f(float());
}

}  // namespace bnn
