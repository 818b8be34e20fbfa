/* A lock word in shared memory that survives a killed holder.
 *
 * The word holds 0 when free, or the identity of its holder: its Linux
 * thread id with the low bits of the thread's start time above it, so a
 * thread id reused by the kernel never passes for a dead holder. A waiter
 * that has spun for a while checks whether the holder still exists (a zombie
 * counts as dead) and, if not, takes the lock over with a compare-and-swap.
 * The caller learns that it recovered the lock and repairs whatever the dead
 * holder left half-done. multiprocessing.Lock and POSIX semaphores cannot do
 * this: they stay held forever when their holder is SIGKILLed.
 */
#ifndef NEXUS_LOCK_H
#define NEXUS_LOCK_H

#include <stdint.h>

enum nx_lock_result {
    NX_LOCK_ACQUIRED = 0,   /* taken normally */
    NX_LOCK_RECOVERED = 1,  /* taken over from a dead holder: repair first */
    NX_LOCK_TIMEOUT = 2,    /* a live holder kept it past the deadline */
    NX_LOCK_SELF = 3,       /* this thread already holds it */
};

/* Wait at most `timeout_us` microseconds; 0 makes one attempt (and takes
 * the lock over if its holder is dead). */
enum nx_lock_result nx_lock_acquire(uint64_t *word, uint64_t timeout_us);

void nx_lock_release(uint64_t *word);

/* True if `identity` (from nx_thread_id, or a bare thread id) names a
 * thread that is alive, not a zombie, and started when the identity says. */
int nx_task_alive(uint64_t identity);

/* The calling thread's identity, as stored in a held lock word. */
uint64_t nx_thread_id(void);

/* CLOCK_MONOTONIC and CLOCK_REALTIME in microseconds. */
uint64_t nx_monotonic_us(void);
uint64_t nx_realtime_us(void);

#endif
