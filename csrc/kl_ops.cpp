// gaussian_kl_fwd / gaussian_kl_bwd: the closed-form KL of a Gaussian posterior and its gradient.
#include <ATen/ATen.h>

#include "kernels.h"
#include "ops.h"
#include "tensor_utils.h"

namespace bnn {
namespace {

constexpr int64_t kKlBlock = int64_t{1} << 18;  // elements converted to the compute type at a time

struct FlatPosterior {
  at::Tensor mu, rho, prior_mu;
};

FlatPosterior flatten(const at::Tensor& mu, const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu,
                      const char* op) {
  check_cpu_float(mu, "mu");
  check_cpu_float(rho, "rho");
  TORCH_CHECK(rho.sizes() == mu.sizes(), "bnn_cpu.", op, ": rho must have mu's shape ", mu.sizes(), ", got ",
              rho.sizes());
  FlatPosterior flat{mu.contiguous().view(-1), rho.contiguous().view(-1), at::Tensor()};
  if (prior_mu.has_value() && prior_mu->defined()) {
    check_cpu_float(*prior_mu, "prior_mu");
    TORCH_CHECK(prior_mu->sizes() == mu.sizes(), "bnn_cpu.", op, ": prior_mu must have mu's shape ", mu.sizes(),
                ", got ", prior_mu->sizes());
    flat.prior_mu = prior_mu->contiguous().view(-1);
  }
  return flat;
}

template <typename T>
double kl_total(const FlatPosterior& flat, SigmaParam sp, const PriorTerms& prior) {
  const int64_t n = flat.mu.numel();
  double total = 0.0;
  for (int64_t begin = 0; begin < n; begin += kKlBlock) {
    const int64_t count = std::min(kKlBlock, n - begin);
    PosteriorRows<T> rows(flat.mu, flat.rho, flat.prior_mu, begin, count);
    total += kl_sum<T>(rows.block(), sp, prior);
  }
  return total;
}

template <typename T>
void kl_grad(const FlatPosterior& flat, SigmaParam sp, const PriorTerms& prior, const at::Tensor& dmu,
             const at::Tensor& drho) {
  const int64_t n = flat.mu.numel();
  for (int64_t begin = 0; begin < n; begin += kKlBlock) {
    const int64_t count = std::min(kKlBlock, n - begin);
    PosteriorRows<T> rows(flat.mu, flat.rho, flat.prior_mu, begin, count);
    OutputRows<T> dmu_rows(dmu, begin, count);
    OutputRows<T> drho_rows(drho, begin, count);
    posterior_grad_kl<T>(rows.block(), sp, prior, dmu_rows.data(), drho_rows.data());
    dmu_rows.commit();
    drho_rows.commit();
  }
}

}  // namespace

at::Tensor gaussian_kl_fwd(const at::Tensor& mu, const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu,
                           double prior_sigma, c10::string_view sigma_param) {
  const SigmaParam sp = parse_sigma_param(sigma_param);
  const FlatPosterior flat = flatten(mu, rho, prior_mu, "gaussian_kl_fwd");
  const PriorTerms prior(prior_sigma);
  const at::ScalarType ct = compute_type(mu.scalar_type());
  const double kl = ct == at::kDouble ? kl_total<double>(flat, sp, prior) : kl_total<float>(flat, sp, prior);
  return at::scalar_tensor(kl, mu.options().dtype(ct));
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_bwd(const at::Tensor& grad_kl, const at::Tensor& mu,
                                                   const at::Tensor& rho, const c10::optional<at::Tensor>& prior_mu,
                                                   double prior_sigma, c10::string_view sigma_param) {
  const SigmaParam sp = parse_sigma_param(sigma_param);
  const FlatPosterior flat = flatten(mu, rho, prior_mu, "gaussian_kl_bwd");
  TORCH_CHECK(grad_kl.numel() == 1, "bnn_cpu.gaussian_kl_bwd: grad_kl must have one element, got shape ",
              grad_kl.sizes());
  const PriorTerms prior(prior_sigma, grad_kl.item<double>());
  at::Tensor dmu = at::empty(mu.sizes(), mu.options());
  at::Tensor drho = at::empty(rho.sizes(), rho.options());
  const at::Tensor dmu_flat = dmu.view(-1);
  const at::Tensor drho_flat = drho.view(-1);
  if (compute_type(mu.scalar_type()) == at::kDouble) {
    kl_grad<double>(flat, sp, prior, dmu_flat, drho_flat);
  } else {
    kl_grad<float>(flat, sp, prior, dmu_flat, drho_flat);
  }
  return {dmu, drho};
}

}  // namespace bnn
