// Fused CPU kernels of the guidance hot path, registered as the torch.library ops `elucd::*`.
//
// Each op equals a plain PyTorch reference (elucd_fast/kernels/*.py) and moves fewer bytes:
//
//   softplus_forward   y = x if beta*x > threshold else log1p(exp(beta*x)) / beta
//                      one read of x, one write of y.
//   softplus_backward  dx = dy if beta*x > threshold else dy * sigmoid(beta*x)
//                      recomputes the sigmoid from the saved input: reads dy and x, writes dx.
//   guidance_update    out_b = x_b + noise_scale * z_b + (g_b / max(rms(g_b), tiny)) * rms(x_b) * w_b
//                      a reduction pass over x and g, then one pass reading x, g, z, writing out.
//   classifier_input   r_b = rms(x_b); xc_b = x_b / r_b if r_b > 1 else x_b
//                      a reduction pass over x, then one pass reading x, writing xc.
//
// Arithmetic runs in at::opmath_type: float for float/half/bfloat16 inputs, double for double.
// The loops use at::vec::Vectorized, compiled for the instruction set PyTorch itself dispatches
// to on this machine (the loader passes CPU_CAPABILITY and the matching -m flags), so exp and
// log1p are the same vectorised SLEEF routines PyTorch's own kernels call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace elucd {
namespace {

using at::vec::Vectorized;

// Elementwise loops hand each thread at least this many elements, so that thread wake-up stays
// small next to the work while a single (8, 64, 32, 32) activation still splits across cores.
constexpr int64_t kElementwiseGrain = 32768;

// Row reductions split each row into chunks of this many elements (64 KiB of float32), so that
// a batch of a few large images still spreads over all threads; a 3x64x64 sample is one chunk.
constexpr int64_t kRowChunk = 16384;

// ---------------------------------------------------------------------------------------------
// Softplus

template <typename scalar_t>
void softplus_forward_kernel(const scalar_t* x, scalar_t* y, int64_t n, double beta, double threshold) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const Vec beta_v(static_cast<opmath_t>(beta));
  const Vec threshold_v(static_cast<opmath_t>(threshold));
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    at::vec::map(
        [&](Vec v) {
          const Vec scaled = v * beta_v;
          return Vec::blendv(scaled.exp().log1p() / beta_v, v, scaled > threshold_v);
        },
        y + begin, x + begin, end - begin);
  });
}

template <typename scalar_t>
void softplus_backward_kernel(
    const scalar_t* grad, const scalar_t* x, scalar_t* grad_input, int64_t n, double beta, double threshold) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const Vec beta_v(static_cast<opmath_t>(beta));
  const Vec threshold_v(static_cast<opmath_t>(threshold));
  const Vec one(static_cast<opmath_t>(1));
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    at::vec::map2(
        [&](Vec dy, Vec v) {
          const Vec scaled = v * beta_v;
          // 1 / (1 + exp(-t)) stays finite for every finite t; exp(t) / (1 + exp(t)) is
          // inf / inf = NaN once exp(t) overflows (t > 88 in float32, with a threshold above that).
          const Vec sigmoid = one / (one + scaled.neg().exp());
          return Vec::blendv(dy * sigmoid, dy, scaled > threshold_v);
        },
        grad_input + begin, grad + begin, x + begin, end - begin);
  });
}

at::Tensor softplus_forward(const at::Tensor& x, double beta, double threshold) {
  TORCH_CHECK(x.is_floating_point(), "softplus_forward: x must be a floating tensor, got ", x.scalar_type());
  const at::Tensor input = x.contiguous();
  at::Tensor output = at::empty_like(input, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "softplus_forward", [&] {
    softplus_forward_kernel<scalar_t>(
        input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), input.numel(), beta, threshold);
  });
  return output;
}

at::Tensor softplus_backward(const at::Tensor& grad, const at::Tensor& x, double beta, double threshold) {
  TORCH_CHECK(grad.sizes() == x.sizes(), "softplus_backward: grad shape ", grad.sizes(), " != x shape ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "softplus_backward: grad dtype ", grad.scalar_type(),
              " != x dtype ", x.scalar_type());
  TORCH_CHECK(x.is_floating_point(), "softplus_backward: x must be a floating tensor, got ", x.scalar_type());
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor input = x.contiguous();
  at::Tensor grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "softplus_backward", [&] {
    softplus_backward_kernel<scalar_t>(grad_c.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                       grad_input.mutable_data_ptr<scalar_t>(), input.numel(), beta, threshold);
  });
  return grad_input;
}

// ---------------------------------------------------------------------------------------------
// Per-sample row reductions (x viewed as (rows, row_length))

// Runs body(row, begin, end) over every chunk of every row, in parallel over chunks. A chunk
// never crosses a row, so the body can apply that row's per-sample factors.
template <typename Body>
void for_each_row_chunk(int64_t rows, int64_t row_length, const Body& body) {
  const int64_t chunks_per_row = std::max<int64_t>(1, (row_length + kRowChunk - 1) / kRowChunk);
  at::parallel_for(0, rows * chunks_per_row, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t row = task / chunks_per_row;
      const int64_t begin = (task % chunks_per_row) * kRowChunk;
      const int64_t end = std::min(begin + kRowChunk, row_length);
      body(row, begin, end);
    }
  });
}

// rms of each row, in opmath precision. Chunks write partial sums of squares, then each row
// adds its partials in a fixed order: the result does not depend on the number of threads.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> row_rms(const scalar_t* data, int64_t rows, int64_t row_length) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const int64_t chunks_per_row = std::max<int64_t>(1, (row_length + kRowChunk - 1) / kRowChunk);
  std::vector<opmath_t> partial(rows * chunks_per_row, opmath_t(0));
  for_each_row_chunk(rows, row_length, [&](int64_t row, int64_t begin, int64_t end) {
    if (end > begin) {
      partial[row * chunks_per_row + begin / kRowChunk] = at::vec::map_reduce_all(
          [](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; }, data + row * row_length + begin,
          end - begin);
    }
  });
  std::vector<opmath_t> rms(rows);
  for (int64_t row = 0; row < rows; ++row) {
    opmath_t sum = 0;
    for (int64_t chunk = 0; chunk < chunks_per_row; ++chunk) {
      sum += partial[row * chunks_per_row + chunk];
    }
    rms[row] = std::sqrt(sum / static_cast<opmath_t>(row_length));
  }
  return rms;
}

// Length of one sample's row in a batch tensor: dim 0 is the sample, everything else the row.
int64_t row_length_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": expected a batch tensor (B, ...), got a 0-d tensor");
  return x.size(0) == 0 ? 0 : x.numel() / x.size(0);
}

at::Tensor guidance_update(const at::Tensor& x, const at::Tensor& g, const at::Tensor& z,
                           const at::Tensor& noise_scale, const at::Tensor& w) {
  TORCH_CHECK(x.is_floating_point(), "guidance_update: x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(g.sizes() == x.sizes() && z.sizes() == x.sizes(), "guidance_update: x ", x.sizes(), ", g ",
              g.sizes(), " and z ", z.sizes(), " must have the same shape");
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type(),
              "guidance_update: x, g and z must share a dtype, got ", x.scalar_type(), ", ", g.scalar_type(),
              ", ", z.scalar_type());
  TORCH_CHECK(noise_scale.numel() == 1, "guidance_update: noise_scale must hold one value, got shape ",
              noise_scale.sizes());
  const int64_t row_length = row_length_of(x, "guidance_update");
  const int64_t rows = x.size(0);
  TORCH_CHECK(w.dim() <= 1 && (w.numel() == rows || w.numel() == 1),
              "guidance_update: w must be (B,) or hold one value, got shape ", w.sizes(), " for B = ", rows);

  const at::Tensor x_c = x.contiguous(), g_c = g.contiguous(), z_c = z.contiguous();
  at::Tensor out = at::empty_like(x_c, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(), "guidance_update", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<opmath_t>;
    const scalar_t* x_data = x_c.const_data_ptr<scalar_t>();
    const scalar_t* g_data = g_c.const_data_ptr<scalar_t>();
    const scalar_t* z_data = z_c.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const std::vector<opmath_t> x_rms = row_rms(x_data, rows, row_length);
    const std::vector<opmath_t> g_rms = row_rms(g_data, rows, row_length);
    const at::Tensor w_c = w.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous().view(-1);
    const opmath_t* w_data = w_c.const_data_ptr<opmath_t>();
    const Vec noise_v(noise_scale.item<opmath_t>());
    // float32's smallest normal, also for double inputs: the floor the reference uses.
    const opmath_t tiny = static_cast<opmath_t>(std::numeric_limits<float>::min());
    for_each_row_chunk(rows, row_length, [&](int64_t row, int64_t begin, int64_t end) {
      // g / max(rms(g), tiny) is bounded by sqrt(row_length) and exactly 0 where g is 0, so an
      // all-zero g contributes 0 even when rms(x) * w / tiny would overflow.
      const Vec inv_g_rms(opmath_t(1) / std::max(g_rms[row], tiny));
      const Vec step(x_rms[row] * w_data[w_c.numel() == 1 ? 0 : row]);
      const int64_t offset = row * row_length + begin;
      at::vec::map3(
          [&](Vec xv, Vec gv, Vec zv) { return xv + noise_v * zv + (gv * inv_g_rms) * step; },
          out_data + offset, x_data + offset, g_data + offset, z_data + offset, end - begin);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> classifier_input(const at::Tensor& x) {
  TORCH_CHECK(x.is_floating_point(), "classifier_input: x must be a floating tensor, got ", x.scalar_type());
  const int64_t row_length = row_length_of(x, "classifier_input");
  const int64_t rows = x.size(0);
  const at::Tensor x_c = x.contiguous();
  at::Tensor xc = at::empty_like(x_c, at::MemoryFormat::Contiguous);
  at::Tensor rms = at::empty({rows}, x_c.options().dtype(at::toOpMathType(x_c.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(), "classifier_input", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<opmath_t>;
    const scalar_t* x_data = x_c.const_data_ptr<scalar_t>();
    scalar_t* xc_data = xc.mutable_data_ptr<scalar_t>();
    const std::vector<opmath_t> x_rms = row_rms(x_data, rows, row_length);
    std::copy(x_rms.begin(), x_rms.end(), rms.mutable_data_ptr<opmath_t>());
    for_each_row_chunk(rows, row_length, [&](int64_t row, int64_t begin, int64_t end) {
      // Divide rather than multiply by 1 / r: the reference divides, and so does SPEC §4.
      const Vec divisor(x_rms[row] > opmath_t(1) ? x_rms[row] : opmath_t(1));
      const int64_t offset = row * row_length + begin;
      at::vec::map([&](Vec v) { return v / divisor; }, xc_data + offset, x_data + offset, end - begin);
    });
  });
  return {xc, rms};
}

}  // namespace
}  // namespace elucd

TORCH_LIBRARY(elucd, m) {
  m.def("softplus_forward(Tensor x, float beta, float threshold) -> Tensor");
  m.def("softplus_backward(Tensor grad, Tensor x, float beta, float threshold) -> Tensor");
  m.def("guidance_update(Tensor x, Tensor g, Tensor z, Tensor noise_scale, Tensor w) -> Tensor");
  m.def("classifier_input(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(elucd, CPU, m) {
  m.impl("softplus_forward", &elucd::softplus_forward);
  m.impl("softplus_backward", &elucd::softplus_backward);
  m.impl("guidance_update", &elucd::guidance_update);
  m.impl("classifier_input", &elucd::classifier_input);
}
