/* Every call of the multiverse paper's Table 1 with its semantics, the hot-function calls, and
   every refusal with its cause, the program unchanged after each. Prints table1=ok. */
#include <evolve.h>

#include "common.h"

struct lock {
    int held;
};
enum mode { MODE_OFF, MODE_FAST, MODE_SAFE };

EVOLVE_SWITCH_BOOL(single_cpu, false);
EVOLVE_SWITCH(int, level, 1, 0, 1, 2, 3);
EVOLVE_SWITCH(static enum mode, mode, MODE_OFF, MODE_OFF, MODE_FAST, MODE_SAFE);

EVOLVE_MULTIVERSE(void, spin_lock, (struct lock * l), (l), EVOLVE_BOOL(single_cpu))
{
    if (!single_cpu)
        while (__atomic_exchange_n(&l->held, 1, __ATOMIC_ACQUIRE))
            ;
}

EVOLVE_MULTIVERSE(void, spin_unlock, (struct lock * l), (l), EVOLVE_BOOL(single_cpu))
{
    if (!single_cpu)
        __atomic_store_n(&l->held, 0, __ATOMIC_RELEASE);
}

/* Partial specialisation: only levels 0 and 3 have variants. */
EVOLVE_MULTIVERSE(int, scaled, (int x), (x), EVOLVE_VALUES(level, 0, 3)) { return level * x; }

/* No parameters, internal linkage, an enum switch. */
EVOLVE_MULTIVERSE_STATIC(int, moded, (), (), EVOLVE_VALUES(mode, MODE_OFF, MODE_FAST, MODE_SAFE))
{
    return mode == MODE_OFF ? 0 : mode == MODE_FAST ? 10 : 20;
}

/* Three switches. */
EVOLVE_MULTIVERSE(int, combo, (int x), (x), EVOLVE_BOOL(single_cpu), EVOLVE_VALUES(level, 1, 2),
                  EVOLVE_VALUES(mode, MODE_OFF, MODE_SAFE))
{
    return x + (single_cpu ? 1000 : 0) + level * 100 + (int)mode;
}

EVOLVE_HOT(int, hot_fn, (int x)) { return x + 1; }
__attribute__((noinline)) int hot_fn_v2(int x) { return x + 2; }
__attribute__((noinline)) int plain(int x) { return x + 3; }

static struct lock the_lock;
int not_a_switch;
static const char data[16];

__attribute__((noinline)) void caller_lock(void)
{
    spin_lock(&the_lock);
    __asm__ volatile("" ::: "memory");
}

static void expect_error(int result, const char *needle, const char *what)
{
    CHECK(result == -1, "%s: returned %d, expected -1", what, result);
    CHECK(strstr(evolve_last_error(), needle), "%s: error \"%s\" does not say \"%s\"", what,
          evolve_last_error(), needle);
    printf("refused %s: %s\n", what, evolve_last_error());
}

int main(void)
{
    EXPECT(evolve_start(), 0);
    EXPECT(evolve_start(), 0); /* idempotent */
    int site = find_branch((void *)caller_lock, 64, (void *)spin_lock);
    CHECK(site >= 0, "no call of spin_lock in caller_lock");
    char site_bytes[16];

    /* Before any commit: generic code, which follows the switches at once. */
    EXPECT(evolve_is_committed(spin_lock), 0);
    EVOLVE_SET(level, 3);
    EXPECT(scaled(2), 6);
    EVOLVE_SET(level, 2);
    EXPECT(scaled(2), 4);

    /* commit: every function with a variant for the current values. */
    EVOLVE_SET(single_cpu, false);
    EVOLVE_SET(level, 3);
    EVOLVE_SET(mode, MODE_FAST);
    EXPECT(evolve_commit(), 4); /* spin_lock, spin_unlock, scaled, moded; not combo */
    CHECK(strstr(evolve_last_report(), "unmatched: [combo: level=3, combo: mode=1]"), "report: %s",
          evolve_last_report());
    EXPECT(evolve_is_committed(spin_lock), 1);
    EXPECT(evolve_is_committed(spin_unlock), 1);
    EXPECT(evolve_is_committed(scaled), 1);
    EXPECT(evolve_is_committed(moded), 1);
    EXPECT(evolve_is_committed(combo), 0);
    spin_lock(&the_lock);
    CHECK(the_lock.held == 1, "the committed spin_lock (generic false) takes the lock");
    spin_unlock(&the_lock);
    EXPECT(evolve_commit(), 0); /* nothing changes */

    /* A committed function keeps its binding when the switch changes. */
    EVOLVE_SET(level, 0);
    EVOLVE_SET(mode, MODE_SAFE);
    EXPECT(scaled(2), 6);
    EXPECT(moded(), 10);
    EXPECT(combo(1), 1 + 0 + 2); /* generic: reads the switches */

    /* commit_refs: only the functions specialised on `level`. */
    EXPECT(evolve_commit_refs(level), 1); /* scaled -> level 0; combo has no level 0 */
    EXPECT(scaled(2), 0);
    EXPECT(moded(), 10);
    EXPECT(evolve_is_committed(combo), 0);

    /* commit_fn: only `moded`. */
    EXPECT(evolve_commit_fn(moded), 1);
    EXPECT(moded(), 20);
    EVOLVE_SET(level, 1);
    EXPECT(evolve_commit_fn(combo), 1); /* false, 1, SAFE */
    EXPECT(combo(1), 1 + 100 + 2);
    EVOLVE_SET(level, 2);
    EXPECT(combo(1), 1 + 100 + 2);

    /* revert_refs: the functions of `single_cpu` (spin_lock, spin_unlock, combo). */
    EXPECT(evolve_revert_refs(single_cpu), 3);
    EXPECT(evolve_is_committed(spin_lock), 0);
    EXPECT(evolve_is_committed(combo), 0);
    EXPECT(evolve_is_committed(scaled), 1);
    EXPECT(combo(1), 1 + 200 + 2);

    /* revert_fn: only `scaled`, which follows `level` again. */
    EXPECT(evolve_revert_fn(scaled), 1);
    EXPECT(scaled(2), 4);
    EXPECT(evolve_is_committed(moded), 1);

    /* revert: the rest (moded). */
    EXPECT(evolve_revert(), 1);
    EXPECT(evolve_is_committed(moded), 0);
    EXPECT(evolve_revert(), 0);

    /* An empty variant: its direct call sites become 5-byte NOPs, and come back. */
    EVOLVE_SET(level, 3); /* combo has no variant for it: only the locks change */
    EVOLVE_SET(single_cpu, true);
    EXPECT(evolve_commit_refs(single_cpu), 2);
    hex_bytes((const char *)caller_lock + site + 5, 5, 5, site_bytes);
    const unsigned char *empty = (const unsigned char *)evolve__variant_spin_lock_1;
    if (empty[0] == 0xc3 || (empty[0] == 0xf3 && empty[4] == 0xc3)) /* [endbr64;] ret */
        CHECK(strcmp(site_bytes, "0f1f440000") == 0, "the call site holds %s", site_bytes);
    else /* -O0: the empty variant still builds a frame; the site calls it */
        CHECK(branch_target((const unsigned char *)caller_lock, site) == (long)empty,
              "the call site holds %s", site_bytes);
    the_lock.held = 0;
    caller_lock();
    spin_lock(&the_lock); /* through the entry: the empty variant */
    CHECK(the_lock.held == 0, "elided");
    EXPECT(evolve_revert_refs(single_cpu), 2);
    CHECK(branch_target((const unsigned char *)caller_lock, site) == (long)spin_lock,
          "the call site calls spin_lock again");
    printf("nop_call_site=1\n");
    EVOLVE_SET(level, 2);

    /* Hot functions. */
    EXPECT(evolve_restore(hot_fn), 0); /* never redirected: nothing to do */
    EXPECT(evolve_redirect(hot_fn, hot_fn_v2), 0);
    EXPECT(hot_fn(1), 3);
    EXPECT(evolve_redirect(hot_fn, hot_fn), 0); /* to itself: restored */
    EXPECT(hot_fn(1), 2);
    CHECK(evolve_target(hot_fn) == 0, "no target");

    /* Refusals: each names its cause and changes nothing. */
    expect_error(evolve_commit_refs(not_a_switch), "`not_a_switch`", "commit_refs(not a switch)");
    expect_error(evolve_revert_refs(not_a_switch), "is not a switch", "revert_refs(not a switch)");
    expect_error(evolve_commit_fn(plain), "`plain`", "commit_fn(plain)");
    expect_error(evolve_commit_fn(plain), "is not a multiversed function", "commit_fn(plain)");
    expect_error(evolve_revert_fn(plain), "is not a multiversed function", "revert_fn(plain)");
    expect_error(evolve_is_committed(plain), "is not a multiversed function",
                 "is_committed(plain)");
    expect_error(evolve_redirect(plain, hot_fn_v2), "is not a hot function", "redirect(plain)");
    expect_error(evolve_restore(scaled), "is not a hot function", "restore(multiversed)");
    expect_error(evolve_redirect_in(&evolve__module, (evolve_fn)hot_fn, (evolve_fn)(void *)data),
                 "not in executable memory", "redirect(to data)");
    expect_error(evolve_redirect_in(&evolve__module, (evolve_fn)hot_fn, 0),
                 "not in executable memory", "redirect(to NULL)");
    EXPECT(hot_fn(1), 2);
    struct evolve_redirection both[2] = {EVOLVE_REDIRECTION(hot_fn, hot_fn_v2),
                                         EVOLVE_REDIRECTION(plain, hot_fn_v2)};
    expect_error(evolve_redirect_all(both, 2, 0), "is not a hot function",
                 "redirect_all(one bad)");
    EXPECT(hot_fn(1), 2); /* the good change was not applied either */
    expect_error(evolve_redirect_all(0, 1, 0), "null", "redirect_all(null)");
    EXPECT(evolve_redirect_all(both, 1, 0), 0);
    EXPECT(hot_fn(1), 3);
    struct evolve_redirection back[1] = {EVOLVE_RESTORATION(hot_fn)};
    EXPECT(evolve_redirect_all(back, 1, 0), 0);
    EXPECT(hot_fn(1), 2);

    CHECK(strcmp(evolve_last_error(), "") == 0, "no error after a success");
    EXPECT(scaled(2), 4);
    EXPECT(moded(), 20);
    printf("table1=ok\n");
    evolve_stop();
    return 0;
}
