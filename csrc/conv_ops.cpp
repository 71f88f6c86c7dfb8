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
// run per block (sigma^2 formed per block), the output noise is drawn in the output epilogue.  eps, the weight
// sample and sigma^2 exist for one block at a time (a small kernel is one block); the dmu / drho outputs have the
// weight's size, and nothing weight-sized is kept for backward.  The
// convolutions run in float32 (float64 for float64 inputs) on x's values and weights rounded to x's dtype.
#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "blockwise.h"
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

// x (B, C_in, H, W), mu (C_out, C_in / groups, kh, kw): C_out rows of row_size weight elements, in channel blocks.
struct ConvProblem : BlockwiseProblem {
  int64_t batch, c_out;
  std::vector<int64_t> out_shape;  // (B, C_out, H_out, W_out)
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  std::vector<ChannelBlock> blocks;
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
  p.init(op, x, mu, rho, prior_mu, seed, sigma_param, estimator);
  p.stride = int_pair(stride, op, "stride", 1);
  p.padding = int_pair(padding, op, "padding", 0);
  p.dilation = int_pair(dilation, op, "dilation", 1);
  p.groups = groups;
  p.batch = x.size(0);
  p.c_out = mu.size(0);
  p.row_size = mu.numel() / p.c_out;  // mu is non-empty
  p.out_shape = {p.batch, p.c_out, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = p.dilation[d] * (mu.size(2 + d) - 1) + 1;
    p.out_shape[2 + d] = (x.size(2 + d) + 2 * p.padding[d] - extent) / p.stride[d] + 1;
    TORCH_CHECK(x.size(2 + d) + 2 * p.padding[d] >= extent, "bnn_cpu.", op, ": x ", x.sizes(),
                " is too small for the kernel ", mu.sizes(), " with padding ", padding, " and dilation ", dilation);
  }
  p.blocks = channel_blocks(p.c_out, x.size(1), groups, p.row_size);
  p.max_rows = 0;
  for (const ChannelBlock& b : p.blocks) p.max_rows = std::max(p.max_rows, b.rows);
  return p;
}

// The block's rows of a weight-shaped tensor, as a (rows, C_in / groups, kh, kw) tensor.
at::Tensor weight_rows(const at::Tensor& weight, const ChannelBlock& b) { return weight.narrow(0, b.row, b.rows); }

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
  const at::Tensor xc = as_type(p.x, p.work_type);
  const at::Tensor bias_c = bias.defined() ? as_type(bias, p.work_type) : at::Tensor();
  at::Tensor y;
  at::Tensor w_buffer = p.block_buffer<P>();
  double kl = 0.0;
  for (const ChannelBlock& b : p.blocks) {
    const at::Tensor w = p.block_view(w_buffer, b.rows);
    kl += p.sample<P>(b.row, p.posterior<P>(b.row, b.rows), prior, w, nullptr, true);
    conv_block(y, p, b, xc, p.operand(w), bias_c);
  }
  return {y.to(p.x_type), p.kl_tensor(kl), p.none()};
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_bwd(const ConvProblem& p, const at::Tensor& grad_y,
                                                           const PriorTerms& prior, bool need_dx) {
  const at::Tensor xc = as_type(p.x, p.work_type);
  const at::Tensor gc = as_type(grad_y, p.work_type);
  at::Tensor dx = zeros_like_if(need_dx, xc);
  PosteriorGrads<P> grads(p);
  at::Tensor w_buffer = p.block_buffer<P>();
  at::Tensor eps_buffer = p.block_buffer<float>();
  for (const ChannelBlock& b : p.blocks) {
    const PosteriorRows<P> post = p.posterior<P>(b.row, b.rows);
    const at::Tensor w = p.block_view(w_buffer, b.rows);
    float* eps = eps_buffer.data_ptr<float>();
    p.sample<P>(b.row, post, prior, w, eps, false);
    grads.reparam(p, prior, b.row, b.rows, post, conv_block_backward(p, b, gc, xc, p.operand(w), dx), eps);
  }
  return {need_dx ? dx.to(p.x_type) : p.none(), grads.dmu, grads.drho};
}

// --- lrt ---------------------------------------------------------------------------------------------------------

// The output variance conv2d(x*x, sigma^2), per block, clamped at 0 (a sum of non-negative terms that a fast
// convolution algorithm may round slightly below 0); adds the KL terms to *kl when kl is not null.
template <typename P>
at::Tensor lrt_variance(const ConvProblem& p, const at::Tensor& x_sq, const PriorTerms& prior, double* kl) {
  at::Tensor var;
  at::Tensor s2_buffer = p.block_buffer<P>();
  for (const ChannelBlock& b : p.blocks) {
    const at::Tensor s2 = p.block_view(s2_buffer, b.rows);
    const double block_kl = sigma_squared<P>(p.posterior<P>(b.row, b.rows).block(), p.sigma_param, prior,
                                             s2.data_ptr<P>(), kl != nullptr);
    if (kl != nullptr) *kl += block_kl;
    conv_block(var, p, b, x_sq, as_type(s2, p.work_type), at::Tensor());
  }
  return var.clamp_min_(0.0);
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrt_fwd(const ConvProblem& p, const at::Tensor& bias,
                                                       const PriorTerms& prior) {
  const at::Tensor xc = as_type(p.x, p.work_type);
  const at::Tensor bias_c = bias.defined() ? as_type(bias, p.work_type) : at::Tensor();
  at::Tensor mean;
  for (const ChannelBlock& b : p.blocks) conv_block(mean, p, b, xc, p.operand(weight_rows(p.mu, b)), bias_c);
  double kl = 0.0;
  at::Tensor var = lrt_variance<P>(p, xc * xc, prior, &kl);
  // mean becomes y and var becomes std, in place; flat index, the bias is already in the mean
  lrt_output_in_place(p, 1, mean.numel(), mean, var, at::Tensor());
  return {mean.to(p.x_type), p.kl_tensor(kl), var};  // std stays in the work type (float32 for 16-bit x)
}

template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lrt_bwd(const ConvProblem& p, const at::Tensor& grad_y,
                                                       const at::Tensor& std, const PriorTerms& prior, bool need_dx) {
  const LrtBackward in = lrt_backward_operands(
      p, grad_y, std, [&](const at::Tensor& x_sq) { return lrt_variance<P>(p, x_sq, prior, nullptr); });
  const at::Tensor& xc = in.x;
  const at::Tensor& gc = in.g;
  const at::Tensor& x_sq = in.x_sq;
  const at::Tensor& u = in.u;
  at::Tensor dx_mean = zeros_like_if(need_dx, xc);
  at::Tensor dx_var = zeros_like_if(need_dx, xc);
  PosteriorGrads<P> grads(p);
  at::Tensor s2_buffer = p.block_buffer<P>();
  for (const ChannelBlock& b : p.blocks) {
    const PosteriorRows<P> post = p.posterior<P>(b.row, b.rows);
    const at::Tensor s2 = p.block_view(s2_buffer, b.rows);
    sigma_squared<P>(post.block(), p.sigma_param, prior, s2.data_ptr<P>(), false);
    const at::Tensor mu_c = p.operand(weight_rows(p.mu, b));
    const at::Tensor grad_mean = conv_block_backward(p, b, gc, xc, mu_c, dx_mean);
    const at::Tensor grad_var = conv_block_backward(p, b, u, x_sq, as_type(s2, p.work_type), dx_var);
    grads.lrt(p, prior, b.row, b.rows, post, grad_mean, grad_var);
  }
  return {lrt_input_grad(p, need_dx, dx_mean, dx_var, xc), grads.dmu, grads.drho};  // vjp(g, mu) + 2 x vjp(u, s^2)
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
  const at::Tensor bias_t = p.bias_of("conv_fwd", bias, p.c_out);
  const PriorTerms prior(prior_sigma);
  return with_posterior_type(p, [&](auto type) {
    using P = decltype(type);
    return p.estimator == Estimator::kReparam ? reparam_fwd<P>(p, bias_t, prior) : lrt_fwd<P>(p, bias_t, prior);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu, const at::Tensor& seed, const at::Tensor& std,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double prior_sigma,
    c10::string_view sigma_param, c10::string_view estimator, bool need_dx) {
  const ConvProblem p = make_problem("conv_bwd", x, mu, rho, prior_mu, seed, stride, padding, dilation, groups,
                                     sigma_param, estimator);
  const at::IntArrayRef out_shape(p.out_shape);
  check_cpu_float(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == out_shape, "bnn_cpu.conv_bwd: grad_y must have shape ", out_shape, ", got ",
              grad_y.sizes());
  const PriorTerms prior(prior_sigma, BlockwiseProblem::grad_kl_value("conv_bwd", grad_kl));
  if (p.estimator == Estimator::kLrt && std.numel() > 0) {
    check_cpu_float(std, "std");
    TORCH_CHECK(std.sizes() == out_shape, "bnn_cpu.conv_bwd: std must be empty or have shape ", out_shape, ", got ",
                std.sizes());
  }
  return with_posterior_type(p, [&](auto type) {
    using P = decltype(type);
    return p.estimator == Estimator::kReparam ? reparam_bwd<P>(p, grad_y, prior, need_dx)
                                              : lrt_bwd<P>(p, grad_y, std, prior, need_dx);
  });
}

}  // namespace bnn
