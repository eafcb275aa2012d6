/* Helpers of the C test programs. */
#ifndef EVOLVE_TEST_COMMON_H
#define EVOLVE_TEST_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(cond, ...)                                                                     \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);         \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fprintf(stderr, "\n");                                                           \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

/* Fails with evolve_last_error() unless `call` returns `expected`. */
#define EXPECT(call, expected)                                                               \
    do {                                                                                     \
        long got_ = (long)(call);                                                            \
        CHECK(got_ == (long)(expected), "%s returned %ld, expected %ld: %s", #call, got_,     \
              (long)(expected), evolve_last_error());                                        \
    } while (0)

static inline int stress_threads(void)
{
    const char *v = getenv("EVOLVE_STRESS_THREADS");
    int n = v ? atoi(v) : 4;
    return n > 0 && n <= 64 ? n : 4;
}

static inline double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The code bytes from `before` bytes before `f` on, as hex. */
static inline void hex_bytes(const void *f, int before, int n, char *out)
{
    const unsigned char *p = (const unsigned char *)f - before;
    for (int i = 0; i < n; i++)
        sprintf(out + 2 * i, "%02x", p[i]);
}

/* The target of the direct call or jump (e8/e9 rel32) at `code + at`. */
static inline long branch_target(const unsigned char *code, int at)
{
    int32_t rel;
    memcpy(&rel, code + at + 1, 4);
    return (long)(code + at + 5) + rel;
}

/* The offset of the first e8/e9 rel32 in `code[0..len)` that targets `target`, or -1. */
static inline int find_branch(const void *code, int len, const void *target)
{
    const unsigned char *c = code;
    for (int i = 0; i + 5 <= len; i++)
        if ((c[i] == 0xe8 || c[i] == 0xe9) && branch_target(c, i) == (long)target)
            return i;
    return -1;
}

#endif
