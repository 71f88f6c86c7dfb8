// Argument checks and the small tensor helpers the CPU operators share.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"
#include "philox.h"

namespace bnn {

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "bnn_cpu: ", name, " must be a CPU tensor, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, "bnn_cpu: ", name,
              " must be float32, float16, bfloat16 or float64, got ", s);
}

// A conv's stride / padding / dilation: two values, each at least `minimum`.
inline std::vector<int64_t> int_pair(at::IntArrayRef values, const char* op, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, "bnn_cpu.", op, ": ", name, " must have 2 values, got ", values);
  for (const int64_t v : values) {
    TORCH_CHECK(v >= minimum, "bnn_cpu.", op, ": ", name, " values must be at least ", minimum, ", got ", values);
  }
  return values.vec();
}

// The Philox key of a 0-dim int64 CPU seed tensor.
inline PhiloxKey seed_key(const at::Tensor& seed) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "bnn_cpu: seed must be a 0-dim int64 CPU tensor, got shape ", seed.sizes(), ", dtype ",
              seed.scalar_type(), ", device ", seed.device());
  return philox_key(seed.item<int64_t>());
}

// The precision a tensor of this dtype is computed in: double for float64, float otherwise.
inline at::ScalarType compute_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// t (contiguous) in dtype s: t itself when it already is, else a converted copy.
inline at::Tensor as_type(const at::Tensor& t, at::ScalarType s) {
  return t.scalar_type() == s ? t.contiguous() : t.to(s).contiguous();
}

// Rows [begin, begin + count) of the posterior tensors (any strides), contiguous in the compute type T.
template <typename T>
struct PosteriorRows {
  at::Tensor mu, rho, prior_mu;  // prior_mu undefined when absent

  PosteriorRows(const at::Tensor& mu_all, const at::Tensor& rho_all, const at::Tensor& prior_all, int64_t begin,
                int64_t count) {
    const auto s = c10::CppTypeToScalarType<T>::value;
    mu = as_type(mu_all.narrow(0, begin, count), s);
    rho = as_type(rho_all.narrow(0, begin, count), s);
    if (prior_all.defined()) prior_mu = as_type(prior_all.narrow(0, begin, count), s);
  }

  PosteriorBlock<T> block() const {
    return {mu.data_ptr<T>(), rho.data_ptr<T>(), prior_mu.defined() ? prior_mu.data_ptr<T>() : nullptr, mu.numel()};
  }
};

// A destination slice written through a buffer of the compute type when the dtypes differ.
template <typename T>
struct OutputRows {
  at::Tensor target, buffer;

  OutputRows(const at::Tensor& all, int64_t begin, int64_t count) : target(all.narrow(0, begin, count)) {
    const auto s = c10::CppTypeToScalarType<T>::value;
    buffer = target.scalar_type() == s ? target : at::empty(target.sizes(), target.options().dtype(s));
  }

  T* data() { return buffer.data_ptr<T>(); }

  void commit() {
    if (!buffer.is_same(target)) target.copy_(buffer);
  }
};

// The number of weight rows handled at once: 64..256 rows, about 2**18 elements per block.
inline int64_t block_rows(int64_t rows, int64_t cols) {
  const int64_t target = (int64_t{1} << 18) / std::max<int64_t>(cols, 1);
  const int64_t clamped = std::min<int64_t>(256, std::max<int64_t>(64, target));
  return std::max<int64_t>(1, std::min(rows, clamped));
}

}  // namespace bnn
