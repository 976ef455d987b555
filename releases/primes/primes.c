/*
 * primes: two work functions over ranges of integers, the sample release of orch.
 *
 * Task data (the `range` work module): ASCII "START END", two decimal uint64
 * separated by spaces, the half-open range [START, END) with START <= END.
 *
 *   count_primes   writes the number of primes in the range, in decimal, then "\n".
 *   iterated_hash  writes the 64-bit FNV-1a hash of the range's numbers, as 16
 *                  lower-case hex digits, then "\n". Precisely: h starts at the FNV
 *                  offset basis 0xcbf29ce484222325; for each n from START to END-1,
 *                  for each of n's 8 bytes, least significant first:
 *                  h = (h XOR byte) * 0x100000001b3 (mod 2^64).
 *                  An empty range gives the offset basis.
 *   list_primes    writes each prime in the range in decimal on its own line, so the
 *                  job's ordered output is the same however the range was cut.
 */
#include <inttypes.h>
#include <stdio.h>

#include "orch_work.h"

ORCH_WORK_DEFINE_ABI_VERSION;

static int is_prime(uint64_t n)
{
    if (n < 4)
        return n >= 2;
    if (n % 2 == 0 || n % 3 == 0)
        return 0;
    /* i <= n / i rather than i * i <= n: i * i overflows near 2^64. */
    for (uint64_t i = 5; i <= n / i; i += 6)
        if (n % i == 0 || n % (i + 2) == 0)
            return 0;
    return 1;
}

static int refused(orch_output *out)
{
    orch_fail(out, "the runtime refused the output");
    return ORCH_WORK_FAILED;
}

/* Writes `text` as the task's whole output, or fails the task. */
static int finish(orch_output *out, const char *text, int len)
{
    if (orch_write(out, text, (size_t)len) != 0)
        return refused(out);
    return ORCH_WORK_OK;
}

int count_primes(const orch_task *task, orch_output *out)
{
    uint64_t start, end, count = 0;
    char text[128];

    if (orch_parse_range(task, &start, &end, text, sizeof text) != 0) {
        orch_fail(out, text);
        return ORCH_WORK_FAILED;
    }
    for (uint64_t n = start; n < end; n++)
        count += (uint64_t)is_prime(n);
    return finish(out, text, snprintf(text, sizeof text, "%" PRIu64 "\n", count));
}

int iterated_hash(const orch_task *task, orch_output *out)
{
    uint64_t start, end, h = 0xcbf29ce484222325u;
    char text[128];

    if (orch_parse_range(task, &start, &end, text, sizeof text) != 0) {
        orch_fail(out, text);
        return ORCH_WORK_FAILED;
    }
    for (uint64_t n = start; n < end; n++)
        for (int byte = 0; byte < 8; byte++) {
            h ^= (n >> (8 * byte)) & 0xffu;
            h *= 0x100000001b3u;
        }
    return finish(out, text, snprintf(text, sizeof text, "%016" PRIx64 "\n", h));
}

int list_primes(const orch_task *task, orch_output *out)
{
    uint64_t start, end;
    char text[4096];
    size_t used = 0;

    if (orch_parse_range(task, &start, &end, text, sizeof text) != 0) {
        orch_fail(out, text);
        return ORCH_WORK_FAILED;
    }
    for (uint64_t n = start; n < end; n++) {
        if (!is_prime(n))
            continue;
        if (used > sizeof text - 24) { /* room for 20 digits and a newline */
            if (orch_write(out, text, used) != 0)
                return refused(out);
            used = 0;
        }
        used += (size_t)snprintf(text + used, sizeof text - used, "%" PRIu64 "\n", n);
    }
    return used && orch_write(out, text, used) != 0 ? refused(out) : ORCH_WORK_OK;
}
