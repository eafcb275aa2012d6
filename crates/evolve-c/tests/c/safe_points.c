/* Two hot functions switched together while every thread that calls evolve_safe_point() is
   held at one: no such thread sees one redirected and the other not. And a thread that does
   not come back to its safe point makes the change time out, naming it, with nothing changed. */
#include <evolve.h>

#include <pthread.h>
#include <unistd.h>

#include "common.h"

EVOLVE_HOT(int, version_a, (void)) { return 1; }
EVOLVE_HOT(int, version_b, (void)) { return 1; }
__attribute__((noinline)) int version_a2(void) { return 2; }
__attribute__((noinline)) int version_b2(void) { return 2; }

static volatile int stop;
static unsigned long loops[64], mismatches[64];

static void *worker(void *arg)
{
    long t = (long)arg;
    unsigned long n = 0, bad = 0;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        int a = version_a();
        int b = version_b();
        if (a != b)
            bad++;
        n++;
        evolve_safe_point();
    }
    loops[t] = n;
    mismatches[t] = bad;
    return 0;
}

static void *sleeper(void *arg)
{
    (void)arg;
    evolve_safe_point();
    sleep(2);
    return 0;
}

int main(int argc, char **argv)
{
    int threads = stress_threads();
    int rounds = argc > 1 ? atoi(argv[1]) : 200;
    EXPECT(evolve_start(), 0);
    struct evolve_redirection forward[2] = {EVOLVE_REDIRECTION(version_a, version_a2),
                                            EVOLVE_REDIRECTION(version_b, version_b2)};
    struct evolve_redirection back[2] = {EVOLVE_RESTORATION(version_a),
                                         EVOLVE_RESTORATION(version_b)};
    pthread_t t[64];
    for (long i = 0; i < threads; i++)
        pthread_create(&t[i], 0, worker, (void *)i);
    double deadline = seconds() + 30;
    int done = 0;
    for (; done < rounds && seconds() < deadline; done++) {
        EXPECT(evolve_redirect_all(forward, 2, 5000), 0);
        EXPECT(evolve_redirect_all(back, 2, 5000), 0);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    unsigned long total = 0, bad = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], 0);
        total += loops[i];
        bad += mismatches[i];
    }

    pthread_t s;
    pthread_create(&s, 0, sleeper, 0);
    usleep(200 * 1000);
    int refused = evolve_redirect_all(forward, 2, 200);
    printf("timeout_error: %s\n", evolve_last_error());
    int unchanged = version_a() == 1 && version_b() == 1;
    pthread_join(s, 0);
    printf("threads=%d rounds=%d loops=%lu mismatches=%lu timeout_refused=%d unchanged=%d\n",
           threads, done, total, bad, refused == -1, unchanged);
    return 0;
}
