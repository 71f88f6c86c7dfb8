// philox_normal: the noise stream as a tensor.
#include <ATen/ATen.h>

#include <limits>

#include "kernels.h"
#include "ops.h"
#include "tensor_utils.h"

namespace bnn {

at::Tensor philox_normal(const at::Tensor& seed, int64_t numel, int64_t offset) {
  TORCH_CHECK_VALUE(numel >= 0, "bnn_cpu.philox_normal: numel must be >= 0, got ", numel);
  TORCH_CHECK_VALUE(offset >= 0, "bnn_cpu.philox_normal: offset must be >= 0, got ", offset);
  TORCH_CHECK_VALUE(numel <= std::numeric_limits<int64_t>::max() - offset,
                    "bnn_cpu.philox_normal: offset + numel must be below 2**63, got ", offset, " + ", numel);
  const PhiloxKey key = seed_key(seed);
  at::Tensor out = at::empty({numel}, seed.options().dtype(at::kFloat));
  fill_normals(key, static_cast<uint64_t>(offset), numel, out.data_ptr<float>());
  return out;
}

}  // namespace bnn
