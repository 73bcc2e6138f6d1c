/*
 * zhuge lab guest workload: keeps memory resident and dirties a working set at a set rate.
 *
 * Runs as the guest's only program (started by /init). Controlled over a serial
 * line (default /dev/ttyS1) with one command per line:
 *
 *   set mem=<MB> wss=<MB> rate=<MB/s> cpu=<percent> pattern=<seq|rand>
 *   stat
 *
 * Any subset of the keys may be given. `mem` MB are allocated and filled with
 * non-zero bytes (what pre-copy has to send: QEMU skips zero pages); the first
 * `wss` MB of them are the writable working set, dirtied at `rate` MB/s, one
 * word per 4 KiB page, cycling through the set (`seq`: so the distinct pages
 * dirtied over t seconds are min(wss, rate * t)) or at random pages (`rand`).
 * `cpu` is an extra busy-loop share of each 100 ms period. Every second, and
 * after each command, a line goes back:
 *
 *   stat t=<monotonic s> pages=<pages written since start> rate=<MB/s last second>
 *        mem=<MB> wss=<MB> target=<MB/s> cpu=<%> pattern=<seq|rand>
 *
 * Plain C99 + POSIX, built static by lab/image.py with the system compiler.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MB (1024UL * 1024UL)
#define TICK_NS 10000000L /* 10 ms pacing */

static unsigned char *mem_base;
static size_t mem_pages, wss_pages;
static double target_mbps, cpu_pct;
static int random_pattern;
static size_t cursor;
static uint64_t written, written_at_last_stat;
static uint64_t rng = 88172645463325252ULL;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t xorshift(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void resize(size_t mb) {
    size_t pages = mb * MB / PAGE;
    if (pages == mem_pages) return;
    if (mem_base) munmap(mem_base, mem_pages * PAGE);
    mem_base = NULL;
    mem_pages = 0;
    if (pages == 0) return;
    void *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "workload: cannot map %zu MB: %s\n", mb, strerror(errno));
        return;
    }
    mem_base = p;
    mem_pages = pages;
    for (size_t i = 0; i < pages; i++) memset(mem_base + i * PAGE, 0x5a, PAGE); /* non-zero: pre-copy sends it */
}

static void dirty(size_t n) {
    size_t set = wss_pages < mem_pages ? wss_pages : mem_pages;
    if (set == 0) return;
    for (size_t k = 0; k < n; k++) {
        size_t page = random_pattern ? (size_t)(xorshift() % set) : (cursor++ % set);
        volatile uint64_t *w = (volatile uint64_t *)(mem_base + page * PAGE + (written % (PAGE / 8)) * 8);
        *w = *w + 1 + written;
        written++;
    }
}

static void burn_until(double t_end) {
    volatile uint64_t x = 0;
    while (now_s() < t_end) x += xorshift();
}

static void report(int fd, double t, double rate) {
    char line[256];
    int n = snprintf(line, sizeof line,
                     "stat t=%.3f pages=%llu rate=%.3f mem=%zu wss=%zu target=%.3f cpu=%.1f pattern=%s\n", t,
                     (unsigned long long)written, rate, mem_pages * PAGE / MB, wss_pages * PAGE / MB, target_mbps,
                     cpu_pct, random_pattern ? "rand" : "seq");
    if (n > 0 && write(fd, line, (size_t)n) < 0) { /* the host may not be listening: keep going */ }
}

static void command(char *line) {
    char *save = NULL;
    char *word = strtok_r(line, " \t\r\n", &save);
    if (!word || strcmp(word, "set") != 0) return;
    while ((word = strtok_r(NULL, " \t\r\n", &save))) {
        char *eq = strchr(word, '=');
        if (!eq) continue;
        *eq = 0;
        const char *key = word, *val = eq + 1;
        if (!strcmp(key, "mem")) resize((size_t)atol(val));
        else if (!strcmp(key, "wss")) wss_pages = (size_t)atol(val) * MB / PAGE;
        else if (!strcmp(key, "rate")) target_mbps = atof(val);
        else if (!strcmp(key, "cpu")) cpu_pct = atof(val);
        else if (!strcmp(key, "pattern")) random_pattern = !strcmp(val, "rand");
    }
}

static int open_tty(const char *path) {
    int fd = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return -1;
    struct termios t;
    if (tcgetattr(fd, &t) == 0) {
        cfmakeraw(&t);
        cfsetispeed(&t, B115200);
        cfsetospeed(&t, B115200);
        tcsetattr(fd, TCSANOW, &t);
    }
    return fd;
}

int main(int argc, char **argv) {
    const char *tty = "/dev/ttyS1";
    char init[256] = "set";
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "--tty=", 6)) tty = argv[i] + 6;
        else if (strlen(init) + strlen(argv[i]) + 2 < sizeof init) {
            strcat(init, " ");
            strcat(init, argv[i]);
        }
    }
    command(init);
    int fd = open_tty(tty);
    if (fd < 0) fprintf(stderr, "workload: %s: %s (running without control)\n", tty, strerror(errno));
    char buf[512];
    size_t used = 0;
    double start = now_s(), last_stat = start, credit = 0, prev = start;
    for (;;) {
        double t0 = now_s();
        double elapsed = t0 - prev > 0.1 ? 0.1 : t0 - prev; /* a stall (migration pause) is not paid back in a burst */
        prev = t0;
        /* commands */
        if (fd >= 0) {
            ssize_t n = read(fd, buf + used, sizeof buf - 1 - used);
            if (n > 0) used += (size_t)n;
            char *nl;
            while ((nl = memchr(buf, '\n', used))) {
                *nl = 0;
                command(buf); /* "stat" (or anything else) just gets the report below */
                report(fd, t0 - start, 0);
                size_t rest = used - (size_t)(nl + 1 - buf);
                memmove(buf, nl + 1, rest);
                used = rest;
            }
            if (used == sizeof buf - 1) used = 0; /* a line too long: drop it */
        }
        /* dirtying, paced: the pages owed for the time since the last tick */
        credit += target_mbps * MB / PAGE * elapsed;
        size_t n = (size_t)credit;
        credit -= (double)n;
        dirty(n);
        /* extra CPU share */
        if (cpu_pct > 0) burn_until(t0 + TICK_NS / 1e9 * (cpu_pct > 100 ? 100 : cpu_pct) / 100.0);
        /* once a second: the measured rate */
        double t = now_s();
        if (t - last_stat >= 1.0 && fd >= 0) {
            double rate = (double)(written - written_at_last_stat) * PAGE / MB / (t - last_stat);
            written_at_last_stat = written;
            last_stat = t;
            report(fd, t - start, rate);
        }
        double left = t0 + TICK_NS / 1e9 - now_s();
        if (left > 0) {
            struct timespec ts = {0, (long)(left * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
}
