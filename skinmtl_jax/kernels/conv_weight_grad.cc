// The kernel gradient of a stride-1 2-D convolution (NHWC input, HWIO kernel) on the CPU, as
// one GEMM per kernel tap over the whole batch, reading the activations in place.
//
// XLA:CPU writes this gradient as a convolution whose window is the whole feature map, which
// runs at a few GFLOP/s and costs up to 9x the forward (benchmarks/RESULTS.md). Here the
// padded input x (N, Hp, Wp, C) and the output gradient laid on the same grid, g (N, Hp, Wp, O)
// with zeros outside the valid outputs, are both read as row-major matrices with N*Hp*Wp rows.
// Output pixel r of the grid reads input row r + dy*Wp + dx for tap (dy, dx), so that tap's
// gradient is x[off : off + K]^T @ g[0 : K], a (C x K) @ (K x O) GEMM on contiguous memory:
// no shifted copies. The rows past K are zeros of g (they are the grid's last kh-1 rows and
// kw-1 columns), so dropping them changes nothing.
//
// The K rows are cut into a number of chunks that depends on K only, each chunk's nine (kh*kw)
// products go to a separate buffer, and the chunks are summed in order: the result does not
// depend on how many threads ran (`threads`, an attribute set by the caller). Each GEMM is
// single-threaded (the caller sets OpenBLAS to one thread); the (chunk, tap) products are
// spread over the threads. The BLAS is scipy-openblas32's (a runtime dependency): the loader
// hands its `scipy_cblas_sgemm` to `SkinmtlSetSgemm` before the first call, so no other copy
// of OpenBLAS in the process (numpy's, scipy's) can stand in for it.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = decltype(&scipy_cblas_sgemm);
std::atomic<Sgemm> sgemm{nullptr};

constexpr int64_t kMaxChunks = 8;
constexpr int64_t kMinChunkRows = 4096;
constexpr int64_t kBlockBytes = 256 << 10;  // rows of x and g per block: about half an L2
constexpr int64_t kMinBlockRows = 64;

ffi::Error ConvWeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t threads) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  const auto wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || gd[0] != xd[0] ||
      gd[1] != xd[1] || gd[2] != xd[2] || wd[2] != xd[3] || wd[3] != gd[3] ||
      wd[0] > xd[1] || wd[1] > xd[2]) {
    return ffi::Error::InvalidArgument(
        "skinmtl_conv_weight_grad: expected x (N, Hp, Wp, C), g (N, Hp, Wp, O) and a result "
        "(kh, kw, C, O) with kh <= Hp and kw <= Wp");
  }
  const Sgemm gemm = sgemm.load();
  if (gemm == nullptr) {
    return ffi::Error::Internal("skinmtl_conv_weight_grad: SkinmtlSetSgemm was not called");
  }
  const int64_t wp = xd[2], cin = xd[3], cout = gd[3], kh = wd[0], kw = wd[1];
  const int64_t rows = xd[0] * xd[1] * wp;
  const int64_t k = rows - ((kh - 1) * wp + (kw - 1));
  const int64_t taps = kh * kw, tap_size = cin * cout;
  const int64_t chunks = std::clamp<int64_t>(k / kMinChunkRows, 1, kMaxChunks);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  float* out = dw->typed_data();
  if (k <= 0 || cin == 0 || cout == 0) {  // an empty batch: nothing to sum
    std::fill(out, out + taps * tap_size, 0.0f);
    return ffi::Error::Success();
  }

  // Chunk 0 accumulates straight into the result; the others into `parts`. A work item is one
  // chunk and a group of its taps; it walks the chunk in blocks of rows small enough to stay in
  // cache across the group's taps, adding each block's product to the tap's sum. Every
  // (chunk, tap) sum has its own destination and adds its blocks in the same order, so which
  // thread takes which item, and how taps are grouped, does not change the result.
  std::vector<float> parts((chunks - 1) * taps * tap_size);
  const int64_t block = std::max<int64_t>(kMinBlockRows, kBlockBytes / (4 * (cin + cout)));
  const int64_t groups = std::clamp<int64_t>((threads + chunks - 1) / chunks, 1, taps);
  const int64_t items = chunks * groups;
  std::atomic<int64_t> next{0};
#if defined(__SSE__)
  // Denormals flushed to zero (FTZ) and read as zero (DAZ) in every thread that computes, as
  // XLA's own CPU code does, whichever thread XLA ran the call on.
  const unsigned int caller_csr = _mm_getcsr();
  const unsigned int csr = caller_csr | 0x8040;  // FTZ | DAZ
#endif
  auto run = [&] {
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
    for (int64_t i; (i = next.fetch_add(1)) < items;) {
      const int64_t c = i / groups, group = i % groups;
      const int64_t lo = k * c / chunks, hi = k * (c + 1) / chunks;
      const int64_t t0 = taps * group / groups, t1 = taps * (group + 1) / groups;
      float* dst = c == 0 ? out : parts.data() + (c - 1) * taps * tap_size;
      for (int64_t b = lo; b < hi; b += block) {
        const int64_t n = std::min(block, hi - b);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t off = (t / kw) * wp + (t % kw);
          gemm(CblasRowMajor, CblasTrans, CblasNoTrans, cin, cout, n, 1.0f,
               xp + (off + b) * cin, cin, gp + b * cout, cout, b == lo ? 0.0f : 1.0f,
               dst + t * tap_size, cout);
        }
      }
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int64_t j = 1; j < std::min(threads, items); ++j) pool.emplace_back(run);
  } catch (const std::system_error&) {
    // Fewer threads than asked for: the ones running take the remaining items.
  }
  run();
  for (auto& th : pool) th.join();
#if defined(__SSE__)
  _mm_setcsr(caller_csr);
#endif
  for (int64_t c = 1; c < chunks; ++c) {
    const float* p = parts.data() + (c - 1) * taps * tap_size;
    for (int64_t j = 0; j < taps * tap_size; ++j) out[j] += p[j];
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" void SkinmtlSetSgemm(void* fn) { sgemm.store(reinterpret_cast<Sgemm>(fn)); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkinmtlConvWeightGrad, ConvWeightGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x, padded
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g, on x's grid
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw (kh, kw, C, O)
                                  .Attr<int64_t>("threads"));
