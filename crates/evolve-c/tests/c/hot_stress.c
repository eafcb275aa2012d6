/* A hot function redirected live while threads call it (directly and through a pointer), to a
   function of the program and to one of a shared object loaded later (beyond rel32 reach:
   springboards), and restored, many times. Prints key=value results for the Rust test. */
#include <evolve.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>

#include "common.h"

EVOLVE_HOT(int, compute, (int x)) { return x * 3 + 1; }

__attribute__((noinline)) int compute_v2(int x) { return x * 3 + 2; }

/* The direct caller whose call site (a `call rel32`) the library retargets; the barrier keeps
   the compiler from making it a tail jump, which may be a 2-byte `jmp rel8` (such a branch
   keeps reaching the function's entry, which is redirected too). */
__attribute__((noinline)) int call_compute(int x)
{
    int r = compute(x);
    __asm__ volatile("" ::: "memory");
    return r;
}

static int (*volatile through_pointer)(int) = compute;
static volatile int stop;
static unsigned long calls[64], wrong[64];

static int valid(int x, int r) { return r == x * 3 + 1 || r == x * 3 + 2 || r == x * 3 + 3; }

static void *worker(void *arg)
{
    long t = (long)arg;
    unsigned long n = 0, bad = 0;
    int x = (int)t;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        x = (x + 7) & 0xffff;
        if (!valid(x, call_compute(x)))
            bad++;
        if (!valid(x, through_pointer(x)))
            bad++;
        n += 2;
    }
    calls[t] = n;
    wrong[t] = bad;
    return 0;
}

int main(int argc, char **argv)
{
    int threads = stress_threads();
    int rounds = argc > 1 ? atoi(argv[1]) : 2000;
    const char *patch = argc > 2 ? argv[2] : 0;
    char slot_before[16], slot_after[16], body_before[64], body_after[64];
    hex_bytes((void *)compute, 5, 5, slot_before);
    hex_bytes((void *)compute, 0, 24, body_before);
    int site = find_branch((void *)call_compute, 64, (void *)compute);
    CHECK(site >= 0, "no direct call of compute in call_compute");

    EXPECT(evolve_start(), 0);
    int (*v3)(int) = 0;
    if (patch) {
        void *h = dlopen(patch, RTLD_NOW);
        CHECK(h, "dlopen %s: %s", patch, dlerror());
        v3 = (int (*)(int))dlsym(h, "compute_v3");
        CHECK(v3, "no compute_v3 in %s", patch);
    }

    /* One redirection checked step by step. */
    EXPECT(evolve_redirect(compute, compute_v2), 0);
    CHECK(compute(1) == 5 && through_pointer(1) == 5, "redirected: %d", compute(1));
    CHECK(evolve_target(compute) == (evolve_fn)compute_v2, "target");
    int retargeted = branch_target((const unsigned char *)call_compute, site) == (long)compute_v2;
    EXPECT(evolve_restore(compute), 0);
    CHECK(compute(1) == 4 && evolve_target(compute) == 0, "restored: %d", compute(1));
    int restored_site = branch_target((const unsigned char *)call_compute, site) == (long)compute;

    pthread_t t[64];
    for (long i = 0; i < threads; i++)
        pthread_create(&t[i], 0, worker, (void *)i);
    double deadline = seconds() + 20;
    int done = 0, far = 0;
    for (; done < rounds && seconds() < deadline; done++) {
        EXPECT(evolve_redirect(compute, compute_v2), 0);
        if (v3 && done % 2) {
            EXPECT(evolve_redirect(compute, v3), 0);
            far++;
        }
        EXPECT(evolve_restore(compute), 0);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    unsigned long total = 0, bad = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], 0);
        total += calls[i];
        bad += wrong[i];
    }
    hex_bytes((void *)compute, 5, 5, slot_after);
    hex_bytes((void *)compute, 0, 24, body_after);
    printf("threads=%d rounds=%d far_rounds=%d calls=%lu wrong=%lu\n", threads, done, far, total,
           bad);
    printf("site_retargeted=%d site_restored=%d\n", retargeted, restored_site);
    printf("function_bytes_identical=%d slot_before=%s slot_after=%s\n",
           strcmp(body_before, body_after) == 0, slot_before, slot_after);
    printf("after=%d\n", compute(1));
    return 0;
}
