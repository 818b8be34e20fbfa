/* Atomic operations on 64-bit words in shared memory.
 *
 * Every shared word is naturally aligned, so these compile to single
 * instructions: plain MOV / LOCK CMPXCHG / LOCK XADD on x86-64, and LDAR /
 * STLR / CAS or LDAXR-STLXR loops on aarch64. Acquire on loads and release
 * on stores is what the tables need: a reader that sees a published index
 * or state word also sees the bytes written before it.
 */
#ifndef NEXUS_ATOMICS_H
#define NEXUS_ATOMICS_H

#include <stdint.h>

_Static_assert(__atomic_always_lock_free(8, 0), "64-bit atomics must be lock-free on this platform");

static inline uint64_t nx_load(const uint64_t *word)
{
    return __atomic_load_n(word, __ATOMIC_ACQUIRE);
}

static inline uint64_t nx_load_relaxed(const uint64_t *word)
{
    return __atomic_load_n(word, __ATOMIC_RELAXED);
}

static inline void nx_store(uint64_t *word, uint64_t value)
{
    __atomic_store_n(word, value, __ATOMIC_RELEASE);
}

static inline void nx_store_relaxed(uint64_t *word, uint64_t value)
{
    __atomic_store_n(word, value, __ATOMIC_RELAXED);
}

/* On failure, *expected is updated to the value found. */
static inline int nx_cas(uint64_t *word, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(word, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static inline uint64_t nx_fetch_add(uint64_t *word, uint64_t delta)
{
    return __atomic_fetch_add(word, delta, __ATOMIC_ACQ_REL);
}

static inline void nx_fence_acquire(void)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
}

static inline void nx_fence_release(void)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void nx_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
