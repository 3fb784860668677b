// A 2-D convolution and its two gradients on the CPU (NHWC input, HWIO kernel, float32), as
// GEMMs over blocks of output pixels whose windows are gathered in cache (im2col), and the 3x3
// stride-1 convolution and its kernel gradient by Winograd's minimal filtering.
//
// XLA:CPU computes the kernel gradient as a convolution whose window is the whole feature map,
// which runs far below the GEMM's rate and costs several forwards; its forward and input gradient
// (YNNPACK) run near the GEMM's rate where the window holds many channels, but well below it
// on the RGB layer, on narrow layers and on strided ones (benchmarks/RESULTS.md). Here:
// - im2col: every output pixel's window, kh x kw taps of C channels each, is copied into one
//   row of a block matrix `col`, zeros where the window leaves the input (padding, of any
//   sign, costs no copy of the input). The forward is y[block] = col @ w, w read as a
//   (kh*kw*C x O) matrix, written straight into y; the input gradient is col = g[block] @ w^T,
//   added back where the windows lie (col2im); the kernel gradient is dw += col^T @ g[block].
// - Winograd F(2x2, 3x3) for the 3x3 stride-1 forward, F(3x3, 2x2) (its adjoint) for the
//   kernel gradient: 16 GEMMs per block of 2x2 output tiles, 2.25x fewer multiplications.
// - bfloat16 on AMX (the last section): the direct convolution of bfloat16 operands on the
//   tile unit of CPUs with AMX-BF16, accumulated in float32; no BLAS.
//
// Results do not depend on the thread count, on any OpenBLAS core type: blocks, chunks and
// the GEMMs' shapes are set by the shapes only, each block's GEMMs write their own part of the
// result, and sums that span blocks are taken in a fixed order. Each GEMM is single-threaded
// (the loader sets OpenBLAS to one thread); the blocks are spread over up to `threads` threads
// (an attribute set by the caller), fewer while other calls' threads run (ParallelFor). The
// BLAS is scipy-openblas32's (a runtime dependency): the loader hands its `scipy_cblas_sgemm`
// to `SkinmtlSetSgemm` before the first call, so no other copy of OpenBLAS in the process
// (numpy's, scipy's) can stand in for it.
//
// The im2col kernels take attributes sh, sw (strides, >= 1), pt, pl (leading padding of the
// input, top and left, any sign; the trailing padding follows from the shapes) and threads;
// the Winograd ones pt, pl and threads. Every call's shapes and attributes are checked before
// it touches a buffer (Call::Check), and what a kernel throws (std::bad_alloc) becomes an FFI
// error naming the kernel and the shapes (Call::Run).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = decltype(&scipy_cblas_sgemm);
std::atomic<Sgemm> sgemm{nullptr};

// Rows of col per block (forward, input gradient): at least 256 rows, so that each GEMM is
// long enough to run near the BLAS's peak, else about 512 KB (a quarter of an L2).
constexpr int64_t kBlockBytes = 512 << 10;
constexpr int64_t kMinBlockRows = 256;
// Kernel gradient: blocks of col and g of about 256 KB, summed into one of up to 8 chunks of
// at least 4096 pixels each.
constexpr int64_t kGradBlockBytes = 256 << 10;
constexpr int64_t kMaxChunks = 8;
constexpr int64_t kMinChunkRows = 4096;
// Winograd forward: tiles per block such that the transformed tiles of one block (16 x tiles x
// channels) take about 128 KB, but at least 64 tiles (benchmarks/RESULTS.md: smaller blocks
// are faster at batch 1, larger ones for wide layers).
constexpr int64_t kWinogradBlockBytes = 128 << 10;
// Work items a Winograd forward and a kernel gradient aim at, at least, splitting output
// channels (Winograd) or taps (kernel gradient) when the shapes give fewer (a core count the
// shapes do not know: enough for the small machines). A split by the thread count would change
// the GEMMs' shapes, and OpenBLAS rounds differently for different shapes on some core types.
constexpr int64_t kMinItems = 4;

// The largest extent (a dimension, a stride, a padding), element count (of an operand or of a
// window, kh*kw*C) and thread count a call may have: every index the kernels compute then fits
// an int64_t with room to spare.
constexpr int64_t kMaxExtent = int64_t{1} << 31;
constexpr int64_t kMaxElements = int64_t{1} << 40;
constexpr int64_t kMaxThreads = 4096;

int64_t BlockRows(int64_t rows, int64_t row_floats, int64_t bytes, int64_t min_rows) {
  return std::min(rows, std::max(min_rows, bytes / (4 * row_floats) / 16 * 16));
}

// Worker threads that calls of the kernels are running now, in all calls together: a call
// starts at most threads - 1 of its own while fewer than threads - 1 run (XLA may run
// independent calls at once, each from a thread of its own).
std::atomic<int64_t> running_workers{0};

int64_t ReserveWorkers(int64_t wanted, int64_t cap) {
  int64_t now = running_workers.load();
  for (;;) {
    const int64_t take = std::clamp<int64_t>(cap - now, 0, wanted);
    if (take == 0 || running_workers.compare_exchange_weak(now, now + take)) return take;
  }
}

// Runs `body(item)` for items 0..items-1 on up to `threads` threads, the caller's among them.
// Which thread takes which item is not fixed: every item writes its own part of the result.
// Denormals are flushed to zero (FTZ) and read as zero (DAZ) in each, as in XLA's own CPU code,
// whichever thread XLA made the call on. An exception in any thread (std::bad_alloc from a
// buffer) stops the others taking items and is rethrown in the caller's, after the join.
template <typename Body>
void ParallelFor(int64_t items, int64_t threads, Body body) {
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
#if defined(__SSE__)
  const unsigned int caller_csr = _mm_getcsr();
  const unsigned int csr = caller_csr | 0x8040;  // FTZ | DAZ
#endif
  auto run = [&] {
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
    try {
      for (int64_t i; !failed.load(std::memory_order_relaxed) && (i = next.fetch_add(1)) < items;) {
        body(i);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed = true;
    }
  };
  const int64_t workers =
      ReserveWorkers(std::max<int64_t>(0, std::min(threads, items) - 1), threads - 1);
  std::vector<std::thread> pool;
  try {
    pool.reserve(workers);
    for (int64_t j = 0; j < workers; ++j) pool.emplace_back(run);
  } catch (...) {
    // Fewer threads than asked for (std::system_error, std::bad_alloc): the ones running take
    // the remaining items.
  }
  running_workers -= workers - static_cast<int64_t>(pool.size());
  run();
  for (auto& th : pool) th.join();
  running_workers -= static_cast<int64_t>(pool.size());
#if defined(__SSE__)
  _mm_setcsr(caller_csr);
#endif
  if (error) std::rethrow_exception(error);
}

struct Geometry {
  int64_t n, h, w, c;      // input
  int64_t ho, wo, o;       // output
  int64_t kh, kw;          // kernel
  int64_t sh, sw, pt, pl;  // strides, leading padding
  int64_t taps() const { return kh * kw; }
  int64_t window() const { return kh * kw * c; }
  int64_t pixels() const { return ho * wo; }
};

bool AmxReady();  // below, with the bfloat16 kernels

// What a kernel runs on: OpenBLAS's sgemm (handed over by the loader) or AMX.
enum class Needs { kSgemm, kAmx };

std::string Dims(ffi::Span<const int64_t> s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

// The product of `s` (0 where a factor is), or -1 where it exceeds kMaxElements.
int64_t Elements(std::initializer_list<int64_t> s) {
  for (int64_t v : s) {
    if (v == 0) return 0;
  }
  int64_t n = 1;
  for (int64_t v : s) {
    if (v < 0 || __builtin_mul_overflow(n, v, &n) || n > kMaxElements) return -1;
  }
  return n;
}

// One call of a kernel: the shapes of the convolution it computes (or whose gradient it
// computes) and its attributes. `Run` checks them all before the kernel touches a buffer, and
// turns what the kernel throws into an FFI error naming the kernel and these shapes, where it
// would otherwise reach XLA's C interface and end the process (std::terminate).
struct Call {
  const char* name;
  ffi::Span<const int64_t> x, w, y;  // input (N, H, W, C), kernel (kh, kw, C, O), output
  int64_t sh, sw, pt, pl, threads;   // strides, leading padding, threads
  Needs needs = Needs::kSgemm;
  bool winograd = false;             // a 3x3 kernel, stride 1

  std::string Describe() const {
    return std::string(name) + " (input " + Dims(x) + ", kernel " + Dims(w) + ", output " +
           Dims(y) + ", strides (" + std::to_string(sh) + ", " + std::to_string(sw) +
           "), leading pads (" + std::to_string(pt) + ", " + std::to_string(pl) +
           "), threads " + std::to_string(threads) + ")";
  }

  ffi::Error Invalid(const std::string& why) const {
    return ffi::Error::InvalidArgument(Describe() + ": " + why);
  }

  // The ranks, the shapes against one another, the extents, the attributes, and that what the
  // kernel runs on is there. Any padding of either sign is valid: the trailing padding
  // follows from the output's size.
  ffi::Error Check() const {
    if (x.size() != 4 || w.size() != 4 || y.size() != 4) {
      return Invalid("expected an input (N, H, W, C), a kernel (kh, kw, C, O) and an output "
                     "(N, Ho, Wo, O)");
    }
    if (w[2] != x[3] || y[0] != x[0] || y[3] != w[3]) {
      return Invalid("the kernel's C is not the input's, or the output's N or O differ");
    }
    if (winograd && (w[0] != 3 || w[1] != 3)) return Invalid("expected a 3x3 kernel");
    for (auto s : {x, w, y}) {
      for (int64_t v : s) {
        if (v < 0 || v > kMaxExtent) return Invalid("a dimension outside [0, 2^31]");
      }
      if (Elements({s[0], s[1], s[2], s[3]}) < 0) return Invalid("more than 2^40 elements");
    }
    if (Elements({w[0], w[1], w[2]}) < 0) return Invalid("a window of more than 2^40 values");
    if (sh < 1 || sw < 1 || sh > kMaxExtent || sw > kMaxExtent) {
      return Invalid("strides outside [1, 2^31]");
    }
    if (pt < -kMaxExtent || pt > kMaxExtent || pl < -kMaxExtent || pl > kMaxExtent) {
      return Invalid("leading pads outside [-2^31, 2^31]");
    }
    if (threads < 1 || threads > kMaxThreads) return Invalid("threads outside [1, 4096]");
    if (needs == Needs::kSgemm && sgemm.load() == nullptr) {
      return ffi::Error::Internal(std::string(name) + ": SkinmtlSetSgemm was not called");
    }
    if (needs == Needs::kAmx && !AmxReady()) {
      return ffi::Error::Internal(std::string(name) + ": this CPU (or its kernel) offers no "
                                  "AMX-BF16; skinmtl_jax.kernels.amx_available() says so first");
    }
    return ffi::Error::Success();
  }

  // Checks, then body(geometry) -> ffi::Error, catching what it throws.
  template <typename Body>
  ffi::Error Run(Body body) const {
    try {
      if (auto e = Check(); e.failure()) return e;
      return body(Geometry{x[0], x[1], x[2], x[3], y[1], y[2], w[3], w[0], w[1], sh, sw, pt,
                           pl});
    } catch (const std::bad_alloc&) {
      return Failed(ffi::ErrorCode::kResourceExhausted, "out of memory");
    } catch (const std::exception& e) {
      return Failed(ffi::ErrorCode::kInternal, e.what());
    } catch (...) {
      return Failed(ffi::ErrorCode::kInternal, "an unknown exception");
    }
  }

  ffi::Error Failed(ffi::ErrorCode code, const char* what) const {
    try {
      return ffi::Error(code, Describe() + ": " + what);
    } catch (...) {  // no memory left for the message
      return ffi::Error(code, "out of memory");
    }
  }
};

// The C channels of pixel (r, s) of one image xi (h x w x C) into dst; zeros outside the image.
inline void CopyPixel(const float* xi, int64_t h, int64_t w, int64_t c, int64_t r, int64_t s,
                      float* dst) {
  if (r < 0 || r >= h || s < 0 || s >= w) {
    std::fill(dst, dst + c, 0.0f);
  } else {
    std::copy(xi + (r * w + s) * c, xi + (r * w + s + 1) * c, dst);
  }
}

// The windows of output pixels p0..p0+m-1 (numbered over N, Ho, Wo), taps t0..t1-1 only, into
// col (m x (t1-t0)*C), zeros where a window leaves the input.
void Im2col(const Geometry& d, const float* x, int64_t p0, int64_t m, int64_t t0, int64_t t1,
            float* col) {
  for (int64_t p = p0; p < p0 + m; ++p) {
    const int64_t img = p / d.pixels(), i = p % d.pixels() / d.wo, j = p % d.wo;
    const float* xi = x + img * d.h * d.w * d.c;
    for (int64_t t = t0; t < t1; ++t, col += d.c) {
      CopyPixel(xi, d.h, d.w, d.c, i * d.sh + t / d.kw - d.pt, j * d.sw + t % d.kw - d.pl, col);
    }
  }
}

// y = conv(x, w). Work items are blocks of one image's output pixels.
ffi::Error Conv2d(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                  int64_t pl, int64_t threads) {
  const Call call{"skinmtl_conv2d", x.dimensions(), w.dimensions(), y->dimensions(), sh, sw,
                  pt, pl, threads};
  return call.Run([&](const Geometry& d) -> ffi::Error {
    const int64_t k = d.window(), pixels = d.pixels();
    float* yp = y->typed_data();
    if (d.n * pixels * d.o == 0) return ffi::Error::Success();
    if (k == 0) {
      std::fill(yp, yp + d.n * pixels * d.o, 0.0f);
      return ffi::Error::Success();
    }
    const int64_t block = BlockRows(pixels, k, kBlockBytes, kMinBlockRows);
    const int64_t blocks = (pixels + block - 1) / block;
    const Sgemm gemm = sgemm.load();
    ParallelFor(d.n * blocks, threads, [&](int64_t item) {
      thread_local std::vector<float> col;
      col.resize(block * k);
      const int64_t p = (item / blocks) * pixels + (item % blocks) * block;
      const int64_t m = std::min(block, pixels - (item % blocks) * block);
      Im2col(d, x.typed_data(), p, m, 0, d.taps(), col.data());
      gemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, d.o, k, 1.0f, col.data(), k,
           w.typed_data(), d.o, 0.0f, yp + p * d.o, d.o);
    });
    return ffi::Error::Success();
  });
}

// dx from g (N, Ho, Wo, O). Where the windows of one image overlap, an image is one work item and
// adds its blocks in order.
ffi::Error Conv2dInputGrad(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pl, int64_t threads) {
  // The shapes of the convolution whose input gradient this is: (dx, w, g) as its (x, w, y).
  const Call call{"skinmtl_conv2d_input_grad", dx->dimensions(), w.dimensions(), g.dimensions(),
                  sh, sw, pt, pl, threads};
  return call.Run([&](const Geometry& d) -> ffi::Error {
    const int64_t k = d.window(), pixels = d.pixels();
    float* xp = dx->typed_data();
    std::fill(xp, xp + d.n * d.h * d.w * d.c, 0.0f);
    if (d.n * pixels * d.o == 0 || k == 0) return ffi::Error::Success();
    const int64_t block = BlockRows(pixels, k, kBlockBytes, kMinBlockRows);
    // Windows that do not overlap (kernel within the stride, as in a 2x2 stride-2 up-convolution)
    // write disjoint pixels: their blocks can run in parallel too.
    const bool disjoint = d.kh <= d.sh && d.kw <= d.sw;
    const int64_t per_item = disjoint ? block : pixels;
    const int64_t items = (pixels + per_item - 1) / per_item;
    const Sgemm gemm = sgemm.load();
    ParallelFor(d.n * items, threads, [&](int64_t item) {
      thread_local std::vector<float> col;
      col.resize(block * k);
      const int64_t img = item / items, first = (item % items) * per_item;
      float* xi = xp + img * d.h * d.w * d.c;
      for (int64_t p0 = first; p0 < std::min(pixels, first + per_item); p0 += block) {
        const int64_t m = std::min(block, pixels - p0);
        gemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, k, d.o, 1.0f,
             g.typed_data() + (img * pixels + p0) * d.o, d.o, w.typed_data(), d.o, 0.0f,
             col.data(), k);
        const float* src = col.data();
        for (int64_t p = p0; p < p0 + m; ++p) {
          const int64_t i = p / d.wo, j = p % d.wo;
          for (int64_t t = 0; t < d.taps(); ++t, src += d.c) {
            const int64_t r = i * d.sh + t / d.kw - d.pt, s = j * d.sw + t % d.kw - d.pl;
            if (r < 0 || r >= d.h || s < 0 || s >= d.w) continue;
            float* dst = xi + (r * d.w + s) * d.c;
            for (int64_t q = 0; q < d.c; ++q) dst[q] += src[q];
          }
        }
      }
    });
    return ffi::Error::Success();
  });
}

// dw from x and g. The batch's pixels are cut into chunks (their number set by the shapes);
// each chunk sums its blocks in order into its own buffer, and the chunks are added in order.
// A work item is a chunk and a group of taps (their number set by the shapes too): its columns
// of col, its rows of dw.
ffi::Error Conv2dWeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                            ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                            int64_t pt, int64_t pl, int64_t threads) {
  const Call call{"skinmtl_conv2d_weight_grad", x.dimensions(), dw->dimensions(),
                  g.dimensions(), sh, sw, pt, pl, threads};
  return call.Run([&](const Geometry& d) -> ffi::Error {
    const int64_t k = d.window(), total = d.n * d.pixels();
    float* out = dw->typed_data();
    if (total == 0 || k * d.o == 0) {
      std::fill(out, out + k * d.o, 0.0f);
      return ffi::Error::Success();
    }
    const int64_t chunks = std::clamp<int64_t>(total / kMinChunkRows, 1, kMaxChunks);
    const int64_t block = BlockRows(total, k + d.o, kGradBlockBytes, 16);
    const int64_t groups = std::clamp<int64_t>((kMinItems + chunks - 1) / chunks, 1, d.taps());
    std::vector<float> parts((chunks - 1) * k * d.o);
    const Sgemm gemm = sgemm.load();
    ParallelFor(chunks * groups, threads, [&](int64_t item) {
      thread_local std::vector<float> col;
      const int64_t ch = item / groups, group = item % groups;
      const int64_t lo = total * ch / chunks, hi = total * (ch + 1) / chunks;
      const int64_t t0 = d.taps() * group / groups, t1 = d.taps() * (group + 1) / groups;
      const int64_t kg = (t1 - t0) * d.c;
      col.resize(block * kg);
      float* dst = (ch == 0 ? out : parts.data() + (ch - 1) * k * d.o) + t0 * d.c * d.o;
      for (int64_t p = lo; p < hi; p += block) {
        const int64_t m = std::min(block, hi - p);
        Im2col(d, x.typed_data(), p, m, t0, t1, col.data());
        gemm(CblasRowMajor, CblasTrans, CblasNoTrans, kg, d.o, m, 1.0f, col.data(), kg,
             g.typed_data() + p * d.o, d.o, p == lo ? 0.0f : 1.0f, dst, d.o);
      }
    });
    for (int64_t ch = 1; ch < chunks; ++ch) {
      const float* q = parts.data() + (ch - 1) * k * d.o;
      for (int64_t j = 0; j < k * d.o; ++j) out[j] += q[j];
    }
    return ffi::Error::Success();
  });
}

// The transforms of one tile, over channels q (contiguous: vectorised, in clones for AVX-512,
// AVX2 and the baseline picked at load time). Input: v[e] = (B^T d B)[e] for the 16 pixels d[e]
// of a 4x4 input tile, v[e] at vt + e*stride.
#if defined(__x86_64__) && defined(__linux__)
#define SKINMTL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SKINMTL_CLONES
#endif

SKINMTL_CLONES void InputTile(const float* const* d, float* __restrict vt, int64_t stride,
                              int64_t c) {
  const float *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3], *d4 = d[4], *d5 = d[5];
  const float *d6 = d[6], *d7 = d[7], *d8 = d[8], *d9 = d[9], *d10 = d[10], *d11 = d[11];
  const float *d12 = d[12], *d13 = d[13], *d14 = d[14], *d15 = d[15];
  float* __restrict v[16];
  for (int e = 0; e < 16; ++e) v[e] = vt + e * stride;
#pragma GCC ivdep
  for (int64_t q = 0; q < c; ++q) {
    // B^T d (rows r0..r3 of 4), then (B^T d) B.
    const float r00 = d0[q] - d8[q], r01 = d1[q] - d9[q], r02 = d2[q] - d10[q],
                r03 = d3[q] - d11[q];
    const float r10 = d4[q] + d8[q], r11 = d5[q] + d9[q], r12 = d6[q] + d10[q],
                r13 = d7[q] + d11[q];
    const float r20 = d8[q] - d4[q], r21 = d9[q] - d5[q], r22 = d10[q] - d6[q],
                r23 = d11[q] - d7[q];
    const float r30 = d4[q] - d12[q], r31 = d5[q] - d13[q], r32 = d6[q] - d14[q],
                r33 = d7[q] - d15[q];
    v[0][q] = r00 - r02; v[1][q] = r01 + r02; v[2][q] = r02 - r01; v[3][q] = r01 - r03;
    v[4][q] = r10 - r12; v[5][q] = r11 + r12; v[6][q] = r12 - r11; v[7][q] = r11 - r13;
    v[8][q] = r20 - r22; v[9][q] = r21 + r22; v[10][q] = r22 - r21; v[11][q] = r21 - r23;
    v[12][q] = r30 - r32; v[13][q] = r31 + r32; v[14][q] = r32 - r31; v[15][q] = r31 - r33;
  }
}

// Output: the 2x2 pixels A^T m A from the 16 products m[e] at mt + e*stride; out[e] is null
// for a pixel past the output's edge.
SKINMTL_CLONES void OutputTile(const float* __restrict mt, int64_t stride, int64_t o,
                               float* const* out) {
  const float* m[16];
  for (int e = 0; e < 16; ++e) m[e] = mt + e * stride;
  float* __restrict y[4];
  float spare[4][64];
  for (int64_t q0 = 0; q0 < o; q0 += 64) {
    const int64_t n = std::min<int64_t>(64, o - q0);
    for (int e = 0; e < 4; ++e) y[e] = out[e] ? out[e] + q0 : spare[e];
#pragma GCC ivdep
    for (int64_t q = q0; q < q0 + n; ++q) {
      // A^T m (rows a0, a1 of 4), then (A^T m) A.
      const float a00 = m[0][q] + m[4][q] + m[8][q], a01 = m[1][q] + m[5][q] + m[9][q];
      const float a02 = m[2][q] + m[6][q] + m[10][q], a03 = m[3][q] + m[7][q] + m[11][q];
      const float a10 = m[4][q] - m[8][q] - m[12][q], a11 = m[5][q] - m[9][q] - m[13][q];
      const float a12 = m[6][q] - m[10][q] - m[14][q], a13 = m[7][q] - m[11][q] - m[15][q];
      y[0][q - q0] = a00 + a01 + a02;
      y[1][q - q0] = a01 - a02 - a03;
      y[2][q - q0] = a10 + a11 + a12;
      y[3][q - q0] = a11 - a12 - a13;
    }
  }
}

// The input transform of the 4x4 tile at (r0, s0) of one image xi (h x w x C) into vt (as
// InputTile), read in place, or for an edge tile through patch (16 x C) with zeros outside.
void WinogradInput(const float* xi, int64_t h, int64_t w, int64_t c, int64_t r0, int64_t s0,
                   float* patch, float* vt, int64_t stride) {
  const float* d[16];
  if (r0 >= 0 && r0 + 4 <= h && s0 >= 0 && s0 + 4 <= w) {
    for (int e = 0; e < 16; ++e) d[e] = xi + ((r0 + e / 4) * w + s0 + e % 4) * c;
  } else {
    for (int e = 0; e < 16; ++e) {
      CopyPixel(xi, h, w, c, r0 + e / 4, s0 + e % 4, patch + e * c);
      d[e] = patch + e * c;
    }
  }
  InputTile(d, vt, stride, c);
}

// The kernel transform u = G w G^T for input channel c: w[t] at w + t*step (taps t of the 3x3
// kernel, O values each), u[e] at u + e*step.
SKINMTL_CLONES void KernelTransform(const float* w, float* __restrict u, int64_t step,
                                    int64_t o) {
  const float* g[9];
  for (int t = 0; t < 9; ++t) g[t] = w + t * step;
  float* __restrict v[16];
  for (int e = 0; e < 16; ++e) v[e] = u + e * step;
#pragma GCC ivdep
  for (int64_t q = 0; q < o; ++q) {
    float t[4][3];  // G g: rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2
    for (int j = 0; j < 3; ++j) {
      const float a = g[j][q], b = g[3 + j][q], c = g[6 + j][q];
      t[0][j] = a;
      t[1][j] = 0.5f * (a + b + c);
      t[2][j] = 0.5f * (a - b + c);
      t[3][j] = c;
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      v[4 * i][q] = t[i][0];
      v[4 * i + 1][q] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
      v[4 * i + 2][q] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
      v[4 * i + 3][q] = t[i][2];
    }
  }
}

// A 3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray,
// 2016): each 2x2 tile of the output comes from a 4x4 tile of the input, d, as
// A^T [(G w G^T) . (B^T d B)] A. The kernel is transformed first, u = G w G^T (16, C, O); per
// block of tiles the input tiles are transformed (16 x tiles x C), multiplied by u (16 GEMMs
// of (tiles x C) @ (C x O)) and transformed back into y. 16 products per 4 outputs instead of 36:
// 2.25x fewer multiplications than the direct convolution.
ffi::Error Winograd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y, int64_t pt, int64_t pl, int64_t threads) {
  const auto xd = x.dimensions();
  const auto ud = w.dimensions();
  const auto yd = y->dimensions();
  const Call call{"skinmtl_winograd", xd, ud, yd, 1, 1, pt, pl, threads, Needs::kSgemm, true};
  return call.Run([&](const Geometry&) -> ffi::Error {
    const int64_t n = xd[0], h = xd[1], wi = xd[2], c = xd[3], o = ud[3], ho = yd[1], wo = yd[2];
    const int64_t tw = (wo + 1) / 2, tiles = ((ho + 1) / 2) * tw;
    float* yp = y->typed_data();
    if (n * ho * wo * o == 0) return ffi::Error::Success();
    if (c == 0) {
      std::fill(yp, yp + n * ho * wo * o, 0.0f);
      return ffi::Error::Success();
    }
    const int64_t block = BlockRows(tiles, 16 * std::max(c, o), kWinogradBlockBytes, 64);
    const int64_t blocks = (tiles + block - 1) / block;
    const Sgemm gemm = sgemm.load();
    const float* xp = x.typed_data();
    std::vector<float> u(16 * c * o);
    const int64_t rows = std::max<int64_t>(1, 4096 / o);  // input channels per item
    ParallelFor((c + rows - 1) / rows, threads, [&](int64_t item) {
      for (int64_t q = item * rows; q < std::min(c, (item + 1) * rows); ++q) {
        KernelTransform(w.typed_data() + q * o, u.data() + q * o, c * o, o);
      }
    });
    const float* up = u.data();
    // Few blocks (one small image): the output channels are split into groups too, so that the
    // cores share the GEMMs; each group transforms the block's input again. The groups follow
    // from the shapes only, and a group's outputs are the same dot products either way.
    const int64_t groups = std::clamp<int64_t>((kMinItems + n * blocks - 1) / (n * blocks), 1,
                                               std::max<int64_t>(1, o / 32));
    ParallelFor(n * blocks * groups, threads, [&](int64_t job) {
      thread_local std::vector<float> v, m, patch;
      const int64_t item = job / groups, group = job % groups;
      const int64_t o0 = o * group / groups, ow = o * (group + 1) / groups - o0;
      v.resize(16 * block * c);
      m.resize(16 * block * ow);
      patch.resize(16 * c);
      const int64_t img = item / blocks, t0 = (item % blocks) * block;
      const int64_t count = std::min(block, tiles - t0);
      const float* xi = xp + img * h * wi * c;
      for (int64_t t = 0; t < count; ++t) {
        WinogradInput(xi, h, wi, c, (t0 + t) / tw * 2 - pt, (t0 + t) % tw * 2 - pl,
                      patch.data(), v.data() + t * c, block * c);
      }
      for (int e = 0; e < 16; ++e) {
        gemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, count, ow, c, 1.0f,
             v.data() + e * block * c, c, up + e * c * o + o0, o, 0.0f,
             m.data() + e * block * ow, ow);
      }
      float* yi = yp + img * ho * wo * o + o0;
      for (int64_t t = 0; t < count; ++t) {
        const int64_t r0 = (t0 + t) / tw * 2, s0 = (t0 + t) % tw * 2;
        const float* mt = m.data() + t * ow;
        float* out[4];
        for (int e = 0; e < 4; ++e) {
          const int64_t r = r0 + e / 2, s = s0 + e % 2;
          out[e] = (r < ho && s < wo) ? yi + (r * wo + s) * o : nullptr;
        }
        OutputTile(mt, block * ow, ow, out);
      }
    });
    return ffi::Error::Success();
  });
}

// The output-gradient transform of one 2x2 tile for the kernel gradient: m[e] = (A g A^T)[e]
// for the tile's pixels g[0..3] (null: past the output's edge, zero), m[e] at mt + e*stride.
SKINMTL_CLONES void GradTile(const float* const* g, float* __restrict mt, int64_t stride,
                             int64_t o, const float* zeros) {
  const float* g0 = g[0] ? g[0] : zeros;
  const float* g1 = g[1] ? g[1] : zeros;
  const float* g2 = g[2] ? g[2] : zeros;
  const float* g3 = g[3] ? g[3] : zeros;
  float* __restrict m[16];
  for (int e = 0; e < 16; ++e) m[e] = mt + e * stride;
#pragma GCC ivdep
  for (int64_t q = 0; q < o; ++q) {
    // A g: rows g_0, g_0 + g_1, g_0 - g_1, -g_1 (of two), then (A g) A^T likewise.
    const float r[4][2] = {{g0[q], g1[q]}, {g0[q] + g2[q], g1[q] + g3[q]},
                           {g0[q] - g2[q], g1[q] - g3[q]}, {-g2[q], -g3[q]}};
    for (int k = 0; k < 4; ++k) {
      m[4 * k][q] = r[k][0];
      m[4 * k + 1][q] = r[k][0] + r[k][1];
      m[4 * k + 2][q] = r[k][0] - r[k][1];
      m[4 * k + 3][q] = -r[k][1];
    }
  }
}

// dw (3x3 taps at w + t*step) = G^T z G for the 16 sums z[e] at z + e*step, over q < o.
SKINMTL_CLONES void KernelGradTransform(const float* z, float* __restrict w, int64_t step,
                                        int64_t o) {
#pragma GCC ivdep
  for (int64_t q = 0; q < o; ++q) {
    float s[3][4];  // G^T z: rows z0 + (z1 + z2) / 2, (z1 - z2) / 2, (z1 + z2) / 2 + z3
    for (int l = 0; l < 4; ++l) {
      const float z0 = z[l * step + q], z1 = z[(4 + l) * step + q];
      const float z2 = z[(8 + l) * step + q], z3 = z[(12 + l) * step + q];
      s[0][l] = z0 + 0.5f * (z1 + z2);
      s[1][l] = 0.5f * (z1 - z2);
      s[2][l] = 0.5f * (z1 + z2) + z3;
    }
    for (int a = 0; a < 3; ++a) {  // (G^T z) G
      w[(3 * a) * step + q] = s[a][0] + 0.5f * (s[a][1] + s[a][2]);
      w[(3 * a + 1) * step + q] = 0.5f * (s[a][1] - s[a][2]);
      w[(3 * a + 2) * step + q] = 0.5f * (s[a][1] + s[a][2]) + s[a][3];
    }
  }
}

// The kernel gradient of the 3x3 stride-1 convolution by Winograd's F(3x3, 2x2), the adjoint
// of the forward's F(2x2, 3x3): dw = G^T [sum over tiles (A g A^T) . (B^T d B)] G, with d an
// input tile (4x4 x C) and g its output-gradient tile (2x2 x O). The sum over tiles is 16
// GEMMs (C x tiles) @ (tiles x O) per block. As in Conv2dWeightGrad, the batch's tiles are cut
// into chunks by the shapes only, each summed in order into its own buffer, the chunks added
// in order: the result does not depend on the thread count.
ffi::Error WinogradWeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t pt, int64_t pl,
                              int64_t threads) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  const auto wd = dw->dimensions();
  const Call call{"skinmtl_winograd_weight_grad", xd, wd, gd, 1, 1, pt, pl, threads,
                  Needs::kSgemm, true};
  return call.Run([&](const Geometry&) -> ffi::Error {
    const int64_t h = xd[1], wi = xd[2], c = xd[3], ho = gd[1], wo = gd[2], o = gd[3];
    const int64_t tw = (wo + 1) / 2, per_image = ((ho + 1) / 2) * tw, total = xd[0] * per_image;
    float* out = dw->typed_data();
    if (total == 0 || c * o == 0) {
      std::fill(out, out + 9 * c * o, 0.0f);
      return ffi::Error::Success();
    }
    const int64_t chunks = std::clamp<int64_t>(total / (kMinChunkRows / 4), 1, kMaxChunks);
    const int64_t block = BlockRows(total, 16 * (c + o), 2 * kBlockBytes, 32);
    std::vector<float> z(chunks * 16 * c * o);
    const Sgemm gemm = sgemm.load();
    const float* xp = x.typed_data();
    const float* gp = g.typed_data();
    ParallelFor(chunks, threads, [&](int64_t ch) {
      thread_local std::vector<float> v, m, patch, zeros;
      v.resize(16 * block * c);
      m.resize(16 * block * o);
      patch.resize(16 * c);
      zeros.assign(o, 0.0f);
      const int64_t lo = total * ch / chunks, hi = total * (ch + 1) / chunks;
      float* zc = z.data() + ch * 16 * c * o;
      for (int64_t b0 = lo; b0 < hi; b0 += block) {
        const int64_t count = std::min(block, hi - b0);
        for (int64_t t = 0; t < count; ++t) {
          const int64_t img = (b0 + t) / per_image, tile = (b0 + t) % per_image;
          const int64_t i0 = tile / tw * 2, j0 = tile % tw * 2;
          const float* xi = xp + img * h * wi * c;
          WinogradInput(xi, h, wi, c, i0 - pt, j0 - pl, patch.data(), v.data() + t * c,
                        block * c);
          const float* gt[4];
          for (int e = 0; e < 4; ++e) {
            const int64_t r = i0 + e / 2, s = j0 + e % 2;
            gt[e] = (r < ho && s < wo) ? gp + ((img * ho + r) * wo + s) * o : nullptr;
          }
          GradTile(gt, m.data() + t * o, block * o, o, zeros.data());
        }
        for (int e = 0; e < 16; ++e) {
          gemm(CblasRowMajor, CblasTrans, CblasNoTrans, c, o, count, 1.0f,
               v.data() + e * block * c, c, m.data() + e * block * o, o, b0 == lo ? 0.0f : 1.0f,
               zc + e * c * o, o);
        }
      }
    });
    for (int64_t ch = 1; ch < chunks; ++ch) {
      const float* q = z.data() + ch * 16 * c * o;
      for (int64_t j = 0; j < 16 * c * o; ++j) z[j] += q[j];
    }
    for (int64_t q = 0; q < c; ++q) KernelGradTransform(z.data() + q * o, out + q * o, c * o, o);
    return ffi::Error::Success();
  });
}


// ---- bfloat16 convolutions on AMX ----
//
// y = conv(x, w) for bfloat16 x and w with float32 accumulation, on the tile unit of CPUs that
// have AMX-BF16 (Intel Xeon since Sapphire Rapids). One TDPBF16PS multiplies a 16 x 32 tile
// of inputs (16 pixels of a row, 32 channels) by a 32 x 16 tile of the kernel (32 channels,
// 16 outputs) into a 16 x 16 float32 accumulator: 8192 multiply-adds, 16x the float32 rate of
// AVX-512 per cycle. The convolution is computed directly (no im2col, no Winograd): for each
// tap (r, s) of the window, the 16 pixels' inputs are rows of the input at a fixed stride (s_w
// pixels apart), so a tile load reads them in place (through a staging copy with zeros where
// they leave the image, or where C is no multiple of 32). Products of two bfloat16 values are
// exact in float32, so the result is the float32 convolution of the same values up to the order
// of the sums. Work items are runs of pairs of 16-pixel tiles x pairs of 16-output blocks;
// each writes its own outputs, so the result does not depend on the thread count. The kernel
// gradient (stride 1) follows the forward.
// Bad shapes, and a call on a CPU without AMX, end in an FFI error naming the kernel; the
// build leaves these kernels out (SKINMTL_NO_AMX, old compilers, other platforms), and then
// kernels.amx_available() is False and nothing routes to them.
#if !defined(SKINMTL_NO_AMX) && defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define SKINMTL_AMX 1
#define SKINMTL_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

// Whether this CPU and the kernel let this process use AMX-BF16 (and AVX512-BF16 for the
// conversions): CPUID, then Linux's permission for the tile data (arch_prctl, once).
bool AmxReady() {
#ifdef SKINMTL_AMX
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx = (d >> 22 & 1) && (d >> 24 & 1);                       // AMX-BF16, -TILE
    const bool avx512 = (b >> 16 & 1) && (b >> 30 & 1) && (b >> 31 & 1);  // F, BW, VL
    if (!amx || !avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) {
      return false;  // AVX512-BF16: bit 5 of leaf 7.1 eax
    }
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

#ifdef SKINMTL_AMX
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: accumulators (2 pixel blocks x 2 output blocks), 4-5 inputs, 6-7 kernel; all
// 16 rows of 64 bytes. A constant in memory: the compiler does not see LDTILECFG read it, and
// dropped the stores into a local copy.
constexpr TileConfig MakeTileConfig() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}
alignas(64) constexpr TileConfig kTileConfig = MakeTileConfig();

SKINMTL_AMX_TARGET void ConfigureTiles() { _tile_loadconfig(&kTileConfig); }
SKINMTL_AMX_TARGET void ReleaseTiles() { _tile_release(); }

// 16 float32 values of acc into dst as float32 or bfloat16 (round to nearest even), the first
// `count` only.
SKINMTL_AMX_TARGET inline void StoreRow(const float* acc, float* dst, int64_t count) {
  _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << count) - 1), _mm512_loadu_ps(acc));
}
SKINMTL_AMX_TARGET inline void StoreRow(const float* acc, uint16_t* dst, int64_t count) {
  const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(acc));
  _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << count) - 1),
                           reinterpret_cast<__m256i>(v));
}

// The inputs of one 16-pixel tile (output row i, pixels 16m..16m+15 of it) for tap (r, s):
// where all 16 are inside the input and C is a multiple of 32, in place (stride sw pixels);
// else copied into stage (16 x cp, zeros outside the input). Returns null where the tap's
// input row lies outside the input (the tile is all zeros: its products are skipped).
struct ATile {
  const uint16_t* data;
  int64_t stride;  // bytes
};
inline ATile InputTile16(const uint16_t* xi, const Geometry& d, int64_t cp, int64_t i,
                         int64_t m, int64_t t, uint16_t* stage) {
  const int64_t ri = d.sh * i + t / d.kw - d.pt;
  if (ri < 0 || ri >= d.h) return {nullptr, 0};
  const int64_t c0 = d.sw * 16 * m + t % d.kw - d.pl, c15 = c0 + 15 * d.sw;
  const uint16_t* row = xi + ri * d.w * d.c;
  if (d.c == cp && c0 >= 0 && c15 < d.w) return {row + c0 * d.c, d.sw * d.c * 2};
  for (int64_t p = 0; p < 16; ++p, stage += cp) {
    const int64_t col = c0 + p * d.sw;
    if (col < 0 || col >= d.w) {
      std::fill(stage, stage + cp, uint16_t{0});
    } else {
      std::copy(row + col * d.c, row + (col + 1) * d.c, stage);
      std::fill(stage + d.c, stage + cp, uint16_t{0});
    }
  }
  return {stage - 16 * cp, cp * 2};
}

// One work item: output tiles u0, u0 + 1 (16 pixels each, numbered along the rows of image
// img; u0 + 1 if it exists) x output blocks nb, nb + 1 (16 outputs each, nb + 1 if it exists),
// summed over the taps and the channels in blocks of 32. wt is the packed kernel; y the output.
template <typename T>
SKINMTL_AMX_TARGET void AmxItem(const uint16_t* x, const uint16_t* wt, T* y, int64_t img,
                                int64_t u0, int64_t nb, const Geometry& d, int64_t cp,
                                int64_t nt, uint16_t* stage) {
  const int64_t kb = cp / 32, mt = (d.wo + 15) / 16;
  const bool n2 = nb + 1 < nt, m2 = u0 + 1 < d.ho * mt;
  const uint16_t* xi = x + img * d.h * d.w * d.c;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t t = 0; t < d.taps(); ++t) {
    const ATile a0 = InputTile16(xi, d, cp, u0 / mt, u0 % mt, t, stage);
    const ATile a1 = m2 ? InputTile16(xi, d, cp, (u0 + 1) / mt, (u0 + 1) % mt, t,
                                      stage + 16 * cp)
                        : ATile{nullptr, 0};
    if (!a0.data && !a1.data) continue;
    const uint16_t* b = wt + (t * kb * nt + nb) * 512;
    for (int64_t k = 0; k < kb; ++k, b += nt * 512) {
      _tile_loadd(6, b, 64);
      if (n2) _tile_loadd(7, b + 512, 64);
      if (a0.data) {
        _tile_loadd(4, a0.data + 32 * k, a0.stride);
        _tile_dpbf16ps(0, 4, 6);
        if (n2) _tile_dpbf16ps(1, 4, 7);
      }
      if (a1.data) {
        _tile_loadd(5, a1.data + 32 * k, a1.stride);
        _tile_dpbf16ps(2, 5, 6);
        if (n2) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  alignas(64) float acc[4][256];
  _tile_stored(0, acc[0], 64);
  _tile_stored(1, acc[1], 64);
  _tile_stored(2, acc[2], 64);
  _tile_stored(3, acc[3], 64);
  for (int q = 0; q < 4; ++q) {
    const int64_t u = u0 + q / 2, on = nb + q % 2;
    if ((q / 2 && !m2) || (q % 2 && !n2)) continue;
    const int64_t i = u / mt, j0 = 16 * (u % mt), count = std::min<int64_t>(16, d.o - 16 * on);
    for (int64_t p = 0; p < 16 && j0 + p < d.wo; ++p) {
      StoreRow(acc[q] + 16 * p, y + ((img * d.ho + i) * d.wo + j0 + p) * d.o + 16 * on, count);
    }
  }
}

// A bfloat16 value's bits: itself, or a float32 rounded to nearest even (XLA's conversion;
// NaNs stay NaNs). Branch-free, so that the loops below vectorise.
inline uint32_t Bf16Bits(uint16_t v) { return v; }
inline uint32_t Bf16Bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded;
}

// 16 pairs (s0[q], s1[q]) as bfloat16 into dst (32 values), the layout of a kernel tile's row.
template <typename W>
SKINMTL_CLONES void PackPairs(const W* __restrict s0, const W* __restrict s1,
                              uint16_t* __restrict dst) {
  uint32_t pairs[16];
  for (int q = 0; q < 16; ++q) pairs[q] = Bf16Bits(s0[q]) | Bf16Bits(s1[q]) << 16;
  std::memcpy(dst, pairs, sizeof pairs);  // little-endian: s0[q] first
}

// Packs the kernel's tap t, channels 32k..32k+31, into nt tiles (one per 16 outputs) of 16
// rows x 32 values: row r holds channels 32k + 2r and 32k + 2r + 1 of each output, interleaved
// (the layout TDPBF16PS reads); zeros past C and O. W: the kernel's bfloat16 bits, or float32
// values (rounded here, as XLA's conversion would).
template <typename W>
void PackKernel(const W* w, const Geometry& d, int64_t t, int64_t k, int64_t nt,
                uint16_t* tiles) {
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t ch = 32 * k + 2 * r;
    const W* s0 = ch < d.c ? w + (t * d.c + ch) * d.o : nullptr;
    const W* s1 = ch + 1 < d.c ? w + (t * d.c + ch + 1) * d.o : nullptr;
    for (int64_t j = 0; j < nt; ++j) {
      uint16_t* dst = tiles + j * 512 + r * 32;
      if (s1 && 16 * j + 16 <= d.o) {
        PackPairs(s0 + 16 * j, s1 + 16 * j, dst);
        continue;
      }
      for (int64_t q = 0; q < 16; ++q) {
        const int64_t oc = 16 * j + q;
        dst[2 * q] = s0 && oc < d.o ? Bf16Bits(s0[oc]) : 0;
        dst[2 * q + 1] = s1 && oc < d.o ? Bf16Bits(s1[oc]) : 0;
      }
    }
  }
}


// The kernel gradient of a stride-1 convolution of bfloat16 values on AMX: dw[r, s][c][o] =
// sum over pixels (n, i, j) of x[n, i + r - pt, j + s - pl, c] * g[n, i, j, o], float32.
// As tiles: dw (16 channels x 16 outputs) += A (16 channels x 32 pixels of a row) . B (32
// pixels, in pairs, x 16 outputs). A's rows are rows of x transposed (xt: per input row, C x
// Wt with the columns shifted by pl and zeros outside the image), so every tap (r, s) reads its
// tile in place at column offset s; B's are g's rows in the pairs layout (gv). A work item is
// a pair of 16-channel blocks x a pair of 16-output blocks x a chunk of output rows (numbered
// over all images, rows u0..u1-1). On wide rows (4 blocks of 32 pixels or more) it runs every
// tap on a row before the next (the rows it reads stay in cache), keeping the taps'
// accumulators in `acc` (taps x 4 tiles) between rows; on narrow ones every row for a tap
// before the next (the accumulators stay in the tile registers). Its sums go into its own part
// of `part` (chunk, tap, C16, O16); the chunks' parts are added in order afterwards: the result
// does not depend on the thread count.
// One output row of one tap: the accumulators in tiles 0-3 += A (tile 4, and 5 if c2) . B
// (tile 6, and 7 if o2) over the row's blocks of 32 pixels.
SKINMTL_AMX_TARGET inline void AmxGradRow(const uint16_t* a, const uint16_t* b, int64_t wt,
                                          int64_t jbs, int64_t nt, bool c2, bool o2) {
  for (int64_t jb = 0; jb < jbs; ++jb, a += 32, b += nt * 512) {
    _tile_loadd(4, a, wt * 2);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (o2) {
      _tile_loadd(7, b + 512, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (c2) {
      _tile_loadd(5, a + 16 * wt, wt * 2);
      _tile_dpbf16ps(2, 5, 6);
      if (o2) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

SKINMTL_AMX_TARGET void AmxGradItem(const uint16_t* xt, const uint16_t* gv, float* part,
                                    int64_t u0, int64_t u1, int64_t cb, int64_t ob,
                                    const Geometry& d, int64_t c16, int64_t nt, int64_t wt,
                                    int64_t jbs, float* acc) {
  const bool c2 = cb + 1 < c16 / 16, o2 = ob + 1 < nt, wide = jbs >= 4;
  std::fill(acc, acc + d.taps() * 1024, 0.0f);
  const int64_t outer = wide ? u1 - u0 : d.taps(), inner = wide ? d.taps() : u1 - u0;
  for (int64_t p = 0; p < outer; ++p) {
    for (int64_t q = 0; q < inner; ++q) {
      const int64_t u = u0 + (wide ? p : q), t = wide ? q : p;
      const int64_t img = u / d.ho, i = u % d.ho, ri = i + t / d.kw - d.pt;
      float* at = acc + t * 1024;
      if (wide || q == 0) {
        _tile_loadd(0, at, 64);
        _tile_loadd(1, at + 256, 64);
        _tile_loadd(2, at + 512, 64);
        _tile_loadd(3, at + 768, 64);
      }
      if (ri >= 0 && ri < d.h) {
        const uint16_t* a = xt + ((img * d.h + ri) * c16 + 16 * cb) * wt + t % d.kw;
        const uint16_t* b = gv + ((img * d.ho + i) * jbs * nt + ob) * 512;
        AmxGradRow(a, b, wt, jbs, nt, c2, o2);
      }
      if (wide || q == inner - 1) {
        _tile_stored(0, at, 64);
        _tile_stored(1, at + 256, 64);
        _tile_stored(2, at + 512, 64);
        _tile_stored(3, at + 768, 64);
      }
    }
  }
  const int64_t o16 = 16 * nt;
  for (int64_t t = 0; t < d.taps(); ++t) {
    for (int q = 0; q < 4; ++q) {
      if ((q / 2 && !c2) || (q % 2 && !o2)) continue;
      const int64_t c0 = 16 * (cb + q / 2), o0 = 16 * (ob + q % 2);
      for (int64_t r = 0; r < 16; ++r) {
        std::copy(acc + t * 1024 + q * 256 + 16 * r, acc + t * 1024 + q * 256 + 16 * r + 16,
                  part + (t * c16 + c0 + r) * o16 + o0);
      }
    }
  }
}

#endif  // SKINMTL_AMX

// conv(x, w) of bfloat16 x (N, H, W, C) and w (kh, kw, C, O) into y (N, Ho, Wo, O), float32
// or bfloat16 (T = float or uint16_t); w bfloat16, or float32 rounded to bfloat16 first
// (W = uint16_t or float: the models pass their float32 kernels, which saves XLA a conversion
// of every kernel per call). The kernel is packed first (in parallel); then each
// item reads its inputs in place (C a multiple of 32, tiles inside the input) or through a
// 16-pixel staging copy with zeros (edges, other C).
template <typename T, ffi::DataType DT, typename W, ffi::DataType DW>
ffi::Error ConvBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<DW> w,
                    ffi::ResultBuffer<DT> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                    int64_t threads) {
  const char* name = "skinmtl_conv2d_bf16";
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const Call call{name, xd, wd, yd, sh, sw, pt, pl, threads, Needs::kAmx};
  return call.Run([&](const Geometry& d) -> ffi::Error {
#ifdef SKINMTL_AMX
    T* yp = reinterpret_cast<T*>(y->untyped_data());
    if (d.n * d.pixels() * d.o == 0) return ffi::Error::Success();
    const int64_t cp = std::max<int64_t>(32, (d.c + 31) / 32 * 32), kb = cp / 32;
    const int64_t nt = (d.o + 15) / 16, tiles = d.ho * ((d.wo + 15) / 16);
    std::unique_ptr<uint16_t[]> wt(new uint16_t[d.taps() * kb * nt * 512]);
    const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
    const auto* ws = reinterpret_cast<const W*>(w.untyped_data());
    ParallelFor(d.taps() * kb, threads, [&](int64_t item) {
      PackKernel(ws, d, item / kb, item % kb, nt, wt.get() + item * nt * 512);
    });
    // Items: pairs of 16-pixel tiles x pairs of 16-output blocks, a run of `run` pairs per item
    // (a row of a wide image; at least 2 tiles).
    const int64_t pairs = (tiles + 1) / 2, npairs = (nt + 1) / 2;
    const int64_t run = std::max<int64_t>(1, (d.wo + 31) / 32);
    const int64_t runs = (pairs + run - 1) / run;
    ParallelFor(d.n * runs * npairs, threads, [&](int64_t item) {
      thread_local std::vector<uint16_t> stage;
      stage.resize(32 * cp);
      ConfigureTiles();
      const int64_t img = item / (runs * npairs), rest = item % (runs * npairs);
      const int64_t nb = 2 * (rest % npairs), p0 = rest / npairs * run;
      for (int64_t p = p0; p < std::min(pairs, p0 + run); ++p) {
        AmxItem(xs, wt.get(), yp, img, 2 * p, nb, d, cp, nt, stage.data());
      }
      ReleaseTiles();
    });
    return ffi::Error::Success();
#else
    static_cast<void>(d);
    return ffi::Error::Internal(name);
#endif
  });
}


// dw (kh, kw, C, O), float32, of the stride-1 convolution of bfloat16 x (N, H, W, C) from its
// bfloat16 output gradient g (N, Ho, Wo, O): see AmxGradItem. Copies first (in parallel): x
// transposed per row (xt), g in the pairs layout (gv), pixels padded to whole blocks of 32.
ffi::Error ConvBf16WeightGrad(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> g,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t pt, int64_t pl,
                              int64_t threads) {
  const char* name = "skinmtl_conv2d_bf16_weight_grad";
  const auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  // As the kernel gradient's (x, dw, g): the shapes of the convolution's (x, w, y).
  const Call call{name, xd, wd, gd, 1, 1, pt, pl, threads, Needs::kAmx};
  return call.Run([&](const Geometry& d) -> ffi::Error {
#ifdef SKINMTL_AMX
    float* out = dw->typed_data();
    if (d.taps() * d.c * d.o == 0) return ffi::Error::Success();
    if (d.n * d.pixels() == 0) {
      std::fill(out, out + d.taps() * d.c * d.o, 0.0f);
      return ffi::Error::Success();
    }
    const int64_t c16 = (d.c + 15) / 16 * 16, nt = (d.o + 15) / 16;
    const int64_t jbs = (d.wo + 31) / 32, wt = 32 * jbs + d.kw - 1;
    std::unique_ptr<uint16_t[]> xt(new uint16_t[d.n * d.h * c16 * wt]);
    std::unique_ptr<uint16_t[]> gv(new uint16_t[d.n * d.ho * jbs * nt * 512]);
    const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
    const auto* gs = reinterpret_cast<const uint16_t*>(g.untyped_data());
    ParallelFor(d.n * d.h, threads, [&](int64_t row) {  // xt[row][c][u] = x[row][u - pl][c]
      uint16_t* dst = xt.get() + row * c16 * wt;
      const uint16_t* src = xs + row * d.w * d.c;
      // Columns u0..u1-1 hold the image (a left padding may exceed wt: then none).
      const int64_t u0 = std::clamp<int64_t>(pl, 0, wt), u1 = std::clamp(d.w + pl, u0, wt);
      for (int64_t c = 0; c < c16; ++c) {  // zeros outside the image and past C
        std::fill(dst + c * wt, dst + c * wt + (c < d.c ? u0 : wt), uint16_t{0});
        if (c < d.c) std::fill(dst + c * wt + u1, dst + (c + 1) * wt, uint16_t{0});
      }
      for (int64_t ub = u0; ub < u1; ub += 16) {  // in blocks of 16 x 16, for the caches
        for (int64_t cb = 0; cb < d.c; cb += 16) {
          for (int64_t u = ub; u < std::min(u1, ub + 16); ++u) {
            const uint16_t* px = src + (u - pl) * d.c;
            for (int64_t c = cb; c < std::min(d.c, cb + 16); ++c) dst[c * wt + u] = px[c];
          }
        }
      }
    });
    ParallelFor(d.n * d.ho, threads, [&](int64_t row) {  // gv: tiles (jb, ob) of pairs
      uint16_t* dst = gv.get() + row * jbs * nt * 512;
      std::fill(dst, dst + jbs * nt * 512, uint16_t{0});
      const uint16_t* src = gs + row * d.wo * d.o;
      for (int64_t j = 0; j + 1 < d.wo; j += 2) {  // pixel pairs: PackPairs per 16 outputs
        uint16_t* tile = dst + (j / 32) * nt * 512 + (j % 32 / 2) * 32;
        for (int64_t o = 0; o + 16 <= d.o; o += 16) {
          PackPairs(src + j * d.o + o, src + (j + 1) * d.o + o, tile + (o / 16) * 512);
        }
      }
      for (int64_t j = 0; j < d.wo; ++j) {  // the rest: an odd last pixel, outputs past 16k
        const int64_t o0 = j + 1 < d.wo ? d.o / 16 * 16 : 0;
        uint16_t* tile = dst + (j / 32) * nt * 512 + (j % 32 / 2) * 32 + j % 2;
        for (int64_t o = o0; o < d.o; ++o) tile[(o / 16) * 512 + (o % 16) * 2] = src[j * d.o + o];
      }
    });
    // Chunks of about 4096 output pixels (whole rows, numbered over all images); items: chunk x
    // channel pair x output pair.
    const int64_t rows = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d.wo));
    const int64_t chunks = (d.n * d.ho + rows - 1) / rows;
    const int64_t cpairs = (c16 / 16 + 1) / 2, opairs = (nt + 1) / 2, o16 = 16 * nt;
    const int64_t part_size = d.taps() * c16 * o16;
    std::unique_ptr<float[]> part(new float[chunks * part_size]);
    ParallelFor(chunks * cpairs * opairs, threads, [&](int64_t item) {
      thread_local std::vector<float> acc;
      acc.resize(d.taps() * 1024);
      ConfigureTiles();
      const int64_t chunk = item / (cpairs * opairs), rest = item % (cpairs * opairs);
      AmxGradItem(xt.get(), gv.get(), part.get() + chunk * part_size, chunk * rows,
                  std::min(d.n * d.ho, (chunk + 1) * rows), 2 * (rest / opairs),
                  2 * (rest % opairs), d, c16, nt, wt, jbs, acc.data());
      ReleaseTiles();
    });
    ParallelFor(d.taps() * d.c, threads, [&](int64_t row) {  // dw[t][c] = sum over chunks
      const int64_t t = row / d.c, c = row % d.c;
      float* dst = out + row * d.o;
      const float* src = part.get() + (t * c16 + c) * o16;
      std::copy(src, src + d.o, dst);
      for (int64_t ch = 1; ch < chunks; ++ch) {
        const float* q = src + ch * part_size;
        for (int64_t o = 0; o < d.o; ++o) dst[o] += q[o];
      }
    });
    return ffi::Error::Success();
#else
    static_cast<void>(d);
    return ffi::Error::Internal(name);
#endif
  });
}

}  // namespace

extern "C" void SkinmtlSetSgemm(void* fn) { sgemm.store(reinterpret_cast<Sgemm>(fn)); }

// 1 where the bfloat16 kernels can run here (AMX-BF16, and Linux grants the tile data).
extern "C" int SkinmtlAmxAvailable() { return AmxReady() ? 1 : 0; }

// The XLA FFI API of the headers these kernels were built with (major * 1000 + minor) and the
// jaxlib that brought them (setup.py defines SKINMTL_JAXLIB): the loader compares them with the
// installed jaxlib's before it registers anything.
extern "C" int SkinmtlFfiApiVersion() { return XLA_FFI_API_MAJOR * 1000 + XLA_FFI_API_MINOR; }
#ifndef SKINMTL_JAXLIB
#define SKINMTL_JAXLIB "unknown"
#endif
extern "C" const char* SkinmtlBuiltWithJaxlib() { return SKINMTL_JAXLIB; }

#define SKINMTL_CONV(name, fn)                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                          \
                                ffi::Ffi::Bind()                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()  \
                                    .Arg<ffi::Buffer<ffi::F32>>()  \
                                    .Ret<ffi::Buffer<ffi::F32>>()  \
                                    .Attr<int64_t>("sh")           \
                                    .Attr<int64_t>("sw")           \
                                    .Attr<int64_t>("pt")           \
                                    .Attr<int64_t>("pl")           \
                                    .Attr<int64_t>("threads"));

SKINMTL_CONV(SkinmtlConv2d, Conv2d)                      // (x, w) -> y
SKINMTL_CONV(SkinmtlConv2dInputGrad, Conv2dInputGrad)    // (g, w) -> dx
SKINMTL_CONV(SkinmtlConv2dWeightGrad, Conv2dWeightGrad)  // (x, g) -> dw

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkinmtlWinograd, Winograd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (N, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w (3, 3, C, O)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y (N, Ho, Wo, O)
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkinmtlWinogradWeightGrad, WinogradWeightGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (N, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g (N, Ho, Wo, O)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw (3, 3, C, O)
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("threads"));

#define SKINMTL_CONV_BF16(name, T, DT, W, DW)                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (ConvBf16<T, DT, W, DW>),                     \
                                ffi::Ffi::Bind()                                    \
                                    .Arg<ffi::Buffer<ffi::BF16>>()                  \
                                    .Arg<ffi::Buffer<DW>>()                         \
                                    .Ret<ffi::Buffer<DT>>()                         \
                                    .Attr<int64_t>("sh")                            \
                                    .Attr<int64_t>("sw")                            \
                                    .Attr<int64_t>("pt")                            \
                                    .Attr<int64_t>("pl")                            \
                                    .Attr<int64_t>("threads"));

// (x bf16, w bf16 or f32) -> y bf16 or f32
SKINMTL_CONV_BF16(SkinmtlConv2dBf16, uint16_t, ffi::BF16, uint16_t, ffi::BF16)
SKINMTL_CONV_BF16(SkinmtlConv2dBf16F32, float, ffi::F32, uint16_t, ffi::BF16)
SKINMTL_CONV_BF16(SkinmtlConv2dBf16Wf32, uint16_t, ffi::BF16, float, ffi::F32)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SkinmtlConv2dBf16WeightGrad, ConvBf16WeightGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x (N, H, W, C)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // g (N, Ho, Wo, O)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw (kh, kw, C, O)
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("threads"));
