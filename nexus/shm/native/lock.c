/* Robust shared-memory lock; see lock.h for the protocol. */
#define _GNU_SOURCE
#include "lock.h"
#include "atomics.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* How many failed attempts between liveness checks of the holder: a check
 * reads /proc (about 10 us), so it is done rarely while the holder is busy. */
#define CHECK_EVERY 64

/* Thread ids fit in 22 bits (the kernel's PID_MAX_LIMIT is 2^22); the 42
 * bits above hold the low bits of the thread's start time, so an id that
 * the kernel reused for a new thread does not pass for the old holder. */
#define TID_BITS 22
#define TID_MASK ((UINT64_C(1) << TID_BITS) - 1)
#define START_MASK ((UINT64_C(1) << (64 - TID_BITS)) - 1)

/* Read /proc/<tid>/stat: return 0 if the thread is gone or a zombie, else 1
 * with its start time (clock ticks after boot) in *start. */
static int read_task(uint64_t tid, uint64_t *start)
{
    char path[64];
    char text[1024];

    /* /proc/<tid>/stat exists for every thread, leader or not, even though
     * only leaders are listed in /proc. A SIGKILLed process stays as a zombie
     * until its parent reaps it, and a zombie holds nothing. */
    snprintf(path, sizeof path, "/proc/%llu/stat", (unsigned long long)tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? 0 : 1;
    ssize_t got = read(fd, text, sizeof text - 1);
    close(fd);
    if (got <= 0)
        return 0;
    text[got] = '\0';

    /* The state letter follows the command name, which is in parentheses
     * and may itself contain ')'. The start time is field 22 of the line,
     * the 20th after the state. */
    char *end = strrchr(text, ')');
    if (end == NULL || end[1] == '\0' || end[2] == '\0')
        return 1;
    char state = end[2];
    if (state == 'Z' || state == 'X' || state == 'x')
        return 0;
    char *field = end + 2;
    for (int skip = 0; skip < 19 && field != NULL; skip++) {
        field = strchr(field, ' ');
        if (field != NULL)
            field++;
    }
    *start = field != NULL ? strtoull(field, NULL, 10) : 0;
    return 1;
}

uint64_t nx_thread_id(void)
{
    /* Cached per thread, and recomputed after fork, when the id changes. */
    static __thread uint64_t cached_tid;
    static __thread uint64_t cached_identity;
    uint64_t tid = (uint64_t)syscall(SYS_gettid);
    if (tid != cached_tid) {
        uint64_t start = 0;
        read_task(tid, &start);
        cached_tid = tid;
        cached_identity = tid | ((start & START_MASK) << TID_BITS);
    }
    return cached_identity;
}

int nx_task_alive(uint64_t identity)
{
    uint64_t start = 0;
    if (!read_task(identity & TID_MASK, &start))
        return 0;
    /* An identity without a start time (a bare thread id) checks existence only. */
    uint64_t expected = identity >> TID_BITS;
    return expected == 0 || expected == (start & START_MASK);
}

static uint64_t clock_us(clockid_t clock)
{
    struct timespec now;
    clock_gettime(clock, &now);
    return (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_nsec / 1000u;
}

uint64_t nx_monotonic_us(void)
{
    return clock_us(CLOCK_MONOTONIC);
}

uint64_t nx_realtime_us(void)
{
    return clock_us(CLOCK_REALTIME);
}

static void back_off(unsigned attempt)
{
    if (attempt < 128) {
        nx_cpu_relax();
    } else if (attempt < 512) {
        sched_yield();
    } else {
        struct timespec pause = {0, 20000};  /* 20 us */
        nanosleep(&pause, NULL);
    }
}

/* Take the lock from `holder` if that thread no longer exists. */
static int take_from_dead(uint64_t *word, uint64_t holder, uint64_t me)
{
    if (nx_task_alive(holder))
        return 0;
    return nx_cas(word, &holder, me);
}

enum nx_lock_result nx_lock_acquire(uint64_t *word, uint64_t timeout_us)
{
    uint64_t me = nx_thread_id();
    uint64_t deadline = 0;

    for (unsigned attempt = 0;; attempt++) {
        uint64_t holder = 0;
        if (nx_cas(word, &holder, me))
            return NX_LOCK_ACQUIRED;
        if (holder == me)
            return NX_LOCK_SELF;

        if (attempt % CHECK_EVERY == CHECK_EVERY - 1 && take_from_dead(word, holder, me))
            return NX_LOCK_RECOVERED;

        if (deadline == 0)
            deadline = nx_monotonic_us() + timeout_us;
        if (timeout_us == 0 || (attempt % 16 == 0 && nx_monotonic_us() >= deadline)) {
            /* Giving up: first make sure the holder is not simply dead. */
            if (take_from_dead(word, holder, me))
                return NX_LOCK_RECOVERED;
            return NX_LOCK_TIMEOUT;
        }
        back_off(attempt);
    }
}

void nx_lock_release(uint64_t *word)
{
    nx_store(word, 0);
}
