// Throughput of XNNPACK's int8 and fp32 GEMM microkernels on one core, as LiteRT's CPU delegate picks them.
//
// Built by benchmarks/xnnpack_kernels.py against an XNNPACK checkout (the kernel sources are XNNPACK's own).
// Usage: xnnpack_gemm M N K REPEATS (the AVX-512 kernels only when built with -DWITH_AVX512). Computes the M x N output of an M x K by K x N product, tiled by each
// kernel's mr x nr; weights are packed in the kernels' layout (bias, K-major block, int8 scales). Every kernel
// runs once per round, rounds are interleaved, the fastest round is kept, time is this thread's CPU time (other
// jobs on a shared machine then inflate it less). Prints one JSON line per kernel.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "src/xnnpack/common.h"
#include "src/xnnpack/microparams.h"

typedef void (*qs8_gemm)(size_t, size_t, size_t, const int8_t*, size_t, const void*, int8_t*, size_t, size_t,
                         const union xnn_qs8_qc8w_conv_minmax_params*);
typedef void (*f32_gemm)(size_t, size_t, size_t, const float*, size_t, const float*, float*, size_t, size_t,
                         const struct xnn_f32_minmax_params*);
void xnn_qs8_qc8w_gemm_minmax_fp32_ukernel_3x8c8__avx2(size_t, size_t, size_t, const int8_t*, size_t, const void*,
    int8_t*, size_t, size_t, const union xnn_qs8_qc8w_conv_minmax_params*);
void xnn_f32_gemm_minmax_ukernel_5x16__fma3_broadcast(size_t, size_t, size_t, const float*, size_t, const float*,
    float*, size_t, size_t, const struct xnn_f32_minmax_params*);
#ifdef WITH_AVX512
void xnn_qs8_qc8w_gemm_minmax_fp32_ukernel_7x16c8__avx512vnni_prfm(size_t, size_t, size_t, const int8_t*, size_t,
    const void*, int8_t*, size_t, size_t, const union xnn_qs8_qc8w_conv_minmax_params*);
void xnn_f32_gemm_minmax_ukernel_7x32__avx512f_broadcast(size_t, size_t, size_t, const float*, size_t, const float*,
    float*, size_t, size_t, const struct xnn_f32_minmax_params*);
#endif

struct kernel {
  const char* name;
  qs8_gemm qs8;
  f32_gemm f32;
  size_t mr, nr;
};

static double cpu_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void run(const struct kernel* k, size_t M, size_t N, size_t K, const void* a, const void* w, void* c) {
  if (k->qs8 != NULL) {
    union xnn_qs8_qc8w_conv_minmax_params p;
    p.fp32_scalar.output_zero_point = 0;
    p.fp32_scalar.output_min = -128;
    p.fp32_scalar.output_max = 127;
    const size_t kp = (K + 7) & ~(size_t) 7;  // c8 kernels read K in groups of 8
    const size_t block = k->nr * (sizeof(int32_t) + kp + sizeof(float));
    for (size_t n = 0; n < N; n += k->nr)
      for (size_t m = 0; m < M; m += k->mr)
        k->qs8(M - m < k->mr ? M - m : k->mr, N - n < k->nr ? N - n : k->nr, kp, (const int8_t*) a + m * kp, kp,
               (const char*) w + (n / k->nr) * block, (int8_t*) c + m * N + n, N, k->nr, &p);
  } else {
    struct xnn_f32_minmax_params p;
    p.scalar.min = -1e30f;
    p.scalar.max = 1e30f;
    const size_t block = k->nr * (1 + K);
    for (size_t n = 0; n < N; n += k->nr)
      for (size_t m = 0; m < M; m += k->mr)
        k->f32(M - m < k->mr ? M - m : k->mr, N - n < k->nr ? N - n : k->nr, K * sizeof(float),
               (const float*) a + m * K, K * sizeof(float), (const float*) w + (n / k->nr) * block,
               (float*) c + m * N + n, N * sizeof(float), k->nr * sizeof(float), &p);
  }
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s M N K REPEATS\n", argv[0]);
    return 2;
  }
  const size_t M = strtoul(argv[1], NULL, 10), N = strtoul(argv[2], NULL, 10), K = strtoul(argv[3], NULL, 10);
  const int repeats = atoi(argv[4]);
  const struct kernel kernels[] = {
      {"f32_gemm_5x16__fma3_broadcast", NULL, xnn_f32_gemm_minmax_ukernel_5x16__fma3_broadcast, 5, 16},
      {"qs8_qc8w_gemm_3x8c8__avx2", xnn_qs8_qc8w_gemm_minmax_fp32_ukernel_3x8c8__avx2, NULL, 3, 8},
#ifdef WITH_AVX512
      {"f32_gemm_7x32__avx512f_broadcast", NULL, xnn_f32_gemm_minmax_ukernel_7x32__avx512f_broadcast, 7, 32},
      {"qs8_qc8w_gemm_7x16c8__avx512vnni_prfm", xnn_qs8_qc8w_gemm_minmax_fp32_ukernel_7x16c8__avx512vnni_prfm, NULL, 7, 16},
#endif
  };
  const int count = sizeof(kernels) / sizeof(kernels[0]);
  const size_t bytes = 4 * ((M + 64) * (K + 64) + (N + 64) * (K + 64) + (M + 64) * (N + 64));
  float* a = aligned_alloc(64, bytes);
  float* w = aligned_alloc(64, bytes);
  float* c = aligned_alloc(64, bytes);
  if (a == NULL || w == NULL || c == NULL) return 1;
  for (size_t i = 0; i < bytes / 4; i++) {  // small finite values, read as floats or as int8 bytes
    a[i] = (float) (i % 17) * 0.01f;
    w[i] = (float) (i % 13) * 0.01f;
  }
  memset(c, 0, bytes);
  double best[4] = {1e30, 1e30, 1e30, 1e30};
  for (int r = 0; r < repeats; r++)
    for (int k = 0; k < count; k++) {
      const double start = cpu_seconds();
      run(&kernels[k], M, N, K, a, w, c);
      const double seconds = cpu_seconds() - start;
      if (seconds < best[k]) best[k] = seconds;
    }
  for (int k = 0; k < count; k++)
    printf("{\"kernel\": \"%s\", \"M\": %zu, \"N\": %zu, \"K\": %zu, \"seconds\": %.6g}\n", kernels[k].name, M, N, K,
           best[k]);
  return 0;
}
