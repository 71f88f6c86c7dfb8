// Registers the CPU operators as torch.ops.bnn_cpu.* and makes the library importable as bnn_kernels._C.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(bnn_cpu, m) {
  m.def("philox_normal(Tensor seed, int numel, int offset) -> Tensor");
  m.def("gaussian_kl_fwd(Tensor mu, Tensor rho, Tensor? prior_mu, float prior_sigma, str sigma_param) -> Tensor");
  m.def(
      "gaussian_kl_bwd(Tensor grad_kl, Tensor mu, Tensor rho, Tensor? prior_mu, float prior_sigma, "
      "str sigma_param) -> (Tensor, Tensor)");
  m.def(
      "linear_fwd(Tensor x, Tensor mu, Tensor rho, Tensor? bias, Tensor? prior_mu, Tensor seed, "
      "float prior_sigma, str sigma_param, str estimator) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_bwd(Tensor grad_y, Tensor grad_kl, Tensor x, Tensor mu, Tensor rho, Tensor? prior_mu, "
      "Tensor seed, Tensor std, float prior_sigma, str sigma_param, str estimator, bool need_dx) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_fwd(Tensor x, Tensor mu, Tensor rho, Tensor? bias, Tensor? prior_mu, Tensor seed, int[] stride, "
      "int[] padding, int[] dilation, int groups, float prior_sigma, str sigma_param, str estimator) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_bwd(Tensor grad_y, Tensor grad_kl, Tensor x, Tensor mu, Tensor rho, Tensor? prior_mu, Tensor seed, "
      "Tensor std, int[] stride, int[] padding, int[] dilation, int groups, float prior_sigma, str sigma_param, "
      "str estimator, bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor rho, "
      "Tensor seed, float scale, str bayes, float prior_sigma, str sigma_param, str estimator) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lora_linear_bwd(Tensor grad_y, Tensor grad_kl, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor rho, Tensor seed, Tensor h, Tensor aux, float scale, str bayes, float prior_sigma, str sigma_param, "
      "str estimator, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lora_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor rho, "
      "Tensor seed, int[] stride, int[] padding, int[] dilation, float scale, str bayes, float prior_sigma, "
      "str sigma_param, str estimator) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lora_conv2d_bwd(Tensor grad_y, Tensor grad_kl, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor rho, Tensor seed, Tensor h, Tensor aux, int[] stride, int[] padding, int[] dilation, float scale, "
      "str bayes, float prior_sigma, str sigma_param, str estimator, bool need_dx) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnn_cpu, CPU, m) {
  m.impl("philox_normal", &bnn::philox_normal);
  m.impl("gaussian_kl_fwd", &bnn::gaussian_kl_fwd);
  m.impl("gaussian_kl_bwd", &bnn::gaussian_kl_bwd);
  m.impl("linear_fwd", &bnn::linear_fwd);
  m.impl("linear_bwd", &bnn::linear_bwd);
  m.impl("conv_fwd", &bnn::conv_fwd);
  m.impl("conv_bwd", &bnn::conv_bwd);
  m.impl("lora_linear_fwd", &bnn::lora_linear_fwd);
  m.impl("lora_linear_bwd", &bnn::lora_linear_bwd);
  m.impl("lora_conv2d_fwd", &bnn::lora_conv2d_fwd);
  m.impl("lora_conv2d_bwd", &bnn::lora_conv2d_bwd);
}

// Importing bnn_kernels._C loads this library and with it the registrations above; the module itself is empty.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "bnn-diffusion C++ CPU operators; call them through torch.ops.bnn_cpu";
}
