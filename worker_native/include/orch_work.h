/*
 * orch_work.h - the ABI between orch's port runner and a release's work functions.
 *
 * A release ships a shared library exporting one or more work functions, each
 * with the type orch_work_fn (in the spirit of CloudI's do_work):
 *
 *     int count_primes(const orch_task *task, orch_output *out);
 *
 * The contract:
 *
 *   - The runtime owns everything: the task and its data are valid only for the
 *     duration of the call, and the output buffer belongs to the runtime. A work
 *     function hands its result over with orch_write() (any number of times; the
 *     pieces are concatenated) and keeps no pointer to `task` or `out` afterwards.
 *   - On success it returns ORCH_WORK_OK. On failure it calls orch_fail() with a
 *     one-line reason and returns ORCH_WORK_FAILED; whatever it wrote is dropped.
 *     If orch_write() returns non-zero (the runtime could not take the bytes), the
 *     function should stop and return ORCH_WORK_FAILED.
 *   - A function is called many times in one process, for tasks of one job or of
 *     several: it must be reentrant across calls. Keep no mutable global state
 *     that changes its answer; the same task must give the same output (a task
 *     may run more than once: `attempt` counts the tries, and only the first
 *     completion is recorded).
 *   - `size` in (0, 1] is the share of the work module's largest task that this
 *     one carries; the work module has already cut `data` to match, so most
 *     functions only read `data`.
 *   - Crashes are contained by the runtime, not by the function: a segfault, an
 *     abort or a hang past the task's timeout kills the port process, and the
 *     task is retried elsewhere. There is no need to catch signals here.
 *
 * ORCH_WORK_ABI_VERSION changes whenever these structures change. A library
 * records the version it was built against with ORCH_WORK_DEFINE_ABI_VERSION;
 * a runner reads the exported `orch_work_abi_version` to refuse a mismatch.
 */
#ifndef ORCH_WORK_H
#define ORCH_WORK_H

#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ORCH_WORK_ABI_VERSION 1

/* The ABI version a library was built for; defined by ORCH_WORK_DEFINE_ABI_VERSION,
 * written once at file scope in one of the library's source files. */
extern __attribute__((visibility("default"))) const int orch_work_abi_version;
#define ORCH_WORK_DEFINE_ABI_VERSION const int orch_work_abi_version = ORCH_WORK_ABI_VERSION

#define ORCH_WORK_OK 0
#define ORCH_WORK_FAILED 1

/* One task, read-only for the work function. */
typedef struct orch_task {
    const unsigned char *data; /* the task's input; not NUL-terminated */
    size_t data_len;
    double size;               /* (0, 1] */
    uint64_t seq;              /* the task's place in the job's output */
    uint32_t attempt;          /* 1 on the first try */
    const char *node_name;     /* for messages; NUL-terminated */
} orch_task;

typedef struct orch_output orch_output; /* opaque to work functions except through the calls below */

struct orch_output {
    void *ctx;
    /* Append `len` bytes to the task's output; 0 on success. */
    int (*write)(orch_output *out, const void *bytes, size_t len);
    /* Record why the task failed (copied by the runtime; the last call wins). */
    void (*fail)(orch_output *out, const char *message);
};

/* Return ORCH_WORK_OK (0) or ORCH_WORK_FAILED (1). */
typedef int (*orch_work_fn)(const orch_task *task, orch_output *out);

static inline int orch_write(orch_output *out, const void *bytes, size_t len)
{
    return out->write(out, bytes, len);
}

static inline void orch_fail(orch_output *out, const char *message)
{
    out->fail(out, message);
}

/*
 * A helper for functions over the `range` work module's tasks: data is ASCII
 * "START END", two decimal uint64 separated by whitespace, the half-open range
 * [START, END) with START <= END. Returns 0 and sets *start, *end; or writes a
 * one-line reason to `why` (for orch_fail) and returns -1.
 */
static inline int orch_parse_range(const orch_task *task, uint64_t *start, uint64_t *end, char *why,
                                   size_t why_len)
{
    const unsigned char *p = task->data, *stop = task->data + task->data_len;
    uint64_t values[2];

#define ORCH_IS_SPACE(c) ((c) == ' ' || ((c) >= '\t' && (c) <= '\r'))
#define ORCH_IS_DIGIT(c) ((c) >= '0' && (c) <= '9')
    for (int i = 0; i < 2; i++) {
        while (p < stop && ORCH_IS_SPACE(*p))
            p++;
        if (p == stop || !ORCH_IS_DIGIT(*p)) {
            snprintf(why, why_len, "range data must be \"START END\" (two decimal integers)");
            return -1;
        }
        uint64_t v = 0;
        for (; p < stop && ORCH_IS_DIGIT(*p); p++) {
            unsigned digit = (unsigned)(*p - '0');
            if (v > (UINT64_MAX - digit) / 10) {
                snprintf(why, why_len, "range bound does not fit in 64 bits");
                return -1;
            }
            v = v * 10 + digit;
        }
        values[i] = v;
    }
    while (p < stop && ORCH_IS_SPACE(*p))
        p++;
#undef ORCH_IS_SPACE
#undef ORCH_IS_DIGIT
    if (p != stop) {
        snprintf(why, why_len, "range data must be \"START END\": unexpected text after END");
        return -1;
    }
    if (values[0] > values[1]) {
        snprintf(why, why_len, "range start %" PRIu64 " is after its end %" PRIu64, values[0], values[1]);
        return -1;
    }
    *start = values[0];
    *end = values[1];
    return 0;
}

#ifdef __cplusplus
}
#endif

#endif /* ORCH_WORK_H */
