/*
 * faults: a work library for testing the port runner, the agent and the scheduler.
 * Each function misbehaves on one magic task data and otherwise echoes it back.
 *
 *   noop       writes nothing, returns OK
 *   echo       writes the task's data back
 *   segv_on    a real SIGSEGV (a store through a null pointer) when data == "crash"
 *   abort_on   abort() when data == "abort"
 *   hang_on    sleeps forever when data == "hang"
 *   exit_on    exit(3) when data == "exit": the work's own exit status, which the
 *              runner's exit codes must not be taken for (3 is its ABI refusal's)
 *   fail_on    orch_fail("bad task") and FAILED when data == "fail"
 *   big        writes the data 1000 times (data_len * 1000 bytes)
 *   attempt    writes "seq=%llu attempt=%u size=%.3f node=%s"
 *   fail_quiet returns FAILED without calling orch_fail
 *   odd_status returns 7, neither OK nor FAILED
 *   overrun    writes data_len MiB of zeros, ignores refused writes, returns OK
 *   chatty     printf()s to stdout and stderr, then echoes
 *   flaky      echoes its data (lines) unless one whole line of it is a magic word:
 *              "crash" SIGSEGV, "abort" abort(), "hang" hangs, each on attempt 1 only
 *              (the retry succeeds); "poison" SIGSEGV on every attempt
 *   journal    like flaky, and first appends "SEQ ATTEMPT\n" to $HOME/orch-journal (one
 *              write(2) with O_APPEND), so tests can count how often each task ran
 */
#define _POSIX_C_SOURCE 200809L

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "orch_work.h"

ORCH_WORK_DEFINE_ABI_VERSION;

static int is(const orch_task *task, const char *word)
{
    size_t n = strlen(word);
    return task->data_len == n && memcmp(task->data, word, n) == 0;
}

static int refused(orch_output *out)
{
    orch_fail(out, "the runtime refused the output");
    return ORCH_WORK_FAILED;
}

int noop(const orch_task *task, orch_output *out)
{
    (void)task;
    (void)out;
    return ORCH_WORK_OK;
}

int echo(const orch_task *task, orch_output *out)
{
    return orch_write(out, task->data, task->data_len) ? refused(out) : ORCH_WORK_OK;
}

int segv_on(const orch_task *task, orch_output *out)
{
    if (is(task, "crash")) {
        /* A volatile pointer the compiler cannot prove null: a real invalid store, not a trap instruction. */
        volatile int *volatile nowhere = NULL;
        *nowhere = 1;
    }
    return echo(task, out);
}

int abort_on(const orch_task *task, orch_output *out)
{
    if (is(task, "abort"))
        abort();
    return echo(task, out);
}

int hang_on(const orch_task *task, orch_output *out)
{
    if (is(task, "hang"))
        for (;;)
            pause();
    return echo(task, out);
}

int exit_on(const orch_task *task, orch_output *out)
{
    if (is(task, "exit"))
        exit(3);
    return echo(task, out);
}

int fail_on(const orch_task *task, orch_output *out)
{
    if (is(task, "fail")) {
        orch_fail(out, "bad task");
        return ORCH_WORK_FAILED;
    }
    return echo(task, out);
}

int big(const orch_task *task, orch_output *out)
{
    for (int i = 0; i < 1000; i++)
        if (orch_write(out, task->data, task->data_len) != 0)
            return refused(out);
    return ORCH_WORK_OK;
}

int attempt(const orch_task *task, orch_output *out)
{
    char text[512];
    int n = snprintf(text, sizeof text, "seq=%llu attempt=%u size=%.3f node=%s", (unsigned long long)task->seq,
                     (unsigned)task->attempt, task->size, task->node_name);
    if (n < 0 || (size_t)n >= sizeof text) {
        orch_fail(out, "node name too long");
        return ORCH_WORK_FAILED;
    }
    return orch_write(out, text, (size_t)n) ? refused(out) : ORCH_WORK_OK;
}

int fail_quiet(const orch_task *task, orch_output *out)
{
    (void)task;
    (void)orch_write(out, "dropped", 7);
    return ORCH_WORK_FAILED;
}

int odd_status(const orch_task *task, orch_output *out)
{
    (void)task;
    (void)out;
    return 7;
}

int overrun(const orch_task *task, orch_output *out)
{
    static unsigned char zeros[1 << 20]; /* .bss, never written */
    for (size_t i = 0; i < task->data_len; i++)
        (void)orch_write(out, zeros, sizeof zeros);
    return ORCH_WORK_OK;
}

int chatty(const orch_task *task, orch_output *out)
{
    printf("chatty on stdout: seq %llu\n", (unsigned long long)task->seq);
    fflush(stdout);
    fprintf(stderr, "chatty on stderr: seq %llu\n", (unsigned long long)task->seq);
    return echo(task, out);
}

/* Whether one whole line of the task's data is `word`. */
static int has_line(const orch_task *task, const char *word)
{
    size_t n = strlen(word);
    const unsigned char *p = task->data, *end = task->data + task->data_len;
    while (p < end) {
        const unsigned char *eol = memchr(p, '\n', (size_t)(end - p));
        size_t len = (size_t)((eol ? eol : end) - p);
        if (len == n && memcmp(p, word, n) == 0)
            return 1;
        p = eol ? eol + 1 : end;
    }
    return 0;
}

int flaky(const orch_task *task, orch_output *out)
{
    volatile int *volatile nowhere = NULL;
    if (has_line(task, "poison") || (task->attempt == 1 && has_line(task, "crash")))
        *nowhere = 1;
    if (task->attempt == 1 && has_line(task, "abort"))
        abort();
    if (task->attempt == 1 && has_line(task, "hang"))
        for (;;)
            pause();
    return echo(task, out);
}

int journal(const orch_task *task, orch_output *out)
{
    const char *home = getenv("HOME");
    char path[4096], line[64];
    if (home == NULL || snprintf(path, sizeof path, "%s/orch-journal", home) >= (int)sizeof path) {
        orch_fail(out, "no HOME for the journal");
        return ORCH_WORK_FAILED;
    }
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) {
        orch_fail(out, "cannot open the journal");
        return ORCH_WORK_FAILED;
    }
    int n = snprintf(line, sizeof line, "%llu %u\n", (unsigned long long)task->seq, (unsigned)task->attempt);
    ssize_t wrote = write(fd, line, (size_t)n);
    close(fd);
    if (wrote != n) {
        orch_fail(out, "cannot write the journal");
        return ORCH_WORK_FAILED;
    }
    return flaky(task, out);
}
