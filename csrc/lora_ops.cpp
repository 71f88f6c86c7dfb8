// lora_linear_fwd/bwd and lora_conv2d_fwd/bwd: a frozen base layer plus a Bayesian low-rank update,
//   y = base(x; W) + bias + scale * up(down(x; A); B),
// with the factor named by `bayes` Gaussian (prior N(0, prior_sigma^2)).  The formulas are those of
// bnn_kernels/registry.py; one implementation serves the linear layer and the conv through LoRAMaps.
//
// The factors are small (r x K, N x r), so the factor sample, its eps and sigma^2 are drawn into temporaries with the
// elementwise kernels of kernels.h (KL fused) and the maps run as ATen GEMMs / convolutions.  The frozen weight is
// converted to the GEMM operand type block by block over its output rows (as linear_ops.cpp converts weight
// samples), so no converted copy of the whole weight ever exists; when it already is an operand it is used as is.
// Backward regenerates the noise from the seed; it reads the rank-space activation h kept by the forward.
// Every map accumulates in the compute type T: float, or double when x or the factors are float64.
#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "tensor_utils.h"

namespace bnn {
namespace {

// The three maps of a LoRA layer and their vector-Jacobian products, on tensors of the compute type.
// Output channels (of the base and of up) are dimension 1 for both layers.
class LoRAMaps {
 public:
  virtual ~LoRAMaps() = default;
  virtual std::vector<int64_t> base_output_shape(const at::Tensor& x, const at::Tensor& weight) const = 0;
  // out = base(x; w_rows): `out` is the slice of y holding w_rows' output channels.
  virtual void base_into(at::Tensor out, const at::Tensor& x, const at::Tensor& w_rows) const = 0;
  // dx += the input VJP of base(.; w_rows) for the slice g_rows of the output gradient.
  virtual void add_base_input_grad(at::Tensor& dx, const at::Tensor& g_rows, const at::Tensor& x,
                                   const at::Tensor& w_rows) const = 0;
  virtual at::Tensor down(const at::Tensor& x, const at::Tensor& a) const = 0;
  // (d x or undefined, d a) of down(x; a).
  virtual std::array<at::Tensor, 2> down_vjp(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a,
                                             bool need_x) const = 0;
  virtual at::Tensor up(const at::Tensor& h, const at::Tensor& b) const = 0;
  // (d h, d b) of up(h; b).
  virtual std::array<at::Tensor, 2> up_vjp(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& b) const = 0;
  virtual void add_bias(at::Tensor& y, const at::Tensor& bias) const = 0;
};

class LinearMaps final : public LoRAMaps {
 public:
  std::vector<int64_t> base_output_shape(const at::Tensor& x, const at::Tensor& weight) const override {
    return {x.size(0), weight.size(0)};
  }
  void base_into(at::Tensor out, const at::Tensor& x, const at::Tensor& w_rows) const override {
    at::mm_out(out, x, w_rows.t());
  }
  void add_base_input_grad(at::Tensor& dx, const at::Tensor& g_rows, const at::Tensor&,
                           const at::Tensor& w_rows) const override {
    dx.addmm_(g_rows, w_rows);
  }
  at::Tensor down(const at::Tensor& x, const at::Tensor& a) const override { return at::mm(x, a.t()); }
  std::array<at::Tensor, 2> down_vjp(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a,
                                     bool need_x) const override {
    return {need_x ? at::mm(grad, a) : at::Tensor(), at::mm(grad.t(), x)};
  }
  at::Tensor up(const at::Tensor& h, const at::Tensor& b) const override { return at::mm(h, b.t()); }
  std::array<at::Tensor, 2> up_vjp(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& b) const override {
    return {at::mm(grad, b), at::mm(grad.t(), h)};
  }
  void add_bias(at::Tensor& y, const at::Tensor& bias) const override { y.add_(bias); }
};

// Conv maps: base and down are conv2d with the layer's geometry (groups 1); up is the 1x1 conv with b (N, r, 1, 1),
// written as batched matrix products over the pixels.
class Conv2dMaps final : public LoRAMaps {
 public:
  Conv2dMaps(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation)
      : stride_(stride.vec()), padding_(padding.vec()), dilation_(dilation.vec()) {}

  std::vector<int64_t> base_output_shape(const at::Tensor& x, const at::Tensor& weight) const override {
    std::vector<int64_t> shape{x.size(0), weight.size(0)};
    for (int64_t d = 0; d < 2; ++d) {
      const int64_t extent = dilation_[d] * (weight.size(2 + d) - 1) + 1;
      shape.push_back((x.size(2 + d) + 2 * padding_[d] - extent) / stride_[d] + 1);
    }
    return shape;
  }
  void base_into(at::Tensor out, const at::Tensor& x, const at::Tensor& w_rows) const override {
    out.copy_(conv(x, w_rows));
  }
  void add_base_input_grad(at::Tensor& dx, const at::Tensor& g_rows, const at::Tensor& x,
                           const at::Tensor& w_rows) const override {
    dx.add_(std::get<0>(backward(g_rows.contiguous(), x, w_rows, {true, false, false})));
  }
  at::Tensor down(const at::Tensor& x, const at::Tensor& a) const override { return conv(x, a); }
  std::array<at::Tensor, 2> down_vjp(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a,
                                     bool need_x) const override {
    auto grads = backward(grad.contiguous(), x, a, {need_x, true, false});
    return {std::get<0>(grads), std::get<1>(grads)};
  }
  at::Tensor up(const at::Tensor& h, const at::Tensor& b) const override { return at::conv2d(h, b); }
  std::array<at::Tensor, 2> up_vjp(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& b) const override {
    const at::Tensor b2 = b.reshape({b.size(0), b.size(1)});               // (N, r)
    const at::Tensor g3 = grad.reshape({grad.size(0), grad.size(1), -1});  // (batch, N, pixels)
    const at::Tensor h3 = h.reshape({h.size(0), h.size(1), -1});           // (batch, r, pixels)
    at::Tensor dh = at::matmul(b2.t(), g3).view(h.sizes());
    at::Tensor db = at::einsum("ncp,nrp->cr", {g3, h3}).view(b.sizes());
    return {dh, db};
  }
  void add_bias(at::Tensor& y, const at::Tensor& bias) const override { y.add_(bias.view({1, -1, 1, 1})); }

 private:
  at::Tensor conv(const at::Tensor& x, const at::Tensor& w) const {
    return at::conv2d(x, w, {}, stride_, padding_, dilation_);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& w, std::array<bool, 3> mask) const {
    return at::convolution_backward(grad, x, w, c10::nullopt, stride_, padding_, dilation_, false, {0, 0}, 1, mask);
  }

  std::vector<int64_t> stride_, padding_, dilation_;
};

struct LoRAProblem {
  at::Tensor x, weight, a, b, rho;  // contiguous but the frozen weight, kept as given (a channels_last base not copied)
  bool bayes_a;
  SigmaParam sigma_param;
  Estimator estimator;
  PhiloxKey key;
  double scale;
  at::ScalarType x_type;
  at::ScalarType compute;  // float, or double when x or the factors are float64

  const at::Tensor& factor() const { return bayes_a ? a : b; }
  // A tensor as a map operand: rounded to x's dtype (what a map in x's dtype would read), held in the compute type.
  at::Tensor operand(const at::Tensor& t) const { return t.to(x_type).to(compute); }
};

LoRAProblem make_problem(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed, double scale,
                         c10::string_view bayes, c10::string_view sigma_param, c10::string_view estimator) {
  check_cpu_float(x, "x");
  check_cpu_float(weight, "weight");
  check_cpu_float(lora_a, "lora_a");
  check_cpu_float(lora_b, "lora_b");
  check_cpu_float(rho, "rho");
  TORCH_CHECK_VALUE(bayes == "A" || bayes == "B", "bnn_cpu.", op, ": bayes must be 'A' or 'B', got '",
                    std::string(bayes), "'");
  LoRAProblem p;
  p.bayes_a = bayes == "A";
  TORCH_CHECK(rho.sizes() == (p.bayes_a ? lora_a : lora_b).sizes(), "bnn_cpu.", op,
              ": rho must have the Bayesian factor's shape, got ", rho.sizes());
  TORCH_CHECK(lora_a.scalar_type() == lora_b.scalar_type() && rho.scalar_type() == lora_a.scalar_type(), "bnn_cpu.",
              op, ": lora_a, lora_b and rho must share a dtype");
  p.x = x.contiguous();
  p.weight = weight;
  p.a = lora_a.contiguous();
  p.b = lora_b.contiguous();
  p.rho = rho.contiguous();
  p.sigma_param = parse_sigma_param(sigma_param);
  p.estimator = parse_estimator(estimator);
  p.key = seed_key(seed);
  p.scale = scale;
  p.x_type = x.scalar_type();
  const bool f64 = p.x_type == at::kDouble || lora_a.scalar_type() == at::kDouble;
  p.compute = f64 ? at::kDouble : at::kFloat;
  return p;
}

// Calls fn(first_row, rows, w_rows) over blocks of the frozen weight's output rows, w_rows being those rows as a map
// operand.  The weight is used whole when it already is an operand; otherwise each block is converted on its own.
template <typename Fn>
void for_weight_blocks(const LoRAProblem& p, const Fn& fn) {
  const int64_t rows = p.weight.size(0);
  if (p.weight.scalar_type() == p.compute && p.x_type == p.compute) {
    fn(int64_t{0}, rows, p.weight);
    return;
  }
  const int64_t block = block_rows(rows, p.weight.numel() / std::max<int64_t>(rows, 1));
  for (int64_t row = 0; row < rows; row += block) {
    const int64_t count = std::min(block, rows - row);
    fn(row, count, p.operand(p.weight.narrow(0, row, count)));
  }
}

// Both tensors of a vector-Jacobian product multiplied by scale, in place.
std::array<at::Tensor, 2> scaled(std::array<at::Tensor, 2> grads, double scale) {
  for (auto& grad : grads) grad.mul_(scale);
  return grads;
}

template <typename T>
T* data(const at::Tensor& t) {
  return t.data_ptr<T>();
}

// The Bayesian factor's mean and rho in the compute type, as a posterior block with prior mean 0.
template <typename T>
struct FactorPosterior {
  at::Tensor mean, rho;

  explicit FactorPosterior(const LoRAProblem& p)
      : mean(as_type(p.factor(), p.compute)), rho(as_type(p.rho, p.compute)) {}

  PosteriorBlock<T> block() const { return {data<T>(mean), data<T>(rho), nullptr, mean.numel()}; }
};

// F_s = F + sigma * philox_normal(seed, F.numel()) in the compute type; eps is written when eps_out is defined, the
// KL summed into *kl when kl is not null.
template <typename T>
at::Tensor factor_sample(const LoRAProblem& p, const FactorPosterior<T>& post, const PriorTerms& prior, double* kl,
                         const at::Tensor& eps_out) {
  at::Tensor sample = at::empty_like(post.mean);
  const double sum = sample_weight<T>(p.key, 0, post.block(), p.sigma_param, prior, data<T>(sample),
                                      eps_out.defined() ? data<float>(eps_out) : nullptr, kl != nullptr);
  if (kl != nullptr) *kl = sum;
  return sample;
}

// sigma^2 of the factor in the compute type; the KL summed into *kl when kl is not null.
template <typename T>
at::Tensor factor_sigma_squared(const LoRAProblem& p, const FactorPosterior<T>& post, const PriorTerms& prior,
                                double* kl) {
  at::Tensor s2 = at::empty_like(post.mean);
  const double sum = sigma_squared<T>(post.block(), p.sigma_param, prior, data<T>(s2), kl != nullptr);
  if (kl != nullptr) *kl = sum;
  return s2;
}

// In place: mean becomes mean + sqrt(var) * philox_normal(seed, i) (flat index i), var becomes sqrt(var).
template <typename T>
void add_rank_noise(const LoRAProblem& p, at::Tensor& mean, at::Tensor& var) {
  var.clamp_min_(0.0);  // a sum of non-negative terms that a conv algorithm may round slightly below 0
  lrt_output<T>(p.key, 1, mean.numel(), data<T>(mean), data<T>(var), nullptr, data<T>(mean), data<T>(var));
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_fwd(const LoRAMaps& maps, const LoRAProblem& p,
                                                                    const at::Tensor& bias, double prior_sigma) {
  const PriorTerms prior(prior_sigma);
  const FactorPosterior<T> post(p);
  const at::Tensor x = as_type(p.x, p.compute);
  at::Tensor a = p.a, b = p.b, h, lora;
  at::Tensor aux = at::empty({0}, x.options());
  double kl = 0.0;
  if (p.estimator == Estimator::kReparam) {
    at::Tensor sample = factor_sample<T>(p, post, prior, &kl, at::Tensor());
    (p.bayes_a ? a : b) = sample;
    h = maps.down(x, p.operand(a));
    lora = maps.up(p.operand(h), p.operand(b));
  } else {
    const at::Tensor s2 = factor_sigma_squared<T>(p, post, prior, &kl);
    if (!p.bayes_a) {
      h = maps.down(x, p.operand(a));
      lora = maps.up(p.operand(h), p.operand(b));
      at::Tensor var = maps.up(h * h, s2);
      add_rank_noise<T>(p, lora, var);
    } else {
      h = maps.down(x, p.operand(a));
      aux = maps.down(x * x, s2);
      add_rank_noise<T>(p, h, aux);  // h becomes the sample t, aux its standard deviation
      lora = maps.up(p.operand(h), p.operand(b));
    }
  }
  at::Tensor y = at::empty(maps.base_output_shape(x, p.weight), x.options());
  for_weight_blocks(p, [&](int64_t row, int64_t rows, const at::Tensor& w_rows) {
    maps.base_into(y.narrow(1, row, rows), x, w_rows);
  });
  if (bias.defined()) maps.add_bias(y, p.operand(bias));
  y.add_(lora, p.scale);
  const at::Tensor kl_t = at::scalar_tensor(kl, p.a.options().dtype(compute_type(p.a.scalar_type())));
  return {y.to(p.x_type), kl_t, h, aux};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_bwd(const LoRAMaps& maps, const LoRAProblem& p,
                                                                    const at::Tensor& grad_y, const at::Tensor& h_in,
                                                                    const at::Tensor& aux_in, double prior_sigma,
                                                                    double grad_kl, bool need_dx) {
  const PriorTerms prior(prior_sigma, grad_kl);
  const FactorPosterior<T> post(p);
  const at::Tensor x = as_type(p.x, p.compute);
  // g reaches the low-rank output scaled: the scale is applied to the rank-sized products of g, not to g
  const at::Tensor g = as_type(grad_y, p.compute);
  const at::Tensor h = as_type(h_in, p.compute);
  at::Tensor dmean = at::empty_like(post.mean);
  at::Tensor drho = at::empty_like(post.mean);
  at::Tensor dx_lora, grad_other;
  if (p.estimator == Estimator::kReparam) {
    at::Tensor eps = at::empty(post.mean.sizes(), post.mean.options().dtype(at::kFloat));
    at::Tensor a = p.a, b = p.b;
    (p.bayes_a ? a : b) = factor_sample<T>(p, post, prior, nullptr, eps);
    auto up_grads = scaled(maps.up_vjp(g, p.operand(h), p.operand(b)), p.scale);       // dh, G_B
    auto down_grads = maps.down_vjp(p.operand(up_grads[0]), x, p.operand(a), need_dx);  // dx_lora, G_A
    dx_lora = down_grads[0];
    const at::Tensor grad_factor = as_type(p.bayes_a ? down_grads[1] : up_grads[1], p.compute);
    grad_other = p.bayes_a ? up_grads[1] : down_grads[1];
    posterior_grad_reparam<T>(post.block(), p.sigma_param, prior, data<T>(grad_factor), data<float>(eps),
                              data<T>(dmean), data<T>(drho));
  } else {
    const at::Tensor s2 = factor_sigma_squared<T>(p, post, prior, nullptr);
    at::Tensor grad_mean, grad_var;
    if (!p.bayes_a) {
      at::Tensor std = maps.up(h * h, s2).clamp_min_(0.0).sqrt_().contiguous();
      at::Tensor u = at::empty_like(std);
      lrt_scaled_grad<T>(p.key, u.numel(), data<T>(g), data<T>(std), data<T>(u));
      u.mul_(p.scale);
      auto mean_grads = scaled(maps.up_vjp(g, p.operand(h), p.operand(p.b)), p.scale);
      auto var_grads = maps.up_vjp(u, h * h, s2);
      const at::Tensor dh = mean_grads[0] + 2.0 * h * var_grads[0];
      auto down_grads = maps.down_vjp(p.operand(dh), x, p.operand(p.a), need_dx);
      dx_lora = down_grads[0];
      grad_other = down_grads[1];
      grad_mean = mean_grads[1];
      grad_var = var_grads[1];
    } else {
      auto up_grads = scaled(maps.up_vjp(g, p.operand(h), p.operand(p.b)), p.scale);  // dt, G_B
      const at::Tensor dt = up_grads[0].contiguous();
      const at::Tensor std_t = as_type(aux_in, p.compute);
      at::Tensor u = at::empty_like(dt);
      lrt_scaled_grad<T>(p.key, u.numel(), data<T>(dt), data<T>(std_t), data<T>(u));
      auto mean_grads = maps.down_vjp(p.operand(dt), x, p.operand(p.a), need_dx);
      auto var_grads = maps.down_vjp(u, x * x, s2, need_dx);
      if (need_dx) dx_lora = mean_grads[0] + 2.0 * x * var_grads[0];
      grad_other = up_grads[1];
      grad_mean = mean_grads[1];
      grad_var = var_grads[1];
    }
    grad_mean = as_type(grad_mean, p.compute);
    grad_var = as_type(grad_var, p.compute);
    posterior_grad_lrt<T>(post.block(), p.sigma_param, prior, data<T>(grad_mean), data<T>(grad_var), data<T>(dmean),
                          data<T>(drho));
  }
  at::Tensor dx = at::empty({0}, p.x.options());
  if (need_dx) {  // dx_lora is a new tensor of this call: the base's input gradient is added into it
    for_weight_blocks(p, [&](int64_t row, int64_t rows, const at::Tensor& w_rows) {
      maps.add_base_input_grad(dx_lora, g.narrow(1, row, rows), x, w_rows);
    });
    dx = dx_lora.to(p.x_type);
  }
  const auto factor_type = p.a.scalar_type();
  at::Tensor d_factor = dmean.to(factor_type), d_other = grad_other.to(factor_type);
  return {dx, p.bayes_a ? d_factor : d_other, p.bayes_a ? d_other : d_factor, drho.to(factor_type)};
}

at::Tensor checked_bias(const c10::optional<at::Tensor>& bias, int64_t out_features, const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_cpu_float(*bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bnn_cpu.", op, ": bias must have shape (",
              out_features, ",), got ", bias->sizes());
  return *bias;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_fwd(const LoRAMaps& maps, const LoRAProblem& p,
                                                                        const at::Tensor& bias, double prior_sigma) {
  return p.compute == at::kDouble ? lora_fwd<double>(maps, p, bias, prior_sigma)
                                  : lora_fwd<float>(maps, p, bias, prior_sigma);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_bwd(const LoRAMaps& maps, const LoRAProblem& p,
                                                                        const at::Tensor& grad_y,
                                                                        const at::Tensor& grad_kl, const at::Tensor& h,
                                                                        const at::Tensor& aux, double prior_sigma,
                                                                        bool need_dx) {
  check_cpu_float(grad_y, "grad_y");
  check_cpu_float(h, "h");
  if (aux.defined() && aux.numel()) check_cpu_float(aux, "aux");
  TORCH_CHECK(grad_kl.numel() == 1, "bnn_cpu: grad_kl must have one element, got shape ", grad_kl.sizes());
  TORCH_CHECK(!(p.bayes_a && p.estimator == Estimator::kLrt) || aux.sizes() == h.sizes(),
              "bnn_cpu: lrt with bayes 'A' needs aux (t's standard deviation) of h's shape ", h.sizes(), ", got ",
              aux.sizes());
  const double gk = grad_kl.item<double>();
  return p.compute == at::kDouble ? lora_bwd<double>(maps, p, grad_y, h, aux, prior_sigma, gk, need_dx)
                                  : lora_bwd<float>(maps, p, grad_y, h, aux, prior_sigma, gk, need_dx);
}

void check_linear_shapes(const LoRAProblem& p, const char* op) {
  TORCH_CHECK(p.x.dim() == 2 && p.weight.dim() == 2 && p.x.size(1) == p.weight.size(1), "bnn_cpu.", op,
              ": x (M, K) and weight (N, K) expected, got ", p.x.sizes(), " and ", p.weight.sizes());
  TORCH_CHECK(p.a.dim() == 2 && p.a.size(1) == p.x.size(1) && p.b.dim() == 2 && p.b.size(0) == p.weight.size(0) &&
                  p.b.size(1) == p.a.size(0),
              "bnn_cpu.", op, ": lora_a (r, K) and lora_b (N, r) expected, got ", p.a.sizes(), " and ", p.b.sizes());
}

Conv2dMaps conv_maps(const LoRAProblem& p, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                     const char* op) {
  int_pair(stride, op, "stride", 1);
  int_pair(padding, op, "padding", 0);
  int_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(p.x.dim() == 4 && p.weight.dim() == 4 && p.x.size(1) == p.weight.size(1), "bnn_cpu.", op,
              ": x (B, C, H, W) and weight (N, C, kh, kw) expected, got ", p.x.sizes(), " and ", p.weight.sizes());
  TORCH_CHECK(p.a.dim() == 4 && p.a.sizes().slice(1) == p.weight.sizes().slice(1) && p.b.dim() == 4 &&
                  p.b.size(0) == p.weight.size(0) && p.b.size(1) == p.a.size(0) && p.b.size(2) == 1 &&
                  p.b.size(3) == 1,
              "bnn_cpu.", op, ": lora_a (r, C, kh, kw) and lora_b (N, r, 1, 1) expected, got ", p.a.sizes(), " and ",
              p.b.sizes());
  return Conv2dMaps(stride, padding, dilation);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed, double scale, c10::string_view bayes,
    double prior_sigma, c10::string_view sigma_param, c10::string_view estimator) {
  const LoRAProblem p =
      make_problem("lora_linear_fwd", x, weight, lora_a, lora_b, rho, seed, scale, bayes, sigma_param, estimator);
  check_linear_shapes(p, "lora_linear_fwd");
  return dispatch_fwd(LinearMaps(), p, checked_bias(bias, p.weight.size(0), "lora_linear_fwd"), prior_sigma);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed,
    const at::Tensor& h, const at::Tensor& aux, double scale, c10::string_view bayes, double prior_sigma,
    c10::string_view sigma_param, c10::string_view estimator, bool need_dx) {
  const LoRAProblem p =
      make_problem("lora_linear_bwd", x, weight, lora_a, lora_b, rho, seed, scale, bayes, sigma_param, estimator);
  check_linear_shapes(p, "lora_linear_bwd");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == p.x.size(0) && grad_y.size(1) == p.weight.size(0),
              "bnn_cpu.lora_linear_bwd: grad_y must have shape (M, N), got ", grad_y.sizes());
  TORCH_CHECK(h.dim() == 2 && h.size(0) == p.x.size(0) && h.size(1) == p.a.size(0),
              "bnn_cpu.lora_linear_bwd: h must have shape (M, r), got ", h.sizes());
  return dispatch_bwd(LinearMaps(), p, grad_y, grad_kl, h, aux, prior_sigma, need_dx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_conv2d_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, double scale, c10::string_view bayes, double prior_sigma,
    c10::string_view sigma_param, c10::string_view estimator) {
  const LoRAProblem p =
      make_problem("lora_conv2d_fwd", x, weight, lora_a, lora_b, rho, seed, scale, bayes, sigma_param, estimator);
  const Conv2dMaps maps = conv_maps(p, stride, padding, dilation, "lora_conv2d_fwd");
  return dispatch_fwd(maps, p, checked_bias(bias, p.weight.size(0), "lora_conv2d_fwd"), prior_sigma);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_conv2d_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& rho, const at::Tensor& seed,
    const at::Tensor& h, const at::Tensor& aux, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, double scale, c10::string_view bayes, double prior_sigma, c10::string_view sigma_param,
    c10::string_view estimator, bool need_dx) {
  const LoRAProblem p =
      make_problem("lora_conv2d_bwd", x, weight, lora_a, lora_b, rho, seed, scale, bayes, sigma_param, estimator);
  const Conv2dMaps maps = conv_maps(p, stride, padding, dilation, "lora_conv2d_bwd");
  std::vector<int64_t> y_shape = maps.base_output_shape(p.x, p.weight);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(y_shape), "bnn_cpu.lora_conv2d_bwd: grad_y must have shape ",
              at::IntArrayRef(y_shape), " (B, N, H_out, W_out), got ", grad_y.sizes());
  y_shape[1] = p.a.size(0);
  TORCH_CHECK(h.sizes() == at::IntArrayRef(y_shape), "bnn_cpu.lora_conv2d_bwd: h must have shape ",
              at::IntArrayRef(y_shape), " (B, r, H_out, W_out), got ", h.sizes());
  return dispatch_bwd(maps, p, grad_y, grad_kl, h, aux, prior_sigma, need_dx);
}

}  // namespace bnn
