/*
 * evolve.h — Evolve for C programs: change a running program without restarting it.
 *
 *   cc $(pkg-config --cflags --libs evolve) prog.c
 *
 * What this header gives a C program (see docs/c.md for the whole story):
 *
 *   - the agent the `evolve` command talks to, and safe points:
 *       evolve_start(), evolve_stop(), evolve_safe_point();
 *   - hot functions, prepared with NOP padding the compiler reserves at their entry (zero cost
 *     until redirected, no stub), redirected to a new implementation while threads call them:
 *       EVOLVE_HOT(int, parse, (const char *s)) { ... }
 *       evolve_redirect(parse, parse_v2);  evolve_restore(parse);
 *   - multiverse without a compiler plugin: switches (bool, integer, enum) and functions
 *     compiled once generically and once per listed value of their switches, bound to the
 *     switches' current values at run time with the API of the multiverse paper's Table 1:
 *       EVOLVE_SWITCH_BOOL(single_cpu, false);
 *       EVOLVE_MULTIVERSE(void, spin_lock, (struct lock *l), (l), EVOLVE_BOOL(single_cpu)) {
 *           if (!single_cpu) while (__atomic_exchange_n(&l->held, 1, __ATOMIC_ACQUIRE)) ;
 *       }
 *       EVOLVE_SET(single_cpu, true); evolve_commit();
 *
 * Every function returns 0 (or a count) on success and -1 on failure, with the cause in
 * evolve_last_error(). A refused operation changes nothing.
 *
 * Declarations are placed in sections of the program (evolve_hot, evolve_switches,
 * evolve_multiverse) and read by the library at the first call that needs them: nothing runs
 * at start-up. Requires GCC >= 8 (or a compiler with patchable_function_entry, __VA_OPT__,
 * statement expressions and __typeof__) on x86-64 Linux.
 */
#ifndef EVOLVE_H
#define EVOLVE_H

/* Warnings about GNU extensions under -pedantic (__VA_OPT__, statement expressions) concern
   this header, not the program. */
#pragma GCC system_header

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The layout of the declarations below; the library refuses others with a named error. */
#define EVOLVE_ABI_VERSION 1
/* At most this many switches per multiversed function, values per switch, and variants. */
#define EVOLVE_MAX_SWITCHES 3
#define EVOLVE_MAX_VALUES 16
#define EVOLVE_MAX_VARIANTS 64

/* A function of any type, as the library receives it. */
typedef void (*evolve_fn)(void);

/* ------------------------------------------------------------------------------------------
 * Declarations the macros place in the program's sections (read by the library).
 * ------------------------------------------------------------------------------------------ */

struct evolve_hot_decl {
    uint32_t abi, size;
    const char *name;
    evolve_fn function;
    const char *file;
    uint32_t line, reserved;
};

struct evolve_switch_decl {
    uint32_t abi, size;
    const char *name;
    void *variable;
    uint32_t width, is_signed;
    const uint64_t *domain;
    uint32_t domain_len, reserved;
};

struct evolve_variant {
    evolve_fn function;
    uint64_t values[EVOLVE_MAX_SWITCHES];
};

struct evolve_multiverse_decl {
    uint32_t abi, size;
    const char *name;
    evolve_fn generic;
    const void *switches[EVOLVE_MAX_SWITCHES];
    uint32_t n_switches, n_variants;
    const struct evolve_variant *variants;
    const char *file;
    uint32_t line, reserved;
};

/* The declarations of one module (the executable, or a shared library), found through the
   linker's __start_/__stop_ symbols of each section. */
struct evolve_module {
    uint32_t abi, size;
    const struct evolve_hot_decl *const *hot, *const *hot_end;
    const struct evolve_switch_decl *const *switches, *const *switches_end;
    const struct evolve_multiverse_decl *const *multiverse, *const *multiverse_end;
};

extern const struct evolve_hot_decl *const __start_evolve_hot[]
    __attribute__((weak, visibility("hidden")));
extern const struct evolve_hot_decl *const __stop_evolve_hot[]
    __attribute__((weak, visibility("hidden")));
extern const struct evolve_switch_decl *const __start_evolve_switches[]
    __attribute__((weak, visibility("hidden")));
extern const struct evolve_switch_decl *const __stop_evolve_switches[]
    __attribute__((weak, visibility("hidden")));
extern const struct evolve_multiverse_decl *const __start_evolve_multiverse[]
    __attribute__((weak, visibility("hidden")));
extern const struct evolve_multiverse_decl *const __stop_evolve_multiverse[]
    __attribute__((weak, visibility("hidden")));

/* One per module: a weak definition in every translation unit, merged by the linker. */
__attribute__((weak, visibility("hidden"))) const struct evolve_module evolve__module = {
    EVOLVE_ABI_VERSION,
    sizeof(struct evolve_module),
    __start_evolve_hot,
    __stop_evolve_hot,
    __start_evolve_switches,
    __stop_evolve_switches,
    __start_evolve_multiverse,
    __stop_evolve_multiverse,
};

/* ------------------------------------------------------------------------------------------
 * The agent, safe points, errors.
 * ------------------------------------------------------------------------------------------ */

/* Starts the agent (a private Unix socket the `evolve` command finds: `evolve ps`) and
   registers this module's declarations. Idempotent. 0, or -1. */
int evolve_start_in(const struct evolve_module *module);
#define evolve_start() evolve_start_in(&evolve__module)

/* Stops the agent and removes its socket (also done at exit). */
void evolve_stop(void);

/* A place in a long-running loop where the thread may be held while a group of changes
   happens at once (evolve_redirect_all with a timeout). Costs a thread-local check and one
   atomic load. */
void evolve_safe_point(void);

/* Why the calling thread's last failed call failed ("" if none). Valid until its next call. */
const char *evolve_last_error(void);

/* What the calling thread's last commit or revert did: the functions changed, and switch
   values without a variant ("unmatched"). Valid until its next call. */
const char *evolve_last_report(void);

/* Registers this module's declarations (done by every call below). 0, or -1. */
int evolve_register_in(const struct evolve_module *module);
#define evolve_register() evolve_register_in(&evolve__module)

/* ------------------------------------------------------------------------------------------
 * Hot functions.
 * ------------------------------------------------------------------------------------------ */

#if defined(__has_attribute)
#if __has_attribute(noipa)
#define EVOLVE__NOIPA noipa
#endif
#endif
#ifndef EVOLVE__NOIPA
#define EVOLVE__NOIPA noinline
#endif

/* Entry padding: five one-byte NOPs before the entry and two at it (see docs/c.md, "How it
   works"); noipa: callers assume nothing of the body (it may be replaced), and it is never
   inlined, cloned or merged with another function. */
#define EVOLVE__PADDED \
    __attribute__((patchable_function_entry(7, 5), aligned(8), EVOLVE__NOIPA, used))

#define EVOLVE__UNPAREN(...) __VA_ARGS__
#define EVOLVE__SECOND(a, b, ...) b
/* `void` if the list is empty. */
#define EVOLVE__VOID_IF_EMPTY(...) EVOLVE__SECOND(__VA_OPT__(, ), void, )
#define EVOLVE__PROTO_(...) (__VA_ARGS__ EVOLVE__VOID_IF_EMPTY(__VA_ARGS__))
/* A prototype's parameter list from `(int a, int b)`, `(void)` or `()`. */
#define EVOLVE__PROTO(list) EVOLVE__PROTO_ list
#define EVOLVE__PREPEND_(first, ...) first __VA_OPT__(, __VA_ARGS__)
/* `first` followed by the elements of the parenthesised `list`. */
#define EVOLVE__PREPEND(first, list) EVOLVE__PREPEND_(first, EVOLVE__UNPAREN list)

/* One pointer to `decl` in section `in_section`: 8 bytes, so the section is an array with no holes. */
#define EVOLVE__REGISTER(in_section, decl)                                                   \
    static const void *const evolve__registered_##decl                                       \
        __attribute__((section(#in_section), used, aligned(sizeof(void *)))) = &decl

/* A hot function, e.g. EVOLVE_HOT(static int, parse, (const char *s)) { ... }.
   Until it is redirected a call costs two one-byte NOPs more than a plain function's. */
#define EVOLVE_HOT(ret, name, params)                                                        \
    EVOLVE__PADDED ret name EVOLVE__PROTO(params);                                           \
    static const struct evolve_hot_decl evolve__hot_##name = {                               \
        EVOLVE_ABI_VERSION, sizeof(struct evolve_hot_decl), #name, (evolve_fn)name,          \
        __FILE__,           __LINE__,                         0};                            \
    EVOLVE__REGISTER(evolve_hot, evolve__hot_##name);                                        \
    EVOLVE__PADDED ret name EVOLVE__PROTO(params)

/* Compile-time check that `a` and `b` are functions (or pointers to functions) of one type. */
#define EVOLVE__SAME_TYPE(a, b)                                                              \
    _Static_assert(__builtin_types_compatible_p(__typeof__(&*(a)), __typeof__(&*(b))),      \
                   "evolve: " #a " and " #b " must have the same function type")

/* Sends every call of the hot function `f` to `to`, a function of the same type (checked at
   compile time): direct calls in the executable call `to`, calls through pointers jump there
   from f's entry. Calls already running finish on the old code. Redirecting again replaces
   the target. 0, or -1 (f is not an EVOLVE_HOT function, `to` is not code, ...). */
int evolve_redirect_in(const struct evolve_module *module, evolve_fn f, evolve_fn to);
#define evolve_redirect(f, to)                                                               \
    __extension__({                                                                          \
        EVOLVE__SAME_TYPE(f, to);                                                            \
        evolve_redirect_in(&evolve__module, (evolve_fn)(f), (evolve_fn)(to));                \
    })

/* Puts every byte of the hot function `f` back: calls run its own code again. 0, or -1. */
int evolve_restore_in(const struct evolve_module *module, evolve_fn f);
#define evolve_restore(f) evolve_restore_in(&evolve__module, (evolve_fn)(f))

/* Where the hot function `f` is redirected to, or NULL. */
evolve_fn evolve_target_in(const struct evolve_module *module, evolve_fn f);
#define evolve_target(f) evolve_target_in(&evolve__module, (evolve_fn)(f))

/* One change of evolve_redirect_all: `to` NULL restores `function`. */
struct evolve_redirection {
    evolve_fn function;
    evolve_fn to;
};
#define EVOLVE_REDIRECTION(f, to)                                                            \
    __extension__({                                                                          \
        EVOLVE__SAME_TYPE(f, to);                                                            \
        (struct evolve_redirection){(evolve_fn)(f), (evolve_fn)(to)};                        \
    })
#define EVOLVE_RESTORATION(f) ((struct evolve_redirection){(evolve_fn)(f), 0})

/* Applies `n` changes in one step. With safe_point_timeout_ms > 0 the change happens while
   every thread that has called evolve_safe_point() is held at one, so none of them sees some
   functions changed and others not; if they do not all arrive in time nothing changes. */
int evolve_redirect_all_in(const struct evolve_module *module,
                           const struct evolve_redirection *changes, size_t n,
                           int safe_point_timeout_ms);
#define evolve_redirect_all(changes, n, safe_point_timeout_ms)                               \
    evolve_redirect_all_in(&evolve__module, changes, n, safe_point_timeout_ms)

/* ------------------------------------------------------------------------------------------
 * Multiverse: switches.
 * ------------------------------------------------------------------------------------------ */

#define EVOLVE__RAW_VALUE(name, i, v) (uint64_t)(__typeof__(name))(v),
#define EVOLVE__IS_SIGNED(name) ((__typeof__(name))-1 < (__typeof__(name))0)

/* A switch: the variable `name` of `type` (bool, an integer or an enum of 1, 2, 4 or 8 bytes;
   `static` allowed) with its initial value and its domain, the values it may take:
     EVOLVE_SWITCH(int, log_level, 1, 0, 1, 2, 3);
     EVOLVE_SWITCH(static enum mode, mode, MODE_OFF, MODE_OFF, MODE_FAST, MODE_SAFE);
   Read and write it with EVOLVE_GET and EVOLVE_SET (atomic, relaxed) from threads; commits
   read it once. */
#define EVOLVE_SWITCH(type, name, initial, ...)                                              \
    type name = (initial);                                                                   \
    _Static_assert(sizeof(name) == 1 || sizeof(name) == 2 || sizeof(name) == 4 ||            \
                       sizeof(name) == 8,                                                    \
                   "EVOLVE_SWITCH " #name ": a bool, integer or enum of 1, 2, 4 or 8 bytes"); \
    static const uint64_t evolve__domain_##name[] = {                                        \
        EVOLVE__FOR_A(EVOLVE__RAW_VALUE, name, __VA_ARGS__)};                                \
    static const struct evolve_switch_decl evolve__switch_##name = {                         \
        EVOLVE_ABI_VERSION,                                                                  \
        sizeof(struct evolve_switch_decl),                                                   \
        #name,                                                                               \
        (void *)&name,                                                                       \
        sizeof(name),                                                                        \
        EVOLVE__IS_SIGNED(name),                                                             \
        evolve__domain_##name,                                                               \
        sizeof(evolve__domain_##name) / sizeof(uint64_t),                                    \
        0};                                                                                  \
    EVOLVE__REGISTER(evolve_switches, evolve__switch_##name)

/* A bool switch: its domain is false, true. */
#define EVOLVE_SWITCH_BOOL(name, initial) EVOLVE_SWITCH(bool, name, initial, false, true)

/* The switch as other translation units see it: EVOLVE_SWITCH_EXTERN(int, log_level); */
#define EVOLVE_SWITCH_EXTERN(type, name) extern type name

#define EVOLVE_GET(sw) __atomic_load_n(&(sw), __ATOMIC_RELAXED)
#define EVOLVE_SET(sw, value) __atomic_store_n(&(sw), (value), __ATOMIC_RELAXED)

/* ------------------------------------------------------------------------------------------
 * Multiverse: functions.
 * ------------------------------------------------------------------------------------------ */
/* Iteration over value lists (three families, so that they nest). */
#define EVOLVE__NARGS_A(...) \
    EVOLVE__NARGS_A_(__VA_ARGS__, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define EVOLVE__NARGS_A_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, \
    _16, n, ...) n
#define EVOLVE__CAT_A(a, b) EVOLVE__CAT_A_(a, b)
#define EVOLVE__CAT_A_(a, b) a##b
#define EVOLVE__FOR_A(m, c, ...) \
    EVOLVE__CAT_A(EVOLVE__FA_, EVOLVE__NARGS_A(__VA_ARGS__))(m, c, __VA_ARGS__)
#define EVOLVE__FA_1(m, c, v0) m(c, 0, v0)
#define EVOLVE__FA_2(m, c, v0, v1) m(c, 0, v0) m(c, 1, v1)
#define EVOLVE__FA_3(m, c, v0, v1, v2) m(c, 0, v0) m(c, 1, v1) m(c, 2, v2)
#define EVOLVE__FA_4(m, c, v0, v1, v2, v3) m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3)
#define EVOLVE__FA_5(m, c, v0, v1, v2, v3, v4) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4)
#define EVOLVE__FA_6(m, c, v0, v1, v2, v3, v4, v5) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5)
#define EVOLVE__FA_7(m, c, v0, v1, v2, v3, v4, v5, v6) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6)
#define EVOLVE__FA_8(m, c, v0, v1, v2, v3, v4, v5, v6, v7) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7)
#define EVOLVE__FA_9(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8)
#define EVOLVE__FA_10(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9)
#define EVOLVE__FA_11(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10)
#define EVOLVE__FA_12(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11)
#define EVOLVE__FA_13(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12)
#define EVOLVE__FA_14(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13)
#define EVOLVE__FA_15(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13) m(c, 14, v14)
#define EVOLVE__FA_16(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13) m(c, 14, v14) m(c, 15, v15)

#define EVOLVE__NARGS_B(...) \
    EVOLVE__NARGS_B_(__VA_ARGS__, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define EVOLVE__NARGS_B_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, \
    _16, n, ...) n
#define EVOLVE__CAT_B(a, b) EVOLVE__CAT_B_(a, b)
#define EVOLVE__CAT_B_(a, b) a##b
#define EVOLVE__FOR_B(m, c, ...) \
    EVOLVE__CAT_B(EVOLVE__FB_, EVOLVE__NARGS_B(__VA_ARGS__))(m, c, __VA_ARGS__)
#define EVOLVE__FB_1(m, c, v0) m(c, 0, v0)
#define EVOLVE__FB_2(m, c, v0, v1) m(c, 0, v0) m(c, 1, v1)
#define EVOLVE__FB_3(m, c, v0, v1, v2) m(c, 0, v0) m(c, 1, v1) m(c, 2, v2)
#define EVOLVE__FB_4(m, c, v0, v1, v2, v3) m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3)
#define EVOLVE__FB_5(m, c, v0, v1, v2, v3, v4) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4)
#define EVOLVE__FB_6(m, c, v0, v1, v2, v3, v4, v5) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5)
#define EVOLVE__FB_7(m, c, v0, v1, v2, v3, v4, v5, v6) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6)
#define EVOLVE__FB_8(m, c, v0, v1, v2, v3, v4, v5, v6, v7) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7)
#define EVOLVE__FB_9(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8)
#define EVOLVE__FB_10(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9)
#define EVOLVE__FB_11(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10)
#define EVOLVE__FB_12(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11)
#define EVOLVE__FB_13(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12)
#define EVOLVE__FB_14(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13)
#define EVOLVE__FB_15(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13) m(c, 14, v14)
#define EVOLVE__FB_16(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13) m(c, 14, v14) m(c, 15, v15)

#define EVOLVE__NARGS_C(...) \
    EVOLVE__NARGS_C_(__VA_ARGS__, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define EVOLVE__NARGS_C_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, \
    _16, n, ...) n
#define EVOLVE__CAT_C(a, b) EVOLVE__CAT_C_(a, b)
#define EVOLVE__CAT_C_(a, b) a##b
#define EVOLVE__FOR_C(m, c, ...) \
    EVOLVE__CAT_C(EVOLVE__FC_, EVOLVE__NARGS_C(__VA_ARGS__))(m, c, __VA_ARGS__)
#define EVOLVE__FC_1(m, c, v0) m(c, 0, v0)
#define EVOLVE__FC_2(m, c, v0, v1) m(c, 0, v0) m(c, 1, v1)
#define EVOLVE__FC_3(m, c, v0, v1, v2) m(c, 0, v0) m(c, 1, v1) m(c, 2, v2)
#define EVOLVE__FC_4(m, c, v0, v1, v2, v3) m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3)
#define EVOLVE__FC_5(m, c, v0, v1, v2, v3, v4) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4)
#define EVOLVE__FC_6(m, c, v0, v1, v2, v3, v4, v5) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5)
#define EVOLVE__FC_7(m, c, v0, v1, v2, v3, v4, v5, v6) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6)
#define EVOLVE__FC_8(m, c, v0, v1, v2, v3, v4, v5, v6, v7) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7)
#define EVOLVE__FC_9(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8)
#define EVOLVE__FC_10(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9)
#define EVOLVE__FC_11(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10)
#define EVOLVE__FC_12(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11)
#define EVOLVE__FC_13(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12)
#define EVOLVE__FC_14(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13)
#define EVOLVE__FC_15(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13) m(c, 14, v14)
#define EVOLVE__FC_16(m, c, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15) \
    m(c, 0, v0) m(c, 1, v1) m(c, 2, v2) m(c, 3, v3) m(c, 4, v4) m(c, 5, v5) m(c, 6, v6) \
    m(c, 7, v7) m(c, 8, v8) m(c, 9, v9) m(c, 10, v10) m(c, 11, v11) m(c, 12, v12) \
    m(c, 13, v13) m(c, 14, v14) m(c, 15, v15)

/* A switch and the values a function is compiled for: EVOLVE_VALUES(log_level, 0, 3).
   A value outside the switch's domain is refused when the program registers. */
#define EVOLVE_VALUES(sw, ...) (sw, __VA_ARGS__)
/* A bool switch and both its values. */
#define EVOLVE_BOOL(sw) (sw, false, true)

/* A multiversed function: compiled once generically (it reads the switches at every call)
   and once per combination of the listed values (each read of a switch is a constant there,
   so the compiler removes what does not apply):
     EVOLVE_MULTIVERSE(int, work, (int x), (x), EVOLVE_BOOL(fast), EVOLVE_VALUES(level, 0, 3)) {
         return fast ? x : level * x;   // in the body, `fast` and `level` are the values
     }
   `params` is the parameter list in parentheses, `args` the parameter names in parentheses
   (`()` for both when there are none); then 1 to 3 switch specifications. At most 16 values
   per switch and 64 variants. The function has external linkage (EVOLVE_MULTIVERSE_STATIC:
   internal); it is called as usual and bound with evolve_commit() and the calls below. */
#define EVOLVE_MULTIVERSE(ret, name, params, args, ...)                                      \
    EVOLVE__MULTIVERSE(, ret, name, params, args, __VA_ARGS__)
#define EVOLVE_MULTIVERSE_STATIC(ret, name, params, args, ...)                               \
    EVOLVE__MULTIVERSE(static, ret, name, params, args, __VA_ARGS__)

#define EVOLVE__PICK_MV(a, b, c, m, ...) m
#define EVOLVE__MULTIVERSE(linkage, ret, name, params, args, ...)                            \
    EVOLVE__PICK_MV(__VA_ARGS__, EVOLVE__MV3, EVOLVE__MV2, EVOLVE__MV1, )                   \
    (linkage, ret, name, params, args, __VA_ARGS__)

#define EVOLVE__SW_NAME(sw, ...) sw
#define EVOLVE__SW_VALUES(sw, ...) __VA_ARGS__
#define EVOLVE__CALL_A(m, a) m a
#define EVOLVE__CALL_B(m, a) m a
#define EVOLVE__CALL_C(m, a) m a
#define EVOLVE__RAW(S, v) (uint64_t)(__typeof__(S))(v)
#define EVOLVE__BODY static inline __attribute__((always_inline))
/* The generated functions `return` the body's result, also when it is void (which -pedantic
   reports); the user's body after the macro is not affected. */
#define EVOLVE__QUIET_BEGIN                                                                  \
    _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wpedantic\"")
#define EVOLVE__QUIET_END _Pragma("GCC diagnostic pop")
#define EVOLVE__VARIANT static __attribute__((noinline, noclone, used))

/* The generic function (padded: commits redirect it), calling the body with `body_args`. */
#define EVOLVE__MV_GENERIC(linkage, ret, name, params, body_args)                            \
    linkage EVOLVE__PADDED ret name EVOLVE__PROTO(params);                                   \
    linkage EVOLVE__PADDED ret name EVOLVE__PROTO(params)                                    \
    {                                                                                        \
        return evolve__body_##name body_args;                                                \
    }

/* The declaration the library reads, after the variants' table. */
#define EVOLVE__MV_DECL(name, switches, n)                                                   \
    _Static_assert(sizeof(evolve__variants_##name) / sizeof(struct evolve_variant) <=        \
                       EVOLVE_MAX_VARIANTS,                                                  \
                   "EVOLVE_MULTIVERSE " #name ": more than 64 variants; list fewer values");  \
    static const struct evolve_multiverse_decl evolve__multiverse_##name = {                 \
        EVOLVE_ABI_VERSION,                                                                  \
        sizeof(struct evolve_multiverse_decl),                                               \
        #name,                                                                               \
        (evolve_fn)name,                                                                     \
        {EVOLVE__UNPAREN switches},                                                          \
        n,                                                                                   \
        sizeof(evolve__variants_##name) / sizeof(struct evolve_variant),                     \
        evolve__variants_##name,                                                             \
        __FILE__,                                                                            \
        __LINE__,                                                                            \
        0};                                                                                  \
    EVOLVE__REGISTER(evolve_multiverse, evolve__multiverse_##name);

/* One switch. */
#define EVOLVE__MV1(linkage, ret, name, params, args, s1)                                    \
    EVOLVE__MV1_(linkage, ret, name, params, args, EVOLVE__SW_NAME s1, s1)
#define EVOLVE__MV1_(linkage, ret, name, params, args, S1, s1)                               \
    EVOLVE__QUIET_BEGIN                                                                      \
    EVOLVE__BODY ret evolve__body_##name(EVOLVE__PREPEND(__typeof__(S1) S1, params));        \
    EVOLVE__MV_GENERIC(linkage, ret, name, params, (EVOLVE__PREPEND(EVOLVE_GET(S1), args)))  \
    EVOLVE__FOR_A(EVOLVE__MV1_VARIANT, (ret, name, params, args, S1), EVOLVE__SW_VALUES s1)  \
    static const struct evolve_variant evolve__variants_##name[] = {                         \
        EVOLVE__FOR_A(EVOLVE__MV1_ROW, (name, S1), EVOLVE__SW_VALUES s1)};                   \
    EVOLVE__MV_DECL(name, ((const void *)&S1), 1)                                            \
    EVOLVE__QUIET_END                                                                        \
    EVOLVE__BODY ret evolve__body_##name(EVOLVE__PREPEND(__typeof__(S1) S1, params))
#define EVOLVE__MV1_VARIANT(c, i, v) EVOLVE__CALL_A(EVOLVE__MV1_VARIANT_, (EVOLVE__UNPAREN c, i, v))
#define EVOLVE__MV1_VARIANT_(ret, name, params, args, S1, i, v)                              \
    EVOLVE__VARIANT ret evolve__variant_##name##_##i EVOLVE__PROTO(params)                   \
    {                                                                                        \
        return evolve__body_##name(EVOLVE__PREPEND((__typeof__(S1))(v), args));              \
    }
#define EVOLVE__MV1_ROW(c, i, v) EVOLVE__CALL_A(EVOLVE__MV1_ROW_, (EVOLVE__UNPAREN c, i, v))
#define EVOLVE__MV1_ROW_(name, S1, i, v)                                                     \
    {(evolve_fn)evolve__variant_##name##_##i, {EVOLVE__RAW(S1, v)}},

/* Two switches: the cross product of their values. */
#define EVOLVE__MV2(linkage, ret, name, params, args, s1, s2)                                \
    EVOLVE__MV2_(linkage, ret, name, params, args, EVOLVE__SW_NAME s1, s1, EVOLVE__SW_NAME s2, \
                 s2)
#define EVOLVE__MV2_(linkage, ret, name, params, args, S1, s1, S2, s2)                       \
    EVOLVE__QUIET_BEGIN                                                                      \
    EVOLVE__BODY ret evolve__body_##name(                                                    \
        EVOLVE__PREPEND(__typeof__(S1) S1, (EVOLVE__PREPEND(__typeof__(S2) S2, params))));   \
    EVOLVE__MV_GENERIC(                                                                      \
        linkage, ret, name, params,                                                          \
        (EVOLVE__PREPEND(EVOLVE_GET(S1), (EVOLVE__PREPEND(EVOLVE_GET(S2), args)))))          \
    EVOLVE__FOR_A(EVOLVE__MV2_OUTER, (ret, name, params, args, S1, S2, s2),                  \
                  EVOLVE__SW_VALUES s1)                                                      \
    static const struct evolve_variant evolve__variants_##name[] = {EVOLVE__FOR_A(           \
        EVOLVE__MV2_ROW_OUTER, (name, S1, S2, s2), EVOLVE__SW_VALUES s1)};                    \
    EVOLVE__MV_DECL(name, ((const void *)&S1, (const void *)&S2), 2)                         \
    EVOLVE__QUIET_END                                                                        \
    EVOLVE__BODY ret evolve__body_##name(                                                    \
        EVOLVE__PREPEND(__typeof__(S1) S1, (EVOLVE__PREPEND(__typeof__(S2) S2, params))))
#define EVOLVE__MV2_OUTER(c, i, v) EVOLVE__CALL_A(EVOLVE__MV2_OUTER_, (EVOLVE__UNPAREN c, i, v))
#define EVOLVE__MV2_OUTER_(ret, name, params, args, S1, S2, s2, i, v)                        \
    EVOLVE__FOR_B(EVOLVE__MV2_VARIANT, (ret, name, params, args, S1, S2, i, v),              \
                  EVOLVE__SW_VALUES s2)
#define EVOLVE__MV2_VARIANT(c, j, w) EVOLVE__CALL_B(EVOLVE__MV2_VARIANT_, (EVOLVE__UNPAREN c, j, w))
#define EVOLVE__MV2_VARIANT_(ret, name, params, args, S1, S2, i, v, j, w)                    \
    EVOLVE__VARIANT ret evolve__variant_##name##_##i##_##j EVOLVE__PROTO(params)             \
    {                                                                                        \
        return evolve__body_##name(EVOLVE__PREPEND(                                          \
            (__typeof__(S1))(v), (EVOLVE__PREPEND((__typeof__(S2))(w), args))));             \
    }
#define EVOLVE__MV2_ROW_OUTER(c, i, v)                                                       \
    EVOLVE__CALL_A(EVOLVE__MV2_ROW_OUTER_, (EVOLVE__UNPAREN c, i, v))
#define EVOLVE__MV2_ROW_OUTER_(name, S1, S2, s2, i, v)                                       \
    EVOLVE__FOR_B(EVOLVE__MV2_ROW, (name, S1, S2, i, v), EVOLVE__SW_VALUES s2)
#define EVOLVE__MV2_ROW(c, j, w) EVOLVE__CALL_B(EVOLVE__MV2_ROW_, (EVOLVE__UNPAREN c, j, w))
#define EVOLVE__MV2_ROW_(name, S1, S2, i, v, j, w)                                           \
    {(evolve_fn)evolve__variant_##name##_##i##_##j, {EVOLVE__RAW(S1, v), EVOLVE__RAW(S2, w)}},

/* Three switches. */
#define EVOLVE__MV3(linkage, ret, name, params, args, s1, s2, s3)                            \
    EVOLVE__MV3_(linkage, ret, name, params, args, EVOLVE__SW_NAME s1, s1, EVOLVE__SW_NAME s2, \
                 s2, EVOLVE__SW_NAME s3, s3)
#define EVOLVE__MV3_PARAMS(S1, S2, S3, params)                                               \
    EVOLVE__PREPEND(                                                                         \
        __typeof__(S1) S1,                                                                   \
        (EVOLVE__PREPEND(__typeof__(S2) S2, (EVOLVE__PREPEND(__typeof__(S3) S3, params)))))
#define EVOLVE__MV3_(linkage, ret, name, params, args, S1, s1, S2, s2, S3, s3)               \
    EVOLVE__QUIET_BEGIN                                                                      \
    EVOLVE__BODY ret evolve__body_##name(EVOLVE__MV3_PARAMS(S1, S2, S3, params));            \
    EVOLVE__MV_GENERIC(linkage, ret, name, params,                                           \
                       (EVOLVE__PREPEND(EVOLVE_GET(S1),                                      \
                                        (EVOLVE__PREPEND(EVOLVE_GET(S2),                     \
                                                         (EVOLVE__PREPEND(EVOLVE_GET(S3),    \
                                                                          args)))))))        \
    EVOLVE__FOR_A(EVOLVE__MV3_OUTER, (ret, name, params, args, S1, S2, S3, s2, s3),          \
                  EVOLVE__SW_VALUES s1)                                                      \
    static const struct evolve_variant evolve__variants_##name[] = {EVOLVE__FOR_A(           \
        EVOLVE__MV3_ROW_OUTER, (name, S1, S2, S3, s2, s3), EVOLVE__SW_VALUES s1)};            \
    EVOLVE__MV_DECL(name, ((const void *)&S1, (const void *)&S2, (const void *)&S3), 3)      \
    EVOLVE__QUIET_END                                                                        \
    EVOLVE__BODY ret evolve__body_##name(EVOLVE__MV3_PARAMS(S1, S2, S3, params))
#define EVOLVE__MV3_OUTER(c, i, v) EVOLVE__CALL_A(EVOLVE__MV3_OUTER_, (EVOLVE__UNPAREN c, i, v))
#define EVOLVE__MV3_OUTER_(ret, name, params, args, S1, S2, S3, s2, s3, i, v)                \
    EVOLVE__FOR_B(EVOLVE__MV3_MIDDLE, (ret, name, params, args, S1, S2, S3, s3, i, v),       \
                  EVOLVE__SW_VALUES s2)
#define EVOLVE__MV3_MIDDLE(c, j, w)                                                          \
    EVOLVE__CALL_B(EVOLVE__MV3_MIDDLE_, (EVOLVE__UNPAREN c, j, w))
#define EVOLVE__MV3_MIDDLE_(ret, name, params, args, S1, S2, S3, s3, i, v, j, w)             \
    EVOLVE__FOR_C(EVOLVE__MV3_VARIANT, (ret, name, params, args, S1, S2, S3, i, v, j, w),    \
                  EVOLVE__SW_VALUES s3)
#define EVOLVE__MV3_VARIANT(c, k, x) EVOLVE__CALL_C(EVOLVE__MV3_VARIANT_, (EVOLVE__UNPAREN c, k, x))
#define EVOLVE__MV3_VARIANT_(ret, name, params, args, S1, S2, S3, i, v, j, w, k, x)          \
    EVOLVE__VARIANT ret evolve__variant_##name##_##i##_##j##_##k EVOLVE__PROTO(params)       \
    {                                                                                        \
        return evolve__body_##name(EVOLVE__PREPEND(                                          \
            (__typeof__(S1))(v),                                                             \
            (EVOLVE__PREPEND((__typeof__(S2))(w), (EVOLVE__PREPEND((__typeof__(S3))(x),      \
                                                                   args))))));               \
    }
#define EVOLVE__MV3_ROW_OUTER(c, i, v)                                                       \
    EVOLVE__CALL_A(EVOLVE__MV3_ROW_OUTER_, (EVOLVE__UNPAREN c, i, v))
#define EVOLVE__MV3_ROW_OUTER_(name, S1, S2, S3, s2, s3, i, v)                               \
    EVOLVE__FOR_B(EVOLVE__MV3_ROW_MIDDLE, (name, S1, S2, S3, s3, i, v), EVOLVE__SW_VALUES s2)
#define EVOLVE__MV3_ROW_MIDDLE(c, j, w)                                                      \
    EVOLVE__CALL_B(EVOLVE__MV3_ROW_MIDDLE_, (EVOLVE__UNPAREN c, j, w))
#define EVOLVE__MV3_ROW_MIDDLE_(name, S1, S2, S3, s3, i, v, j, w)                            \
    EVOLVE__FOR_C(EVOLVE__MV3_ROW, (name, S1, S2, S3, i, v, j, w), EVOLVE__SW_VALUES s3)
#define EVOLVE__MV3_ROW(c, k, x) EVOLVE__CALL_C(EVOLVE__MV3_ROW_, (EVOLVE__UNPAREN c, k, x))
#define EVOLVE__MV3_ROW_(name, S1, S2, S3, i, v, j, w, k, x)                                 \
    {(evolve_fn)evolve__variant_##name##_##i##_##j##_##k,                                     \
     {EVOLVE__RAW(S1, v), EVOLVE__RAW(S2, w), EVOLVE__RAW(S3, x)}},

/* ------------------------------------------------------------------------------------------
 * Multiverse: the API of the paper's Table 1. Each returns the number of functions whose
 * code changed, or -1; evolve_last_report() says which, and which switch values had no
 * variant (those functions run their generic code). Safe while other threads call the
 * functions: every call runs the old binding or the new one.
 * ------------------------------------------------------------------------------------------ */

/* Binds every multiversed function to its switches' current values. */
int evolve_commit_in(const struct evolve_module *module);
#define evolve_commit() evolve_commit_in(&evolve__module)
/* Restores the generic code of every multiversed function. */
int evolve_revert_in(const struct evolve_module *module);
#define evolve_revert() evolve_revert_in(&evolve__module)
/* Only the functions specialised on the switch `sw` (the variable itself). */
int evolve_commit_refs_in(const struct evolve_module *module, const void *sw);
#define evolve_commit_refs(sw) evolve_commit_refs_in(&evolve__module, (const void *)&(sw))
int evolve_revert_refs_in(const struct evolve_module *module, const void *sw);
#define evolve_revert_refs(sw) evolve_revert_refs_in(&evolve__module, (const void *)&(sw))
/* Only the multiversed function `f`. */
int evolve_commit_fn_in(const struct evolve_module *module, evolve_fn f);
#define evolve_commit_fn(f) evolve_commit_fn_in(&evolve__module, (evolve_fn)(f))
int evolve_revert_fn_in(const struct evolve_module *module, evolve_fn f);
#define evolve_revert_fn(f) evolve_revert_fn_in(&evolve__module, (evolve_fn)(f))
/* 1 if `f` runs a variant, 0 if its generic code, -1 if it is not multiversed. */
int evolve_is_committed_in(const struct evolve_module *module, evolve_fn f);
#define evolve_is_committed(f) evolve_is_committed_in(&evolve__module, (evolve_fn)(f))

#ifdef __cplusplus
}
#endif

#endif /* EVOLVE_H */
