/* Dense score kernel of the scorer (declared in core.pxd, used by core.pyx).
 *
 * Eight action scores advance together over the features: the weights are stored transposed
 * and padded to a multiple of 8 actions, so for each feature j one 8-wide row of weights is
 * multiplied by x[j] and added to eight accumulators held in vector registers. Every score is
 * still bias + w0*x0 + w1*x1 + ... summed in feature order, lane by lane, exactly as the
 * pure-Python twin sums it (the build passes -ffp-contract=off, so no fused multiply-add).
 *
 * GCC/Clang vector extensions: two 4-double vectors (two SSE2 pairs each on baseline x86-64,
 * one AVX register each where the AVX2 clone is picked at load time). */
#ifndef LOOPS_KERNELS_H
#define LOOPS_KERNELS_H

#include <string.h>

typedef double loops_v4d __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) \
    && !defined(LOOPS_NO_CLONES)
#define LOOPS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LOOPS_CLONES
#endif

static inline __attribute__((always_inline)) loops_v4d loops_load4(const double* p) {
    loops_v4d v;
    memcpy(&v, p, sizeof v);
    return v;
}

LOOPS_CLONES
static void loops_scores(const double* WT, const double* b, const double* x, int D, int KP,
                         int K, double* s) {
    double tmp[8];
    for (int a0 = 0; a0 < KP; a0 += 8) {
        loops_v4d l0 = loops_load4(b + a0), l1 = loops_load4(b + a0 + 4);
        const double* w = WT + a0;
        for (int j = 0; j < D; j++, w += KP) {
            loops_v4d xj = {x[j], x[j], x[j], x[j]};
            l0 = l0 + loops_load4(w) * xj;
            l1 = l1 + loops_load4(w + 4) * xj;
        }
        int n = K - a0 < 8 ? K - a0 : 8;
        if (n == 8) {
            memcpy(s + a0, &l0, sizeof l0);
            memcpy(s + a0 + 4, &l1, sizeof l1);
        } else {
            memcpy(tmp, &l0, sizeof l0);
            memcpy(tmp + 4, &l1, sizeof l1);
            memcpy(s + a0, tmp, (size_t)n * sizeof(double));
        }
    }
}

/* 1 when every one of the n values is finite: x - x is 0 for finite x and NaN for inf/NaN,
 * and a NaN survives any sum. Eight independent accumulators keep it at memory speed. */
LOOPS_CLONES
static int loops_all_finite(const double* p, long n) {
    loops_v4d a0 = {0, 0, 0, 0}, a1 = {0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        loops_v4d u = loops_load4(p + i), v = loops_load4(p + i + 4);
        a0 = a0 + (u - u);
        a1 = a1 + (v - v);
    }
    double acc = 0.0;
    for (; i < n; i++)
        acc = acc + (p[i] - p[i]);
    a0 = a0 + a1;
    acc = acc + a0[0] + a0[1] + a0[2] + a0[3];
    return acc == 0.0;
}

/* Largest |score| the scorer serves: far above any score a valid policy gives for sane
 * features (see loops_sdk/policy.py), and low enough that score differences times gamma or
 * over a temperature stay free of NaN. Kept equal to SCORE_LIMIT in loops_sdk/rules.py. */
#define LOOPS_SCORE_LIMIT 1e300

/* 1 when all K scores are within +-LOOPS_SCORE_LIMIT; a NaN fails both comparisons. */
static inline int loops_scores_ok(const double* s, int K) {
    int ok = 1;
    for (int a = 0; a < K; a++)
        ok &= (s[a] <= LOOPS_SCORE_LIMIT) & (s[a] >= -LOOPS_SCORE_LIMIT);
    return ok;
}

/* Sum of squares of n values (an upper bound on the largest square; +inf past ~1e154),
 * at memory speed like loops_all_finite. */
LOOPS_CLONES
static double loops_sum_squares(const double* p, long n) {
    loops_v4d a0 = {0, 0, 0, 0}, a1 = {0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        loops_v4d u = loops_load4(p + i), v = loops_load4(p + i + 4);
        a0 = a0 + u * u;
        a1 = a1 + v * v;
    }
    double acc = 0.0;
    for (; i < n; i++)
        acc = acc + p[i] * p[i];
    a0 = a0 + a1;
    return acc + a0[0] + a0[1] + a0[2] + a0[3];
}

/* Cap tables shared by processes (loops_sdk/_scorer/shared_caps.py): each bucket ends in a
 * lock word, 0 when free, else the pid of the process deciding for one of its players. The
 * holder keeps it for one decision (well under a microsecond), so waiters spin, then yield;
 * a waiter that finds the holder's process gone (killed mid-decision) takes the lock over.
 * Acquire/release ordering makes the bucket's plain loads and stores safe between them. */
#include <stdint.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <sys/types.h>

static inline void loops_cap_lock(uint64_t* w, uint64_t me) {
    uint64_t seen = 0;
    unsigned long spins = 0;
    while (!__atomic_compare_exchange_n(w, &seen, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        spins++;
        if (spins > 64) {
            sched_yield();   /* the holder may be descheduled: give it the CPU */
            if ((spins & 1023) == 0 && seen != 0 && seen != me
                    && kill((pid_t)seen, 0) != 0 && errno == ESRCH
                    && __atomic_compare_exchange_n(w, &seen, me, 0, __ATOMIC_ACQUIRE,
                                                   __ATOMIC_RELAXED))
                return;
        }
        seen = 0;
    }
}

static inline void loops_cap_unlock(uint64_t* w) {
    __atomic_store_n(w, 0, __ATOMIC_RELEASE);
}

static inline void loops_atomic_add_u64(uint64_t* p, uint64_t v) {
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

#endif
