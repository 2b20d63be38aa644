// How fast can this machine read, compared with the in-place add that the L-BFGS roofline is measured against?
//
// The L-BFGS direction is almost all reads: (4m + 2) n values read and n written (pass 1 reads the 2m stored
// vectors and g, pass 2 reads them again and writes d).  Its "% of the DRAM in-place add" can therefore not
// exceed what a read-only stream reaches against the add on the same machine.  This probe measures that bound with
// plain AVX2 loops, independent of optkern's kernels and of torch/NumPy:
//   add        a += b over 64 MB vectors (12 B per float element counted, as the benchmark's roofline)
//   read S     sum of S streams read side by side (S = 1, 4, 8), 4 B per element
//   read 4 pf  the same with software prefetch D bytes ahead on every stream (D = 512, 1024)
// Vectors rotate over 512 MB, so nothing is read from cache; cases are interleaved over rounds and medians
// are printed, with each case's share of the add measured in the same run.
//
//   gcc -O2 -mavx2 -mfma -fopenmp bench/probes/read_vs_add.c -o /tmp/read_vs_add && OMP_NUM_THREADS=2 /tmp/read_vs_add
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N (1L << 24) /* floats per vector: 64 MB */
#define K 8          /* vectors: 512 MB in all */
#define ROUNDS 9

static float* v[K];
static volatile float sink;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

/* GB/s of a read of S streams from vector base on, prefetching dist bytes ahead (0: none). */
static double read_streams(int base, int S, long dist) {
  const double t0 = now();
#pragma omp parallel
  {
    const long T = omp_get_num_threads(), id = omp_get_thread_num();
    const long lo = N / T * id, hi = N / T * (id + 1);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (long i = lo; i < hi; i += 32) { /* 128 bytes of each stream per step */
      for (int s = 0; s < S; ++s) {
        const float* p = v[(base + s) % K] + i;
        if (dist) {
          _mm_prefetch((const char*)p + dist, _MM_HINT_T0);
          _mm_prefetch((const char*)p + dist + 64, _MM_HINT_T0);
        }
        for (int u = 0; u < 4; ++u) acc[u] = _mm256_add_ps(acc[u], _mm256_load_ps(p + 8 * u));
      }
    }
    float o[8];
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    sink = o[0];
  }
  return (double)S * N * 4 / (now() - t0) / 1e9;
}

/* GB/s of v[a] += v[b], 12 B per element. */
static double add_inplace(int a, int b) {
  const double t0 = now();
#pragma omp parallel for schedule(static)
  for (long i = 0; i < N; i += 8)
    _mm256_store_ps(v[a] + i, _mm256_add_ps(_mm256_load_ps(v[a] + i), _mm256_load_ps(v[b] + i)));
  return 3.0 * N * 4 / (now() - t0) / 1e9;
}

int main(void) {
  static const char* names[] = {"add", "read 1", "read 4", "read 8", "read 4 pf 512", "read 4 pf 1024"};
  enum { NC = 6 };
  static double gbs[NC][ROUNDS];
  for (int k = 0; k < K; ++k) {
    v[k] = aligned_alloc(4096, N * sizeof(float));
    for (long i = 0; i < N; ++i) v[k][i] = 1e-3f * (float)(i % 97);
  }
  int turn = 0;
  for (int r = 0; r < ROUNDS; ++r)
    for (int c = 0; c < NC; ++c) {
      const int b = (turn += 3) % K; /* never the vectors the previous case touched last */
      switch (c) {
        case 0: gbs[c][r] = add_inplace(b, (b + 1) % K); break;
        case 1: gbs[c][r] = read_streams(b, 1, 0); break;
        case 2: gbs[c][r] = read_streams(b, 4, 0); break;
        case 3: gbs[c][r] = read_streams(b, 8, 0); break;
        case 4: gbs[c][r] = read_streams(b, 4, 512); break;
        default: gbs[c][r] = read_streams(b, 4, 1024); break;
      }
    }
  for (int c = 0; c < NC; ++c) qsort(gbs[c], ROUNDS, sizeof(double), cmp);
  const double add = gbs[0][ROUNDS / 2];
  printf("%d threads, %d rounds, medians (min - max)\n", omp_get_max_threads(), ROUNDS);
  for (int c = 0; c < NC; ++c)
    printf("%-16s %6.1f GB/s (%5.1f - %5.1f)  %4.0f%% of add\n", names[c], gbs[c][ROUNDS / 2], gbs[c][0],
           gbs[c][ROUNDS - 1], 100.0 * gbs[c][ROUNDS / 2] / add);
  return 0;
}
