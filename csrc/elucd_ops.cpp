// Fused CPU kernels of the guidance hot path, registered as the torch.library ops `elucd::*`.
//
// Each op equals a plain PyTorch twin (elucd_fast/guidance/update.py) and moves fewer bytes:
//
//   guidance_update        out_b = x_b + noise_scale * z_b + (g_b / max(rms(g_b), tiny)) * rms(x_b) * w_b
//                          a reduction pass over x and g, then one pass reading x, g, z, writing out.
//   classifier_input       r_b = rms(x_b); xc_b = x_b / r_b if r_b > 1 else x_b
//                          a reduction pass over x, then one pass reading x, writing xc.
//   ddpm_guided_mean       out_b = mean_b + s * (Sigma_b + max(sine * gamma * vmax_b, 0)) * g_b
//                          one pass reading mean, Sigma and g, writing out.
//   dit_guided_difference  out_b = d_b - (g_b / max(rms(g_b), tiny)) * (gamma * rms(d_b)), and rms(g_b)
//                          guidance_update's two passes with w = -gamma and no noise; g may be a
//                          channel slice (rows one stride apart).
//
// Arithmetic runs in at::opmath_type: float for float/half/bfloat16 inputs, double for double.
// The loops use at::vec::Vectorized, compiled for the instruction set PyTorch itself dispatches
// to on this machine (the loader passes CPU_CAPABILITY and the matching -m flags).
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

// Row reductions split each row into chunks of this many elements (64 KiB of float32), so that
// a batch of a few large images still spreads over all threads; a 3x64x64 sample is one chunk.
constexpr int64_t kRowChunk = 16384;

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

// rms of each row, in opmath precision; row r starts at data + r * row_stride. Chunks write
// partial sums of squares, then each row adds its partials in a fixed order: the result does not
// depend on the number of threads.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> row_rms(const scalar_t* data, int64_t rows, int64_t row_length,
                                               int64_t row_stride) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const int64_t chunks_per_row = std::max<int64_t>(1, (row_length + kRowChunk - 1) / kRowChunk);
  std::vector<opmath_t> partial(rows * chunks_per_row, opmath_t(0));
  for_each_row_chunk(rows, row_length, [&](int64_t row, int64_t begin, int64_t end) {
    if (end > begin) {
      partial[row * chunks_per_row + begin / kRowChunk] = at::vec::map_reduce_all(
          [](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; }, data + row * row_stride + begin,
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

// x as (B, N) rows with unit stride inside each row: a view where the layout allows it (a channel
// slice keeps its row stride), else a contiguous copy.
at::Tensor unit_stride_rows(const at::Tensor& x, int64_t row_length) {
  const at::Tensor rows = x.reshape({x.size(0), row_length});
  return rows.stride(1) == 1 || row_length <= 1 ? rows : rows.contiguous();
}

// The update guidance_update and dit_guided_difference share, per row b of x:
//   out_b = x_b [+ noise * z_b] + (g_b / max(rms(g_b), tiny)) * (rms(x_b) * w_sign * w_b)
// and rms(g_b). g / max(rms(g), tiny) is bounded by sqrt(row_length) and exactly 0 where g is 0,
// so an all-zero g contributes 0 even when rms(x) * w / tiny would overflow.
template <typename scalar_t>
void normalised_update(const at::Tensor& x_c, const at::Tensor& g_rows, const at::Tensor* z_c, double noise,
                       const at::Tensor& w, double w_sign, at::Tensor& out, at::Tensor& g_rms_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const int64_t rows = x_c.size(0);
  const int64_t row_length = rows == 0 ? 0 : x_c.numel() / rows;
  const int64_t g_stride = g_rows.stride(0);
  const scalar_t* x_data = x_c.const_data_ptr<scalar_t>();
  const scalar_t* g_data = g_rows.const_data_ptr<scalar_t>();
  const scalar_t* z_data = z_c != nullptr ? z_c->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const std::vector<opmath_t> x_rms = row_rms(x_data, rows, row_length, row_length);
  const std::vector<opmath_t> g_rms = row_rms(g_data, rows, row_length, g_stride);
  std::copy(g_rms.begin(), g_rms.end(), g_rms_out.mutable_data_ptr<opmath_t>());
  const at::Tensor w_c = w.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous().view(-1);
  const opmath_t* w_data = w_c.const_data_ptr<opmath_t>();
  const Vec noise_v(static_cast<opmath_t>(noise));
  // float32's smallest normal, also for double inputs: the floor the reference uses.
  const opmath_t tiny = static_cast<opmath_t>(std::numeric_limits<float>::min());
  for_each_row_chunk(rows, row_length, [&](int64_t row, int64_t begin, int64_t end) {
    const Vec inv_g_rms(opmath_t(1) / std::max(g_rms[row], tiny));
    const Vec step(x_rms[row] * (w_data[w_c.numel() == 1 ? 0 : row] * static_cast<opmath_t>(w_sign)));
    const int64_t offset = row * row_length + begin;
    const scalar_t* g_row = g_data + row * g_stride + begin;
    if (z_data != nullptr) {
      at::vec::map3([&](Vec xv, Vec gv, Vec zv) { return xv + noise_v * zv + (gv * inv_g_rms) * step; },
                    out_data + offset, x_data + offset, g_row, z_data + offset, end - begin);
    } else {
      at::vec::map2([&](Vec xv, Vec gv) { return xv + (gv * inv_g_rms) * step; }, out_data + offset,
                    x_data + offset, g_row, end - begin);
    }
  });
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
  const at::Tensor x_c = x.contiguous(), z_c = z.contiguous();
  at::Tensor out = at::empty_like(x_c, at::MemoryFormat::Contiguous);
  at::Tensor g_rms = at::empty({rows}, x_c.options().dtype(at::toOpMathType(x_c.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(), "guidance_update", [&] {
    normalised_update<scalar_t>(x_c, unit_stride_rows(g, row_length), &z_c, noise_scale.item<double>(), w, 1.0,
                                out, g_rms);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dit_guided_difference(const at::Tensor& difference, const at::Tensor& g,
                                                         const at::Tensor& gamma) {
  TORCH_CHECK(difference.is_floating_point(), "dit_guided_difference: difference must be a floating tensor, got ",
              difference.scalar_type());
  TORCH_CHECK(g.sizes() == difference.sizes(), "dit_guided_difference: difference ", difference.sizes(), " and g ",
              g.sizes(), " must have the same shape");
  TORCH_CHECK(g.scalar_type() == difference.scalar_type(), "dit_guided_difference: difference and g must share a "
              "dtype, got ", difference.scalar_type(), " and ", g.scalar_type());
  TORCH_CHECK(gamma.numel() == 1, "dit_guided_difference: gamma must hold one value, got shape ", gamma.sizes());
  const int64_t row_length = row_length_of(difference, "dit_guided_difference");
  const at::Tensor d_c = difference.contiguous();
  at::Tensor out = at::empty_like(d_c, at::MemoryFormat::Contiguous);
  at::Tensor g_rms = at::empty({d_c.size(0)}, d_c.options().dtype(at::toOpMathType(d_c.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d_c.scalar_type(), "dit_guided_difference", [&] {
    normalised_update<scalar_t>(d_c, unit_stride_rows(g, row_length), nullptr, 0.0, gamma, -1.0, out, g_rms);
  });
  return {out, g_rms};
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
    const std::vector<opmath_t> x_rms = row_rms(x_data, rows, row_length, row_length);
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

at::Tensor ddpm_guided_mean(const at::Tensor& mean, const at::Tensor& variance, const at::Tensor& g,
                            const at::Tensor& vmax, const at::Tensor& sine, double classifier_scale,
                            double gamma_factor) {
  TORCH_CHECK(mean.is_floating_point(), "ddpm_guided_mean: mean must be a floating tensor, got ", mean.scalar_type());
  TORCH_CHECK(variance.sizes() == mean.sizes() && g.sizes() == mean.sizes(), "ddpm_guided_mean: mean ",
              mean.sizes(), ", variance ", variance.sizes(), " and g ", g.sizes(), " must have the same shape");
  TORCH_CHECK(variance.scalar_type() == mean.scalar_type() && g.scalar_type() == mean.scalar_type(),
              "ddpm_guided_mean: mean, variance and g must share a dtype, got ", mean.scalar_type(), ", ",
              variance.scalar_type(), ", ", g.scalar_type());
  const int64_t row_length = row_length_of(mean, "ddpm_guided_mean");
  const int64_t rows = mean.size(0);
  TORCH_CHECK(vmax.dim() == 1 && vmax.numel() == rows, "ddpm_guided_mean: vmax must be (B,) for B = ", rows,
              ", got shape ", vmax.sizes());
  TORCH_CHECK(sine.numel() == 1, "ddpm_guided_mean: sine must hold one value, got shape ", sine.sizes());
  const at::Tensor mean_c = mean.contiguous(), variance_c = variance.contiguous(), g_c = g.contiguous();
  at::Tensor out = at::empty_like(mean_c, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean_c.scalar_type(), "ddpm_guided_mean", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<opmath_t>;
    const scalar_t* mean_data = mean_c.const_data_ptr<scalar_t>();
    const scalar_t* variance_data = variance_c.const_data_ptr<scalar_t>();
    const scalar_t* g_data = g_c.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const at::Tensor vmax_c = vmax.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
    const opmath_t* vmax_data = vmax_c.const_data_ptr<opmath_t>();
    // The reference's order: (sine * gamma) * vmax, clamped at 0; then (s * (Sigma + a)) * g.
    const opmath_t sine_gamma = sine.item<opmath_t>() * static_cast<opmath_t>(gamma_factor);
    const Vec scale(static_cast<opmath_t>(classifier_scale));
    for_each_row_chunk(rows, row_length, [&](int64_t row, int64_t begin, int64_t end) {
      const Vec sine_add(std::max(sine_gamma * vmax_data[row], opmath_t(0)));
      const int64_t offset = row * row_length + begin;
      at::vec::map3([&](Vec mv, Vec vv, Vec gv) { return mv + (scale * (vv + sine_add)) * gv; }, out_data + offset,
                    mean_data + offset, variance_data + offset, g_data + offset, end - begin);
    });
  });
  return out;
}

}  // namespace
}  // namespace elucd

TORCH_LIBRARY(elucd, m) {
  m.def("guidance_update(Tensor x, Tensor g, Tensor z, Tensor noise_scale, Tensor w) -> Tensor");
  m.def("classifier_input(Tensor x) -> (Tensor, Tensor)");
  m.def("ddpm_guided_mean(Tensor mean, Tensor variance, Tensor g, Tensor vmax, Tensor sine, float classifier_scale, "
        "float gamma_factor) -> Tensor");
  m.def("dit_guided_difference(Tensor difference, Tensor g, Tensor gamma) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(elucd, CPU, m) {
  m.impl("guidance_update", &elucd::guidance_update);
  m.impl("classifier_input", &elucd::classifier_input);
  m.impl("ddpm_guided_mean", &elucd::ddpm_guided_mean);
  m.impl("dit_guided_difference", &elucd::dit_guided_difference);
}
