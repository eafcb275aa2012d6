/* c-call-overhead: a prepared C hot function (EVOLVE_HOT: two one-byte NOPs at its entry)
   against the same function without the padding, unpatched; and, redirected, the call of the
   hot function (its call site retargeted to the new implementation) against a direct call of
   that implementation. Also through a function pointer (the entry's gate and slot: two extra
   jumps) against a pointer to the implementation.

   Usage: call_overhead ITERS RUNS [only]; prints one line per run:
     plain hot patched direct patched_pointer direct_pointer   (ns per call)
   With `only` (plain|hot|patched|direct) it runs that loop once, for callgrind. */
#include <evolve.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The same small body (MurmurHash3's finaliser) everywhere; noipa on every copy so that only
   the padding differs (callers assume nothing of any of them). */
#define MIX_BODY                                                                             \
    {                                                                                        \
        x = (x ^ (x >> 33)) * 0xff51afd7ed558ccdull;                                         \
        return x ^ (x >> 33);                                                                \
    }

EVOLVE_HOT(uint64_t, hot_mix, (uint64_t x)) MIX_BODY
__attribute__((noipa, aligned(16))) uint64_t plain_mix(uint64_t x) MIX_BODY
__attribute__((noipa, aligned(16))) uint64_t new_mix(uint64_t x) MIX_BODY

#define LOOP(name, call)                                                                     \
    __attribute__((noipa, aligned(64))) uint64_t name(uint64_t n)                            \
    {                                                                                        \
        uint64_t acc = 0;                                                                    \
        for (uint64_t i = 0; i < n; i++)                                                     \
            acc += call(i);                                                                  \
        return acc;                                                                          \
    }

LOOP(loop_plain, plain_mix)
LOOP(loop_hot, hot_mix)
LOOP(loop_new, new_mix)

static uint64_t (*volatile pointer_hot)(uint64_t) = hot_mix;
static uint64_t (*volatile pointer_new)(uint64_t) = new_mix;

__attribute__((noipa, aligned(64))) uint64_t loop_pointer(uint64_t n, uint64_t (*f)(uint64_t))
{
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++)
        acc += f(i);
    return acc;
}

static uint64_t expected;

static double ns(uint64_t (*loop)(uint64_t), uint64_t n)
{
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    uint64_t r = loop(n);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (r != expected) {
        fprintf(stderr, "a loop computed %llx, expected %llx\n", (unsigned long long)r,
                (unsigned long long)expected);
        exit(1);
    }
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (double)n;
}

static uint64_t n_global;
static uint64_t loop_pointer_hot(uint64_t n) { return loop_pointer(n, pointer_hot); }
static uint64_t loop_pointer_new(uint64_t n) { return loop_pointer(n, pointer_new); }

static void check(int r)
{
    if (r != 0) {
        fprintf(stderr, "evolve: %s\n", evolve_last_error());
        exit(1);
    }
}

int main(int argc, char **argv)
{
    uint64_t n = argc > 1 ? strtoull(argv[1], 0, 10) : 20000000;
    int runs = argc > 2 ? atoi(argv[2]) : 11;
    const char *only = argc > 3 ? argv[3] : 0;
    n_global = n;
    check(evolve_register());
    expected = loop_plain(n);
    if (only) {
        if (!strcmp(only, "plain"))
            loop_plain(n);
        else if (!strcmp(only, "hot"))
            loop_hot(n);
        else if (!strcmp(only, "direct"))
            loop_new(n);
        else {
            check(evolve_redirect(hot_mix, new_mix));
            loop_hot(n);
        }
        return 0;
    }
    for (int r = 0; r < runs; r++) {
        double plain = ns(loop_plain, n);
        double hot = ns(loop_hot, n);
        check(evolve_redirect(hot_mix, new_mix));
        double patched = ns(loop_hot, n);
        double direct = ns(loop_new, n);
        double patched_pointer = ns(loop_pointer_hot, n);
        double direct_pointer = ns(loop_pointer_new, n);
        check(evolve_restore(hot_mix));
        printf("%.4f %.4f %.4f %.4f %.4f %.4f\n", plain, hot, patched, direct, patched_pointer,
               direct_pointer);
    }
    return 0;
}
