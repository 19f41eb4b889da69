// gemma_jax's int8 x int8 -> int32 product for XLA:CPU, called through the typed XLA FFI:
//   y[..., m, o] = sum_i x[..., m, i] * w[..., o, i]
// x: the activation rows quantized per token, w: an int8 weight stored [out, in] (quant.QArray).
// Both operands must lie in [-127, 127] (what quant.py produces); the int32 result is then exact,
// i.e. equal to XLA's dot_general with preferred_element_type=int32.
//
// One shared library for every x86-64 CPU: the instruction set is chosen at run time (CPUID and
// the OS's saved register state), or forced by the `isa` attribute (for tests and benchmarks):
//   AVX-512 VNNI  vpdpbusd on (w ^ 0x80) (u8) and x (s8), minus 128 * sum(x) per row
//   AVX-VNNI      the same on 256-bit vectors (VEX encoding: Alder Lake and later)
//   AVX-512 BW    vpmaddubsw on |x| (u8) and w * sign(x) (s8), then vpmaddwd by ones; the sign
//                 trick keeps every pair sum within int16 (2 * 127 * 127 < 32767)
//   AVX2          the same on 256-bit vectors (vpsignb)
//   scalar        plain C++ (whatever the compiler makes of it)
// Work is split over output rows among XLA's intra-op threads (the FFI ThreadPool).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#define GEMMA_JAX_X86 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Kept in step with gemma_jax/kernels/int8.py (ISAS).
enum Isa : int32_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvxVnni = 3, kAvx512 = 4, kAvx512Vnni = 5 };

struct Problem {
  const int8_t* x;       // [m, kpad]: the rows of x, zero-padded to kpad
  const int8_t* xabs;    // [m, kpad]: |x| (sign-trick paths only, else nullptr)
  const int32_t* xcorr;  // [m]: added to each row's sums (-128 * sum(x) for VNNI paths, else 0)
  int64_t m, k, kpad, n;
  const int8_t* w;       // [n, k]
  int32_t* y;            // [m, n]
};

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

// ------------------------------------------------------------------------------------- scalar
void RowsScalar(const Problem& p, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    const int8_t* w = p.w + o * p.k;
    for (int64_t r = 0; r < p.m; ++r) {
      const int8_t* x = p.x + r * p.kpad;
      int32_t sum = 0;
      for (int64_t i = 0; i < p.k; ++i) sum += int32_t{x[i]} * int32_t{w[i]};
      p.y[r * p.n + o] = sum + p.xcorr[r];
    }
  }
}

#ifdef GEMMA_JAX_X86
// ------------------------------------------------------------------------ CPU feature checks
void Cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  __asm__ __volatile__("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

uint64_t Xcr0() {
  uint32_t lo, hi;
  __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t{hi} << 32) | lo;
}

bool Supported(int32_t isa) {
  if (isa == kScalar) return true;
  uint32_t r[4];
  Cpuid(0, 0, r);
  const uint32_t max_leaf = r[0];
  if (max_leaf < 7) return false;
  Cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1;
  if (!osxsave || !avx) return false;
  const uint64_t xcr0 = Xcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;     // SSE and AVX registers saved by the OS
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;   // and the AVX-512 opmask and upper registers
  Cpuid(7, 0, r);
  const bool avx2 = (r[1] >> 5) & 1, avx512f = (r[1] >> 16) & 1, avx512bw = (r[1] >> 30) & 1;
  const bool avx512vnni = (r[2] >> 11) & 1;
  Cpuid(7, 1, r);
  const bool avxvnni = (r[0] >> 4) & 1;
  switch (isa) {
    case kAvx2: return ymm_state && avx2;
    case kAvxVnni: return ymm_state && avx2 && avxvnni;
    case kAvx512: return zmm_state && avx512f && avx512bw;
    case kAvx512Vnni: return zmm_state && avx512f && avx512bw && avx512vnni;
    default: return false;
  }
}

// ---------------------------------------------------------------------------------- ISA paths
#if defined(__clang__)
#define GEMMA_JAX_TARGET(t) _Pragma(t)
#define GEMMA_JAX_TARGET_END _Pragma("clang attribute pop")
#else
#define GEMMA_JAX_TARGET(t) _Pragma("GCC push_options") _Pragma(t)
#define GEMMA_JAX_TARGET_END _Pragma("GCC pop_options")
#endif

#if defined(__clang__)
GEMMA_JAX_TARGET("clang attribute push (__attribute__((target(\"avx2\"))), apply_to = function)")
#else
GEMMA_JAX_TARGET("GCC target(\"avx2\")")
#endif
namespace avx2 {
inline int32_t Sum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
struct Ops {
  using V = __m256i;
  static constexpr int kBytes = 32, kRows = 2, kCols = 4;
  static constexpr bool kSign = true;
  static V Zero() { return _mm256_setzero_si256(); }
  static V Load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V Prep(V w) { return w; }
  static V Step(V acc, V w, V x, V xabs) {
    const V pairs = _mm256_maddubs_epi16(xabs, _mm256_sign_epi8(w, x));  // |x| * (w * sign(x))
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  static int32_t Sum(V v) { return Sum256(v); }
};
#include "int8_matmul_simd.inc"
}  // namespace avx2
GEMMA_JAX_TARGET_END

#if defined(__clang__)
GEMMA_JAX_TARGET("clang attribute push (__attribute__((target(\"avx2,avxvnni\"))), apply_to = function)")
#else
GEMMA_JAX_TARGET("GCC target(\"avx2,avxvnni\")")
#endif
namespace avxvnni {
struct Ops {
  using V = __m256i;
  static constexpr int kBytes = 32, kRows = 4, kCols = 4;
  static constexpr bool kSign = false;
  static V Zero() { return _mm256_setzero_si256(); }
  static V Load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V Prep(V w) { return _mm256_xor_si256(w, _mm256_set1_epi8(-128)); }  // w + 128 as u8
  static V Step(V acc, V w, V x, V) { return _mm256_dpbusd_avx_epi32(acc, w, x); }
  static int32_t Sum(V v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  }
};
#include "int8_matmul_simd.inc"
}  // namespace avxvnni
GEMMA_JAX_TARGET_END

#if defined(__clang__)
GEMMA_JAX_TARGET("clang attribute push (__attribute__((target(\"avx512f,avx512bw\"))), apply_to = function)")
#else
GEMMA_JAX_TARGET("GCC target(\"avx512f,avx512bw\")")
#endif
namespace avx512 {
struct Ops {
  using V = __m512i;
  static constexpr int kBytes = 64, kRows = 4, kCols = 4;
  static constexpr bool kSign = true;
  static V Zero() { return _mm512_setzero_si512(); }
  static V Load(const int8_t* p) { return _mm512_loadu_si512(p); }
  static V Prep(V w) { return w; }
  static V Step(V acc, V w, V x, V xabs) {
    const V signed_w = _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(x), _mm512_setzero_si512(), w);
    const V pairs = _mm512_maddubs_epi16(xabs, signed_w);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
  static int32_t Sum(V v) { return _mm512_reduce_add_epi32(v); }
};
#include "int8_matmul_simd.inc"
}  // namespace avx512
GEMMA_JAX_TARGET_END

#if defined(__clang__)
GEMMA_JAX_TARGET("clang attribute push (__attribute__((target(\"avx512f,avx512bw,avx512vnni\"))), apply_to = function)")
#else
GEMMA_JAX_TARGET("GCC target(\"avx512f,avx512bw,avx512vnni\")")
#endif
namespace avx512vnni {
struct Ops {
  using V = __m512i;
  static constexpr int kBytes = 64, kRows = 4, kCols = 4;
  static constexpr bool kSign = false;
  static V Zero() { return _mm512_setzero_si512(); }
  static V Load(const int8_t* p) { return _mm512_loadu_si512(p); }
  static V Prep(V w) { return _mm512_xor_si512(w, _mm512_set1_epi8(-128)); }  // w + 128 as u8
  static V Step(V acc, V w, V x, V) { return _mm512_dpbusd_epi32(acc, w, x); }
  static int32_t Sum(V v) { return _mm512_reduce_add_epi32(v); }
};
#include "int8_matmul_simd.inc"
}  // namespace avx512vnni
GEMMA_JAX_TARGET_END

#else  // not x86-64: the scalar path only
bool Supported(int32_t isa) { return isa == kScalar; }
#endif

int32_t BestIsa() {
  for (int32_t isa : {kAvx512Vnni, kAvxVnni, kAvx512, kAvx2})
    if (Supported(isa)) return isa;
  return kScalar;
}

RowsFn RowsFor(int32_t isa) {
  switch (isa) {
#ifdef GEMMA_JAX_X86
    case kAvx2: return avx2::Rows;
    case kAvxVnni: return avxvnni::Rows;
    case kAvx512: return avx512::Rows;
    case kAvx512Vnni: return avx512vnni::Rows;
#endif
    default: return RowsScalar;
  }
}

bool OffsetTrick(int32_t isa) { return isa == kAvxVnni || isa == kAvx512Vnni; }
bool SignTrick(int32_t isa) { return isa == kAvx2 || isa == kAvx512; }

// ------------------------------------------------------------------------------- threading
// The output rows are cut into chunks that every worker (the calling thread and up to
// num_threads - 1 tasks on XLA's intra-op pool) takes in turn from one counter. The caller
// waits only for chunks that were taken, never for a task to start, so a busy pool cannot
// deadlock it; a task that starts late finds no chunk left and touches nothing but `next`.
struct Shared {
  Problem p;
  RowsFn rows;
  int64_t chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      rows(p, c * chunk, std::min(p.n, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

constexpr int64_t kMinBytesPerTask = 1 << 18;  // below this a product runs on the calling thread

void Run(const Problem& p, RowsFn rows, int64_t row_block, ffi::ThreadPool& pool) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t bytes = p.n * p.k;
  int64_t tasks = std::min<int64_t>(threads, std::max<int64_t>(1, bytes / kMinBytesPerTask));
  if (tasks <= 1) {
    rows(p, 0, p.n);
    return;
  }
  // about 8 chunks per worker, whole row blocks each
  int64_t chunk = (p.n + 8 * tasks - 1) / (8 * tasks);
  chunk = std::max<int64_t>(row_block, (chunk + row_block - 1) / row_block * row_block);
  auto shared = std::make_shared<Shared>();
  shared->p = p;
  shared->rows = rows;
  shared->chunk = chunk;
  shared->chunks = (p.n + chunk - 1) / chunk;
  tasks = std::min(tasks, shared->chunks);
  for (int64_t t = 1; t < tasks; ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) std::this_thread::yield();
}

int64_t Product(ffi::Span<const int64_t> dims, size_t from, size_t to) {
  int64_t n = 1;
  for (size_t i = from; i < to; ++i) n *= dims[i];
  return n;
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                          ffi::ResultBuffer<ffi::S32> y, int32_t isa) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() < 2 || wd.size() != xd.size() || yd.size() != xd.size())
    return ffi::Error::InvalidArgument("gemma_jax_int8_matmul: x [..., M, I], w [..., O, I], equal ranks");
  const size_t r = xd.size();
  const int64_t m = xd[r - 2], k = xd[r - 1], n = wd[r - 2];
  if (wd[r - 1] != k || yd[r - 2] != m || yd[r - 1] != n)
    return ffi::Error::InvalidArgument("gemma_jax_int8_matmul: shapes x [..., M, I], w [..., O, I], y [..., M, O] do not match");
  const int64_t xb = Product(xd, 0, r - 2), wb = Product(wd, 0, r - 2), yb = Product(yd, 0, r - 2);
  if ((xb != yb && xb != 1) || (wb != yb && wb != 1))
    return ffi::Error::InvalidArgument("gemma_jax_int8_matmul: batch dimensions must equal the result's or be 1");
  if (isa == kAuto) isa = BestIsa();
  if (!Supported(isa))
    return ffi::Error::InvalidArgument("gemma_jax_int8_matmul: instruction set " + std::to_string(isa) + " is not supported by this CPU");
  const RowsFn rows = RowsFor(isa);
  const int64_t row_block = 4;

  // With one weight for all batch entries, every x row of every batch entry is one row.
  const int64_t groups = wb == 1 ? 1 : yb;
  const int64_t mg = wb == 1 ? yb * m : m;  // rows per group
  const int64_t kpad = (k + 63) / 64 * 64;
  std::vector<int8_t> xpad(static_cast<size_t>(mg * kpad)), xabs;
  std::vector<int32_t> xcorr(static_cast<size_t>(mg));
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* xg = x.typed_data() + (wb == 1 ? 0 : (xb == 1 ? 0 : g * m * k));
    const int64_t xrows = (wb == 1 && xb == 1) ? m : mg;  // x broadcast over the batch: copy it
    for (int64_t row = 0; row < mg; ++row) {
      const int8_t* src = xg + (row % xrows) * k;
      int8_t* dst = xpad.data() + row * kpad;
      std::memcpy(dst, src, static_cast<size_t>(k));
      std::memset(dst + k, 0, static_cast<size_t>(kpad - k));
      int32_t sum = 0;
      for (int64_t i = 0; i < k; ++i) sum += src[i];
      xcorr[row] = OffsetTrick(isa) ? -128 * sum : 0;
    }
    if (SignTrick(isa)) {
      xabs.resize(xpad.size());
      for (size_t i = 0; i < xpad.size(); ++i) xabs[i] = static_cast<int8_t>(xpad[i] < 0 ? -xpad[i] : xpad[i]);
    }
    Problem p{xpad.data(), SignTrick(isa) ? xabs.data() : nullptr, xcorr.data(), mg, k, kpad, n,
              w.typed_data() + (wb == 1 ? 0 : g * n * k), y->typed_data() + g * mg * n};
    Run(p, rows, row_block, pool);
  }
  return ffi::Error::Success();
}

}  // namespace

// The library is built with -fvisibility=hidden; these are its only exported symbols.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaJaxInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("isa"));

extern "C" {
// The instruction set an `isa` of 0 (auto) picks on this CPU.
int32_t GemmaJaxInt8BestIsa() { return BestIsa(); }
// Whether this CPU (and OS) can run an instruction set.
int32_t GemmaJaxInt8Supported(int32_t isa) { return isa == kAuto || Supported(isa) ? 1 : 0; }
}
#pragma GCC visibility pop
