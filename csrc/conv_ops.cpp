// conv_fwd / conv_bwd: the Bayesian conv2d, one block of output channels at a time.
//
// The weight (C_out, C_in / groups, kh, kw) is handled as C_out rows of C_in / groups * kh * kw elements, in blocks
// of rows sized like the linear op's (block_rows in tensor_utils.h).  A block either lies inside one group or is a
// run of whole groups, so each block is an ordinary ATen convolution over a slice of x's channels.
//
// reparam: for each block, draw eps, form W_block = mu + sigma * eps (and the block's KL terms), round it to x's dtype
// and run at::convolution for y[:, block]; then drop it.  Backward regenerates the same blocks and runs
// at::convolution_backward once per block: dx[:, block's input channels] += its input gradient, and an elementwise
// epilogue turns its weight gradient G into dmu / drho with the KL gradient.  lrt: the mean and variance convolutions
// run per block (sigma^2 formed per block), the output noise is drawn in the output epilogue.  No weight-sized
// temporary (eps, weight sample, sigma^2) is allocated: only the dmu / drho outputs have the weight's size.  The
// convolutions run in float32 (float64 for float64 inputs) on x's values and weights rounded to x's dtype.
#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "tensor_utils.h"

namespace bnn {
namespace {

// Output channels [row, row + rows), which read input channels [in_channel, in_channel + in_channels) of x and form
// a convolution with `groups` groups (1 inside a group, else the number of whole groups in the block).
struct ChannelBlock {
  int64_t row, rows;
  int64_t in_channel, in_channels;
  int64_t groups;
};

struct ConvProblem {
  at::Tensor x, mu, rho, prior_mu;  // contiguous; prior_mu undefined when absent
  int64_t batch, c_out, row_size;   // row_size: elements per output channel of the weight
  std::vector<int64_t> out_shape;   // (B, C_out, H_out, W_out)
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  at::ScalarType x_type;     // dtype of x, y and dx
  at::ScalarType conv_type;  // float, or double for float64 x
  SigmaParam sigma_param;
  Estimator estimator;
  PhiloxKey key;
  std::vector<ChannelBlock> blocks;
  int64_t max_rows;  // the largest block
};

std::vector<ChannelBlock> channel_blocks(int64_t c_out, int64_t c_in, int64_t groups, int64_t row_size) {
  const int64_t group_out = c_out / groups;
  const int64_t group_in = c_in / groups;
  const int64_t target = block_rows(c_out, row_size);
  std::vector<ChannelBlock> blocks;
  if (group_out <= target) {  // whole groups per block
    const int64_t per_block = target / group_out;
    for (int64_t g = 0; g < groups; g += per_block) {
      const int64_t count = std::min(per_block, groups - g);
      blocks.push_back({g * group_out, count * group_out, g * group_in, count * group_in, count});
    }
  } else {  // pieces of one group
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = 0; c < group_out; c += target) {
        blocks.push_back({g * group_out + c, std::min(target, group_out - c), g * group_in, group_in, 1});
      }
    }
  }
  return blocks;
}

std::vector<int64_t> int_pair(at::IntArrayRef values, const char* op, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, "bnn_cpu.", op, ": ", name, " must have 2 values, got ", values);
  for (const int64_t v : values) {
    TORCH_CHECK(v >= minimum, "bnn_cpu.", op, ": ", name, " values must be at least ", minimum, ", got ", values);
  }
  return values.vec();
}

ConvProblem make_problem(const char* op, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& rho,
                         const c10::optional<at::Tensor>& prior_mu, const at::Tensor& seed, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         c10::string_view sigma_param, c10::string_view estimator) {
  check_cpu_float(x, "x");
  check_cpu_float(mu, "mu");
  check_cpu_float(rho, "rho");
  TORCH_CHECK(x.dim() == 4, "bnn_cpu.", op, ": x must be 4-D (B, C_in, H, W), got shape ", x.sizes());
  TORCH_CHECK(mu.dim() == 4 && mu.numel() > 0, "bnn_cpu.", op,
              ": mu must be 4-D (C_out, C_in / groups, kh, kw) and non-empty, got shape ", mu.sizes());
  TORCH_CHECK(rho.sizes() == mu.sizes(), "bnn_cpu.", op, ": rho must have mu's shape ", mu.sizes(), ", got ",
              rho.sizes());
  TORCH_CHECK(groups >= 1 && mu.size(0) % groups == 0 && x.size(1) == mu.size(1) * groups, "bnn_cpu.", op,
              ": x ", x.sizes(), ", mu ", mu.sizes(), " and groups=", groups, " disagree");
  ConvProblem p;
  p.x = x.contiguous();
  p.mu = mu.contiguous();
  p.rho = rho.contiguous();
  if (prior_mu.has_value() && prior_mu->defined()) {
    check_cpu_float(*prior_mu, "prior_mu");
    TORCH_CHECK(prior_mu->sizes() == mu.sizes(), "bnn_cpu.", op, ": prior_mu must have mu's shape ", mu.sizes(),
                ", got ", prior_mu->sizes());
    p.prior_mu = prior_mu->contiguous();
  }
  p.stride = int_pair(stride, op, "stride", 1);
  p.padding = int_pair(padding, op, "padding", 0);
  p.dilation = int_pair(dilation, op, "dilation", 1);
  p.groups = groups;
  p.batch = x.size(0);
  p.c_out = mu.size(0);
  p.row_size = mu.numel() / p.c_out;
  p.out_shape = {p.batch, p.c_out, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = p.dilation[d] * (mu.size(2 + d) - 1) + 1;
    p.out_shape[2 + d] = (x.size(2 + d) + 2 * p.padding[d] - extent) / p.stride[d] + 1;
    TORCH_CHECK(x.size(2 + d) + 2 * p.padding[d] >= extent, "bnn_cpu.", op, ": x ", x.sizes(),
                " is too small for the kernel ", mu.sizes(), " with padding ", padding, " and dilation ", dilation);
  }
  p.x_type = x.scalar_type();
  p.conv_type = compute_type(p.x_type);
  p.sigma_param = parse_sigma_param(sigma_param);
  p.estimator = parse_estimator(estimator);
  p.key = seed_key(seed);
  p.blocks = channel_blocks(p.c_out, x.size(1), groups, p.row_size);
  p.max_rows = 0;
  for (const ChannelBlock& b : p.blocks) p.max_rows = std::max(p.max_rows, b.rows);
  return p;
}

// Weight values as a convolution operand: rounded to x's dtype (what a convolution in x's dtype would read), held in
// the convolution type.  Both conversions are no-ops for float32.
at::Tensor conv_operand(const at::Tensor& w, const ConvProblem& p) { return w.to(p.x_type).to(p.conv_type); }

at::Tensor kl_tensor(double kl, const ConvProblem& p) {
  return at::scalar_tensor(kl, p.mu.options().dtype(compute_type(p.mu.scalar_type())));
}

// The block's rows of a weight-shaped tensor, as a (rows, C_in / groups, kh, kw) tensor.
at::Tensor weight_rows(const at::Tensor& weight, const ChannelBlock& b) { return weight.narrow(0, b.row, b.rows); }

// A (rows, C_in / groups, kh, kw) view of the first rows of a flat buffer.
at::Tensor block_view(const at::Tensor& buffer, const ConvProblem& p, const ChannelBlock& b) {
  std::vector<int64_t> shape = p.mu.sizes().vec();
  shape[0] = b.rows;
  return buffer.narrow(0, 0, b.rows * p.row_size).view(shape);
}

// conv2d of the block's input channels of `input` with the block's weight (and bias) into channels [row, row + rows)
// of `out`; `out` (B, C_out, H_out, W_out) is allocated on the first call, and is the block's own result when one
// block covers every channel (no copy).
void conv_block(at::Tensor& out, const ConvProblem& p, const ChannelBlock& b, const at::Tensor& input,
                const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor bias_rows = bias.defined() ? bias.narrow(0, b.row, b.rows) : at::Tensor();
  at::Tensor result = at::convolution(input.narrow(1, b.in_channel, b.in_channels), weight, bias_rows, p.stride,
                                      p.padding, p.dilation, false, {0, 0}, b.groups);
  if (b.rows == p.c_out) {
    out = result.contiguous();
    return;
  }
  if (!out.defined()) out = at::empty(p.out_shape, result.options());
  out.narrow(1, b.row, b.rows).copy_(result);
}

// The input and weight gradients of the block's convolution for the block's channels of `grad_out`; the input
// gradient is added into the block's input channels of `grad_input` (when defined), the weight gradient returned.
at::Tensor conv_block_backward(const ConvProblem& p, const ChannelBlock& b, const at::Tensor& grad_out,
                               const at::Tensor& input, const at::Tensor& weight, at::Tensor& grad_input) {
  const bool need_input = grad_input.defined();
  auto grads = at::convolution_backward(grad_out.narrow(1, b.row, b.rows),
                                        input.narrow(1, b.in_channel, b.in_channels), weight, std::nullopt, p.stride,
                                        p.padding, p.dilation, false, {0, 0}, b.groups, {need_input, true, false});
  if (need_input) grad_input.narrow(1, b.in_channel, b.in_channels).add_(std::get<0>(grads));
  return std::get<1>(grads);
}

at::Tensor zeros_like_if(bool needed, const at::Tensor& like) { return needed ? at::zeros_like(like) : at::Tensor(); }

// --- reparam -----------------------------------------------------------------------------------------------------

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_fwd(const ConvProblem& p, const at::Tensor& bias,
                                                           const PriorTerms& prior) {
  const auto pt = c10::CppTypeToScalarType<P>::value;
  const at::Tensor xc = as_type(p.x, p.conv_type);
  const at::Tensor bias_c = bias.defined() ? as_type(bias, p.conv_type) : at::Tensor();
  at::Tensor y;
  at::Tensor w_buffer = at::empty({p.max_rows * p.row_size}, p.mu.options().dtype(pt));
  double kl = 0.0;
  for (const ChannelBlock& b : p.blocks) {
    const PosteriorRows<P> post(p.mu, p.rho, p.prior_mu, b.row, b.rows);
    at::Tensor w = block_view(w_buffer, p, b);
    kl += sample_weight<P>(p.key, static_cast<uint64_t>(b.row * p.row_size), post.block(), p.sigma_param, prior,
                           w.data_ptr<P>(), nullptr, true);
    conv_block(y, p, b, xc, conv_operand(w, p), bias_c);
  }
  return {y.to(p.x_type), kl_tensor(kl, p), at::empty({0}, p.x.options())};
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_bwd(const ConvProblem& p, const at::Tensor& grad_y,
                                                           const PriorTerms& prior, bool need_dx) {
  const auto pt = c10::CppTypeToScalarType<P>::value;
  const at::Tensor xc = as_type(p.x, p.conv_type);
  const at::Tensor gc = as_type(grad_y, p.conv_type);
  at::Tensor dx = zeros_like_if(need_dx, xc);
  at::Tensor dmu = at::empty(p.mu.sizes(), p.mu.options());
  at::Tensor drho = at::empty(p.rho.sizes(), p.rho.options());
  at::Tensor w_buffer = at::empty({p.max_rows * p.row_size}, p.mu.options().dtype(pt));
  at::Tensor eps_buffer = at::empty({p.max_rows * p.row_size}, p.mu.options().dtype(at::kFloat));
  for (const ChannelBlock& b : p.blocks) {
    const PosteriorRows<P> post(p.mu, p.rho, p.prior_mu, b.row, b.rows);
    at::Tensor w = block_view(w_buffer, p, b);
    float* eps = eps_buffer.data_ptr<float>();
    sample_weight<P>(p.key, static_cast<uint64_t>(b.row * p.row_size), post.block(), p.sigma_param, prior,
                     w.data_ptr<P>(), eps, false);
    const at::Tensor grad_w = as_type(conv_block_backward(p, b, gc, xc, conv_operand(w, p), dx), pt);
    OutputRows<P> dmu_rows(dmu, b.row, b.rows);
    OutputRows<P> drho_rows(drho, b.row, b.rows);
    posterior_grad_reparam<P>(post.block(), p.sigma_param, prior, grad_w.data_ptr<P>(), eps, dmu_rows.data(),
                              drho_rows.data());
    dmu_rows.commit();
    drho_rows.commit();
  }
  return {need_dx ? dx.to(p.x_type) : at::empty({0}, p.x.options()), dmu, drho};
}

// --- lrt ---------------------------------------------------------------------------------------------------------

// The output variance conv2d(x*x, sigma^2), per block, clamped at 0 (a sum of non-negative terms that a fast
// convolution algorithm may round slightly below 0); adds the KL terms to *kl when kl is not null.
template <typename P>
at::Tensor lrt_variance(const ConvProblem& p, const at::Tensor& x_sq, const PriorTerms& prior, double* kl) {
  const auto pt = c10::CppTypeToScalarType<P>::value;
  at::Tensor var;
  at::Tensor s2_buffer = at::empty({p.max_rows * p.row_size}, p.mu.options().dtype(pt));
  for (const ChannelBlock& b : p.blocks) {
    const PosteriorRows<P> post(p.mu, p.rho, p.prior_mu, b.row, b.rows);
    at::Tensor s2 = block_view(s2_buffer, p, b);
    const double block_kl = sigma_squared<P>(post.block(), p.sigma_param, prior, s2.data_ptr<P>(), kl != nullptr);
    if (kl != nullptr) *kl += block_kl;
    conv_block(var, p, b, x_sq, as_type(s2, p.conv_type), at::Tensor());
  }
  return var.clamp_min_(0.0);
}

template <typename G>
void lrt_output_typed(const ConvProblem& p, at::Tensor& mean_to_y, at::Tensor& var_to_std) {
  G* y = mean_to_y.data_ptr<G>();
  G* s = var_to_std.data_ptr<G>();
  lrt_output<G>(p.key, 1, mean_to_y.numel(), y, s, nullptr, y, s);  // flat index; the bias is already in the mean
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrt_fwd(const ConvProblem& p, const at::Tensor& bias,
                                                       const PriorTerms& prior) {
  const at::Tensor xc = as_type(p.x, p.conv_type);
  const at::Tensor bias_c = bias.defined() ? as_type(bias, p.conv_type) : at::Tensor();
  at::Tensor mean;
  for (const ChannelBlock& b : p.blocks) conv_block(mean, p, b, xc, conv_operand(weight_rows(p.mu, b), p), bias_c);
  double kl = 0.0;
  at::Tensor var = lrt_variance<P>(p, xc * xc, prior, &kl);
  // mean becomes y and var becomes std, in place
  if (p.conv_type == at::kDouble) {
    lrt_output_typed<double>(p, mean, var);
  } else {
    lrt_output_typed<float>(p, mean, var);
  }
  return {mean.to(p.x_type), kl_tensor(kl, p), var.to(p.x_type)};
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrt_bwd(const ConvProblem& p, const at::Tensor& grad_y,
                                                       const at::Tensor& std, const PriorTerms& prior, bool need_dx) {
  const auto pt = c10::CppTypeToScalarType<P>::value;
  const at::Tensor xc = as_type(p.x, p.conv_type);
  const at::Tensor gc = as_type(grad_y, p.conv_type);
  const at::Tensor x_sq = xc * xc;
  // the output std kept by the forward, or recomputed when the caller kept none
  const at::Tensor std_c =
      std.numel() > 0 ? as_type(std, p.conv_type) : lrt_variance<P>(p, x_sq, prior, nullptr).sqrt_();
  at::Tensor u = at::empty_like(gc);
  if (p.conv_type == at::kDouble) {
    lrt_scaled_grad<double>(p.key, u.numel(), gc.data_ptr<double>(), std_c.data_ptr<double>(), u.data_ptr<double>());
  } else {
    lrt_scaled_grad<float>(p.key, u.numel(), gc.data_ptr<float>(), std_c.data_ptr<float>(), u.data_ptr<float>());
  }
  at::Tensor dx_mean = zeros_like_if(need_dx, xc);
  at::Tensor dx_var = zeros_like_if(need_dx, xc);
  at::Tensor dmu = at::empty(p.mu.sizes(), p.mu.options());
  at::Tensor drho = at::empty(p.rho.sizes(), p.rho.options());
  at::Tensor s2_buffer = at::empty({p.max_rows * p.row_size}, p.mu.options().dtype(pt));
  for (const ChannelBlock& b : p.blocks) {
    const PosteriorRows<P> post(p.mu, p.rho, p.prior_mu, b.row, b.rows);
    at::Tensor s2 = block_view(s2_buffer, p, b);
    sigma_squared<P>(post.block(), p.sigma_param, prior, s2.data_ptr<P>(), false);
    const at::Tensor mu_c = conv_operand(weight_rows(p.mu, b), p);
    const at::Tensor grad_mean = as_type(conv_block_backward(p, b, gc, xc, mu_c, dx_mean), pt);
    const at::Tensor grad_var = as_type(conv_block_backward(p, b, u, x_sq, as_type(s2, p.conv_type), dx_var), pt);
    OutputRows<P> dmu_rows(dmu, b.row, b.rows);
    OutputRows<P> drho_rows(drho, b.row, b.rows);
    posterior_grad_lrt<P>(post.block(), p.sigma_param, prior, grad_mean.data_ptr<P>(), grad_var.data_ptr<P>(),
                          dmu_rows.data(), drho_rows.data());
    dmu_rows.commit();
    drho_rows.commit();
  }
  at::Tensor dx;
  if (need_dx) {
    dx = dx_var.mul_(xc).mul_(2.0).add_(dx_mean).to(p.x_type);  // vjp(g, mu) + 2 x vjp(u, sigma^2)
  } else {
    dx = at::empty({0}, p.x.options());
  }
  return {dx, dmu, drho};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_fwd(const at::Tensor& x, const at::Tensor& mu,
                                                        const at::Tensor& rho, const c10::optional<at::Tensor>& bias,
                                                        const c10::optional<at::Tensor>& prior_mu,
                                                        const at::Tensor& seed, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, double prior_sigma,
                                                        c10::string_view sigma_param, c10::string_view estimator) {
  const ConvProblem p = make_problem("conv_fwd", x, mu, rho, prior_mu, seed, stride, padding, dilation, groups,
                                     sigma_param, estimator);
  at::Tensor bias_t;
  if (bias.has_value() && bias->defined()) {
    check_cpu_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.c_out, "bnn_cpu.conv_fwd: bias must have shape (", p.c_out,
                ",), got ", bias->sizes());
    bias_t = *bias;
  }
  const PriorTerms prior(prior_sigma);
  const bool f64 = compute_type(p.mu.scalar_type()) == at::kDouble;
  if (p.estimator == Estimator::kReparam) {
    return f64 ? reparam_fwd<double>(p, bias_t, prior) : reparam_fwd<float>(p, bias_t, prior);
  }
  return f64 ? lrt_fwd<double>(p, bias_t, prior) : lrt_fwd<float>(p, bias_t, prior);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu, const at::Tensor& seed, const at::Tensor& std,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double prior_sigma,
    c10::string_view sigma_param, c10::string_view estimator, bool need_dx) {
  const ConvProblem p = make_problem("conv_bwd", x, mu, rho, prior_mu, seed, stride, padding, dilation, groups,
                                     sigma_param, estimator);
  check_cpu_float(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(p.out_shape), "bnn_cpu.conv_bwd: grad_y must have shape ",
              at::IntArrayRef(p.out_shape), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_kl.numel() == 1, "bnn_cpu.conv_bwd: grad_kl must have one element, got shape ", grad_kl.sizes());
  const PriorTerms prior(prior_sigma, grad_kl.item<double>());
  const bool f64 = compute_type(p.mu.scalar_type()) == at::kDouble;
  if (p.estimator == Estimator::kReparam) {
    return f64 ? reparam_bwd<double>(p, grad_y, prior, need_dx) : reparam_bwd<float>(p, grad_y, prior, need_dx);
  }
  if (std.numel() > 0) {
    check_cpu_float(std, "std");
    TORCH_CHECK(std.sizes() == at::IntArrayRef(p.out_shape), "bnn_cpu.conv_bwd: std must be empty or have shape ",
                at::IntArrayRef(p.out_shape), ", got ", std.sizes());
  }
  return f64 ? lrt_bwd<double>(p, grad_y, std, prior, need_dx) : lrt_bwd<float>(p, grad_y, std, prior, need_dx);
}

}  // namespace bnn
