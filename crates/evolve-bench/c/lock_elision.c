/* c-lock-elision: single-threaded lock elision as the multiverse paper did for musl's fputc and
   malloc. A stdio-like buffer and a bump allocator each take a lock; the lock functions are
   multiversed on `threaded`, so while one thread runs the committed variant removes them (their
   call sites become 5-byte NOPs), and spawn() restores them before a second thread starts.
   Timed against the always-locked build in the same run.

   Usage: lock_elision ITERS RUNS [only]; prints per run (ns per call):
     fputc_locked fputc_dynamic fputc_committed malloc_locked malloc_dynamic malloc_committed
   then "second_thread locks_restored=B all_writes_counted=B elided_again=B".
   With `only` (locked|dynamic|committed) runs those loops once, for callgrind. */
#include <evolve.h>

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct lock {
    int held;
};

EVOLVE_SWITCH_BOOL(threaded, true);

#define LOCK_BODY(on)                                                                        \
    {                                                                                        \
        if (on)                                                                              \
            while (__atomic_exchange_n(&l->held, 1, __ATOMIC_ACQUIRE))                       \
                __builtin_ia32_pause();                                                      \
    }
#define UNLOCK_BODY(on)                                                                      \
    {                                                                                        \
        if (on)                                                                              \
            __atomic_store_n(&l->held, 0, __ATOMIC_RELEASE);                                 \
    }

EVOLVE_MULTIVERSE(void, lock, (struct lock * l), (l), EVOLVE_BOOL(threaded)) LOCK_BODY(threaded)
EVOLVE_MULTIVERSE(void, unlock, (struct lock * l), (l), EVOLVE_BOOL(threaded))
UNLOCK_BODY(threaded)

/* The always-locked build. */
__attribute__((noinline)) void lock_always(struct lock *l) LOCK_BODY(1)
__attribute__((noinline)) void unlock_always(struct lock *l) UNLOCK_BODY(1)

static struct lock file_lock, heap_lock;

#define BUF 4096
static unsigned char buffer[BUF];
static size_t pos;
static uint64_t flushed;

/* fputc's body: append, "write" the buffer out when full (the lock orders these). */
static inline void buf_putc(int c)
{
    buffer[pos] = (unsigned char)c;
    if (++pos == BUF) {
        flushed++;
        pos = 0;
    }
}

static size_t heap_top;

/* A bump malloc's body: round up, take, wrap around a 1 MiB arena. */
static inline size_t bump_malloc(size_t size)
{
    size = (size + 15) & ~(size_t)15;
    size_t next = heap_top + size > (1 << 20) ? size : heap_top + size;
    heap_top = next;
    return next - size;
}

__attribute__((noipa)) int my_fputc(int c)
{
    lock(&file_lock);
    buf_putc(c);
    unlock(&file_lock);
    return c;
}

__attribute__((noipa)) int my_fputc_locked(int c)
{
    lock_always(&file_lock);
    buf_putc(c);
    unlock_always(&file_lock);
    return c;
}

__attribute__((noipa)) size_t my_malloc(size_t size)
{
    lock(&heap_lock);
    size_t p = bump_malloc(size);
    unlock(&heap_lock);
    return p;
}

__attribute__((noipa)) size_t my_malloc_locked(size_t size)
{
    lock_always(&heap_lock);
    size_t p = bump_malloc(size);
    unlock_always(&heap_lock);
    return p;
}

static void check(int r, int expected)
{
    if (r != expected) {
        fprintf(stderr, "evolve: returned %d, expected %d: %s\n", r, expected,
                evolve_last_error());
        exit(1);
    }
}

/* Starts a thread, restoring the locks first if the program was single-threaded (musl sets its
   threads_minus_1 the same way); the commit completes before the thread exists. */
static int spawn(pthread_t *t, void *(*f)(void *), void *arg)
{
    if (!EVOLVE_GET(threaded)) {
        EVOLVE_SET(threaded, true);
        check(evolve_commit_refs(threaded), 2);
    }
    return pthread_create(t, 0, f, arg);
}

/* Back to one thread (after joining the others): elide the locks again. */
static void single_threaded(void)
{
    EVOLVE_SET(threaded, false);
    check(evolve_commit_refs(threaded), 2);
}

__attribute__((noipa, aligned(64))) void putc_loop(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        my_fputc((int)i);
}
__attribute__((noipa, aligned(64))) void putc_locked_loop(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        my_fputc_locked((int)i);
}
static volatile size_t sink;
__attribute__((noipa, aligned(64))) void malloc_loop(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        sink = my_malloc(i & 255);
}
__attribute__((noipa, aligned(64))) void malloc_locked_loop(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        sink = my_malloc_locked(i & 255);
}

static double ns(void (*loop)(uint64_t), uint64_t n)
{
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    loop(n);
    clock_gettime(CLOCK_MONOTONIC, &b);
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (double)n;
}

static uint64_t written(void) { return flushed * BUF + pos; }

static void *second(void *arg)
{
    putc_loop((uint64_t)(uintptr_t)arg);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t n = argc > 1 ? strtoull(argv[1], 0, 10) : 10000000;
    int runs = argc > 2 ? atoi(argv[2]) : 11;
    const char *only = argc > 3 ? argv[3] : 0;
    check(evolve_register(), 0);
    if (only) {
        EVOLVE_SET(threaded, false);
        if (!strcmp(only, "locked")) {
            putc_locked_loop(n);
            malloc_locked_loop(n);
        } else if (!strcmp(only, "dynamic")) {
            putc_loop(n);
            malloc_loop(n);
        } else {
            single_threaded();
            putc_loop(n);
            malloc_loop(n);
        }
        return 0;
    }
    for (int r = 0; r < runs; r++) {
        EVOLVE_SET(threaded, false); /* one thread, not committed: the generic code branches */
        double pl = ns(putc_locked_loop, n), pd = ns(putc_loop, n);
        double ml = ns(malloc_locked_loop, n), md = ns(malloc_loop, n);
        single_threaded();
        double pc = ns(putc_loop, n), mc = ns(malloc_loop, n);
        check(evolve_revert_refs(threaded), 2);
        printf("%.4f %.4f %.4f %.4f %.4f %.4f\n", pl, pd, pc, ml, md, mc);
    }

    /* A second thread: the locks come back, and both threads' writes are all counted. */
    single_threaded();
    uint64_t before = written(), per_thread = 200000;
    pthread_t t;
    if (spawn(&t, second, (void *)(uintptr_t)per_thread) != 0)
        return 1;
    putc_loop(per_thread);
    pthread_join(t, 0);
    int restored = EVOLVE_GET(threaded) && evolve_is_committed(lock) == 1;
    int exact = written() - before == 2 * per_thread;
    single_threaded();
    int again = evolve_is_committed(lock) == 1 && !EVOLVE_GET(threaded);
    check(evolve_revert_refs(threaded), 2);
    printf("second_thread locks_restored=%d all_writes_counted=%d elided_again=%d\n", restored,
           exact, again);
    return 0;
}
