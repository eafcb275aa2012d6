/* c-multiverse-spinlock: the multiverse paper's Figure 1 in C. A spinlock whose acquisition is
   elided on a single CPU, timed four ways:
     static     - the statically specialised build: the same lock functions compiled for one
                  CPU (the switch a constant: they do nothing), still called, as the paper's
                  static build calls them (and as a caller in another translation unit does);
     dynamic    - the multiversed functions' generic code, branching on the switch;
     committed  - the same call sites after evolve_commit_refs(single_cpu): the empty variant's
                  call sites are 5-byte NOPs;
     inlined    - the lock compiled out entirely (a macro on a constant): no call, no NOP.
   Usage: spinlock ITERS RUNS [only]; prints "static dynamic committed inlined" (ns per
   lock/unlock pair) per run; with `only` (static|dynamic|committed|inlined) runs that loop
   once, for callgrind. */
#include <evolve.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct spinlock {
    int held;
};

EVOLVE_SWITCH_BOOL(single_cpu, false);

#define LOCK_BODY(single)                                                                    \
    {                                                                                        \
        if (!(single))                                                                       \
            while (__atomic_exchange_n(&l->held, 1, __ATOMIC_ACQUIRE))                       \
                __builtin_ia32_pause();                                                      \
    }
#define UNLOCK_BODY(single)                                                                  \
    {                                                                                        \
        if (!(single))                                                                       \
            __atomic_store_n(&l->held, 0, __ATOMIC_RELEASE);                                 \
    }

EVOLVE_MULTIVERSE(void, spin_lock, (struct spinlock * l), (l), EVOLVE_BOOL(single_cpu))
LOCK_BODY(single_cpu)
EVOLVE_MULTIVERSE(void, spin_unlock, (struct spinlock * l), (l), EVOLVE_BOOL(single_cpu))
UNLOCK_BODY(single_cpu)

/* The static build: single_cpu is the constant 1. noipa: calls stay, as from another
   translation unit (GCC removes calls of an empty function it can see). */
__attribute__((noipa)) void spin_lock_static(struct spinlock *l) LOCK_BODY(1)
__attribute__((noipa)) void spin_unlock_static(struct spinlock *l) UNLOCK_BODY(1)

static struct spinlock lock;
static volatile uint64_t counter;

__attribute__((noipa, aligned(64))) void run_multiverse(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        spin_lock(&lock);
        counter = counter + 1;
        spin_unlock(&lock);
    }
}

__attribute__((noipa, aligned(64))) void run_static(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        spin_lock_static(&lock);
        counter = counter + 1;
        spin_unlock_static(&lock);
    }
}

/* The lock compiled out: the bodies inlined with the constant. */
__attribute__((noipa, aligned(64))) void run_inlined(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        struct spinlock *l = &lock;
        LOCK_BODY(1);
        counter = counter + 1;
        UNLOCK_BODY(1);
    }
}

static double ns(void (*loop)(uint64_t), uint64_t n)
{
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    loop(n);
    clock_gettime(CLOCK_MONOTONIC, &b);
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (double)n;
}

static void check(int r, int expected)
{
    if (r != expected) {
        fprintf(stderr, "evolve: returned %d, expected %d: %s\n", r, expected,
                evolve_last_error());
        exit(1);
    }
}

int main(int argc, char **argv)
{
    uint64_t n = argc > 1 ? strtoull(argv[1], 0, 10) : 20000000;
    int runs = argc > 2 ? atoi(argv[2]) : 11;
    const char *only = argc > 3 ? argv[3] : 0;
    check(evolve_register(), 0);
    EVOLVE_SET(single_cpu, true);
    if (only) {
        if (!strcmp(only, "static"))
            run_static(n);
        else if (!strcmp(only, "inlined"))
            run_inlined(n);
        else if (!strcmp(only, "dynamic"))
            run_multiverse(n);
        else {
            check(evolve_commit_refs(single_cpu), 2);
            run_multiverse(n);
        }
        return 0;
    }
    for (int r = 0; r < runs; r++) {
        double st = ns(run_static, n);
        double dy = ns(run_multiverse, n);
        check(evolve_commit_refs(single_cpu), 2);
        double co = ns(run_multiverse, n);
        check(evolve_revert_refs(single_cpu), 2);
        double in = ns(run_inlined, n);
        printf("%.4f %.4f %.4f %.4f\n", st, dy, co, in);
    }
    if (counter != (uint64_t)runs * 4 * n) {
        fprintf(stderr, "counter %llu\n", (unsigned long long)counter);
        return 1;
    }
    return 0;
}
