/* 10 000 commits and reverts, cycling through the calls of the paper's Table 1, while threads
   call the multiversed function directly and through a pointer: every result must be one that
   some binding gives. Prints key=value results for the Rust test. */
#include <evolve.h>

#include <pthread.h>
#include <stdint.h>

#include "common.h"

EVOLVE_SWITCH(int, shift, 0, 0, 1, 2, 3);
EVOLVE_SWITCH_BOOL(negate, false);

EVOLVE_MULTIVERSE(uint64_t, transform, (uint64_t x), (x), EVOLVE_VALUES(shift, 0, 1, 2, 3),
                  EVOLVE_BOOL(negate))
{
    uint64_t y = x << shift;
    return negate ? ~y : y;
}

__attribute__((noinline)) uint64_t call_transform(uint64_t x)
{
    uint64_t r = transform(x);
    __asm__ volatile("" ::: "memory");
    return r;
}

static uint64_t (*volatile through_pointer)(uint64_t) = transform;
static volatile int stop;
static unsigned long calls[64], wrong[64];

static int valid(uint64_t x, uint64_t r)
{
    for (int s = 0; s < 4; s++)
        if (r == x << s || r == ~(x << s))
            return 1;
    return 0;
}

static void *worker(void *arg)
{
    long t = (long)arg;
    unsigned long n = 0, bad = 0;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        uint64_t x = (n ^ (uint64_t)t) | 1;
        uint64_t r = n % 2 ? call_transform(x) : through_pointer(x);
        if (!valid(x, r))
            bad++;
        n++;
    }
    calls[t] = n;
    wrong[t] = bad;
    return 0;
}

int main(int argc, char **argv)
{
    int threads = stress_threads();
    int rounds = argc > 1 ? atoi(argv[1]) : 10000;
    char before[64], after[64];
    hex_bytes((void *)transform, 0, 24, before);
    EXPECT(evolve_start(), 0);

    pthread_t t[64];
    for (long i = 0; i < threads; i++)
        pthread_create(&t[i], 0, worker, (void *)i);
    double deadline = seconds() + 60;
    int done = 0;
    for (; done < rounds && seconds() < deadline; done++) {
        EVOLVE_SET(shift, done % 4);
        EVOLVE_SET(negate, done % 3 == 0);
        switch (done % 3) {
        case 0: EXPECT(evolve_commit(), 1); break;
        case 1: EXPECT(evolve_commit_refs(shift), 1); break;
        default: EXPECT(evolve_commit_fn(transform), 1); break;
        }
        EXPECT(evolve_is_committed(transform), 1);
        switch (done % 5) {
        case 0: EXPECT(evolve_revert(), 1); break;
        case 1: EXPECT(evolve_revert_refs(negate), 1); break;
        case 2: EXPECT(evolve_revert_fn(transform), 1); break;
        case 3: EXPECT(evolve_revert_refs(shift), 1); break;
        default: EXPECT(evolve_revert(), 1); break;
        }
        EXPECT(evolve_is_committed(transform), 0);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    unsigned long total = 0, bad = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], 0);
        total += calls[i];
        bad += wrong[i];
    }
    hex_bytes((void *)transform, 0, 24, after);
    EVOLVE_SET(shift, 2);
    EVOLVE_SET(negate, false);
    printf("threads=%d rounds=%d calls=%lu wrong=%lu function_bytes_identical=%d after=%lu\n",
           threads, done, total, bad, strcmp(before, after) == 0,
           (unsigned long)call_transform(1));
    return 0;
}
