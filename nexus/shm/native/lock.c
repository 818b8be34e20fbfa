/* Robust shared-memory lock; see lock.h for the protocol. */
#define _GNU_SOURCE
#include "lock.h"
#include "atomics.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* How many failed attempts between liveness checks of the holder: a check
 * reads /proc (about 10 us), so it is done rarely while the holder is busy. */
#define CHECK_EVERY 64

uint64_t nx_thread_id(void)
{
    return (uint64_t)syscall(SYS_gettid);
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

int nx_task_alive(uint64_t tid)
{
    char path[64];
    char text[512];

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
     * and may itself contain ')'. */
    char *end = strrchr(text, ')');
    if (end == NULL || end[1] == '\0' || end[2] == '\0')
        return 1;
    char state = end[2];
    return state != 'Z' && state != 'X' && state != 'x';
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
