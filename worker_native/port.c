/*
 * orch-port - the port runner: loads a release's work library and runs framed tasks.
 *
 *     orch-port [--status-fd=N] LIBRARY.so FUNCTION [NODE_NAME]
 *
 * The node agent starts one port per worker. The port dlopen()s LIBRARY
 * (RTLD_NOW | RTLD_LOCAL), refuses it if it exports an `orch_work_abi_version`
 * other than ORCH_WORK_ABI_VERSION, looks up FUNCTION (an orch_work_fn, see
 * include/orch_work.h), then runs tasks read from stdin and writes one result per
 * task to stdout, in the order the tasks came. NODE_NAME (default: the host name)
 * is passed to every call as task->node_name.
 *
 * FRAME PROTOCOL (also in PROTOCOL.md). All integers little-endian, no padding.
 *
 *   task frame, agent -> port on stdin, 28-byte header then the data:
 *     off  size  field
 *       0     4  magic     the bytes "OTSK" (u32 0x4b53544f)
 *       4     8  seq       u64, the task's place in the job's output
 *      12     4  attempt   u32, >= 1 (1 on the first try)
 *      16     8  size      f64 (IEEE 754 binary64), in (0, 1]
 *      24     4  data_len  u32, <= ORCH_PORT_MAX_DATA (64 MiB)
 *      28     .  data      data_len bytes
 *
 *   result frame, port -> agent on stdout, 28-byte header then the payload:
 *     off  size  field
 *       0     4  magic        the bytes "ORES" (u32 0x5345524f)
 *       4     8  seq          u64, copied from the task
 *      12     4  status       u32: 0 ok, 1 failed
 *      16     8  elapsed_ns   u64, CLOCK_MONOTONIC around the function call only
 *      24     4  payload_len  u32, <= ORCH_PORT_MAX_OUTPUT (64 MiB)
 *      28     .  payload      ok: the bytes the function wrote (concatenated);
 *                             failed: the failure message (UTF-8 text, no NUL)
 *
 *   Failures reported in a result frame (the port keeps going):
 *     - the function returned ORCH_WORK_FAILED: its last orch_fail() message, or
 *       "failed without a message" when it never called orch_fail();
 *     - the output passed 64 MiB: orch_write() returns non-zero from then on and the
 *       result is "output over 64 MiB" whatever the function returns;
 *     - any other return value: "returned N (not ORCH_WORK_OK or ORCH_WORK_FAILED)".
 *     Output written before a failure is dropped.
 *
 *   Ordering and flushing: one result per task, in task order. Every result is on
 *   stdout (written, not buffered in the port) before the next task's function is
 *   called, so when a port dies, the results of every task before the one in flight
 *   have reached the pipe: the task in flight is the first one sent without a
 *   result. Input is read in large chunks (many frames per read()).
 *
 *   Status channel (--status-fd=N, what the agent passes): the runner's own word, one
 *   line each, on descriptor N, which no work function is given (it is close-on-exec
 *   and the runner's alone), so nothing the work does can be taken for it:
 *     ready                after the library is loaded, checked and FUNCTION found
 *     refused MESSAGE      the runner will not run this library (then exits 3, 4 or 5)
 *     error MESSAGE        the runner itself ends (usage, I/O, malformed frame: 1 or 2)
 *   A port that ends after "ready" with no "error" line ended because of its work: a
 *   signal (a crash) or a status the work function gave exit(). Exit codes alone
 *   cannot tell the two apart: a work function may call exit(3) as well.
 *
 *   Exit status:
 *     0  clean end of input (EOF at a frame boundary)
 *     1  usage error, or an I/O or memory error of the port itself
 *     2  malformed task frame (bad magic, data_len over the limit, size outside
 *        (0, 1], attempt 0, or EOF inside a frame); results for the frames before
 *        it are written first
 *     3  the library's orch_work_abi_version differs from the runner's
 *     4  FUNCTION not found in the library
 *     5  the library could not be loaded (dlopen failed)
 *     killed by a signal: the work function crashed (SIGSEGV, SIGABRT, ...) or the
 *        agent killed the port (SIGKILL after a task timeout). Signals are not
 *        caught; closing the port's stdout kills it with SIGPIPE.
 *   Diagnostics go to stderr, one line each, prefixed "orch-port: ".
 *
 *   The work function's own stdin and stdout are /dev/null and stderr: the port
 *   moves the protocol streams to private descriptors before loading the library,
 *   so a stray printf() cannot corrupt the frames.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "orch_work.h"

#define TASK_MAGIC 0x4b53544fu   /* "OTSK" on the wire */
#define RESULT_MAGIC 0x5345524fu /* "ORES" on the wire */
#define HEADER_LEN 28u
#define ORCH_PORT_MAX_DATA (64u << 20)
#define ORCH_PORT_MAX_OUTPUT ((size_t)64 << 20)
#define OUTPUT_OVER_CAP "output over 64 MiB"
#define NO_MESSAGE "failed without a message"
#define MAX_MESSAGE 4096u
#define READ_CHUNK ((size_t)1 << 20)
#define OUTPUT_INITIAL ((size_t)64 << 10)

enum {
    EXIT_OK = 0,
    EXIT_USAGE = 1,
    EXIT_MALFORMED = 2,
    EXIT_ABI = 3,
    EXIT_NO_FUNCTION = 4,
    EXIT_NO_LIBRARY = 5,
};

/* -- little-endian helpers (independent of the host's byte order) ---------------- */

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static void put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

static double get_f64(const unsigned char *p)
{
    uint64_t bits = get_u64(p);
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* -- diagnostics ------------------------------------------------------------------- */

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

static int status_fd = -1; /* the status channel (--status-fd), or -1 */

/* One line on the status channel, in one write(); nothing when there is none. */
static void status_line(const char *word, const char *message)
{
    if (status_fd < 0)
        return;
    char line[1200];
    int n = snprintf(line, sizeof line, "%s%s%s\n", word, message ? " " : "", message ? message : "");
    size_t len = n < 0 ? 0 : (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    if (len > 0 && line[len - 1] != '\n')
        line[len - 1] = '\n';
    while (write(status_fd, line, len) < 0 && errno == EINTR)
        ;
}

static void die(int code, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "orch-port: %s\n", line);
    fflush(stderr);
    int refusal = code == EXIT_ABI || code == EXIT_NO_FUNCTION || code == EXIT_NO_LIBRARY;
    status_line(refusal ? "refused" : "error", line);
    exit(code);
}

/* -- the output a work function writes through orch_output ------------------------- */

typedef struct port_output {
    orch_output out; /* first member: the orch_output* handed to the function is ours */
    unsigned char *buf;
    size_t len, cap;
    int refused;     /* a write was refused: the result is a failure */
    const char *refusal;
    int failed;      /* orch_fail() was called */
    size_t message_len;
    char message[MAX_MESSAGE];
} port_output;

static int output_write(orch_output *o, const void *bytes, size_t n)
{
    port_output *po = (port_output *)o;
    if (po->refused)
        return -1;
    if (n == 0)
        return 0;
    if (bytes == NULL) {
        po->refused = 1;
        po->refusal = "orch_write() was given NULL bytes";
        return -1;
    }
    if (n > ORCH_PORT_MAX_OUTPUT - po->len) {
        po->refused = 1;
        po->refusal = OUTPUT_OVER_CAP;
        return -1;
    }
    size_t need = po->len + n;
    if (need > po->cap) {
        size_t cap = po->cap ? po->cap : OUTPUT_INITIAL;
        while (cap < need)
            cap *= 2;
        if (cap > ORCH_PORT_MAX_OUTPUT)
            cap = ORCH_PORT_MAX_OUTPUT;
        unsigned char *grown = realloc(po->buf, cap);
        if (grown == NULL) {
            po->refused = 1;
            po->refusal = "out of memory for the task's output";
            return -1;
        }
        po->buf = grown;
        po->cap = cap;
    }
    memcpy(po->buf + po->len, bytes, n);
    po->len = need;
    return 0;
}

static void output_fail(orch_output *o, const char *message)
{
    port_output *po = (port_output *)o;
    if (message == NULL)
        message = "";
    size_t n = strnlen(message, MAX_MESSAGE - 1);
    memcpy(po->message, message, n);
    po->message[n] = '\0';
    po->message_len = n;
    po->failed = 1;
}

/* -- I/O on the protocol descriptors ------------------------------------------------ */

static int in_fd = -1, out_fd = -1;

static void write_all(struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        ssize_t n = writev(out_fd, iov, iovcnt);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(EXIT_USAGE, "writing results: %s", strerror(errno));
        }
        while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
}

static void write_result(uint64_t seq, uint32_t status, uint64_t elapsed_ns, const void *payload, size_t len)
{
    unsigned char header[HEADER_LEN];
    put_u32(header, RESULT_MAGIC);
    put_u64(header + 4, seq);
    put_u32(header + 12, status);
    put_u64(header + 16, elapsed_ns);
    put_u32(header + 24, (uint32_t)len);
    struct iovec iov[2] = {{header, HEADER_LEN}, {(void *)payload, len}};
    write_all(iov, len ? 2 : 1);
}

/* The read buffer: bytes [start, end) are read and not yet consumed. */
typedef struct reader {
    unsigned char *buf;
    size_t start, end, cap;
} reader;

/* Makes at least `want` bytes available from r->start. Returns 1 when they are,
 * 0 on EOF (r->end - r->start tells how many bytes the partial frame had). */
static int fill(reader *r, size_t want)
{
    if (r->end - r->start >= want)
        return 1;
    /* Move the partial frame to the front (a few bytes, once per read()), growing the
     * buffer when the frame is larger than it. */
    size_t have = r->end - r->start;
    if (r->start > 0) {
        memmove(r->buf, r->buf + r->start, have);
        r->start = 0;
        r->end = have;
    }
    if (want > r->cap) {
        size_t cap = r->cap;
        while (cap < want)
            cap *= 2;
        unsigned char *grown = realloc(r->buf, cap);
        if (grown == NULL)
            die(EXIT_USAGE, "out of memory for a task of %zu bytes", want);
        r->buf = grown;
        r->cap = cap;
    }
    while (r->end < want) {
        ssize_t n = read(in_fd, r->buf + r->end, r->cap - r->end);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(EXIT_USAGE, "reading tasks: %s", strerror(errno));
        }
        if (n == 0)
            return 0;
        r->end += (size_t)n;
    }
    return 1;
}

/* -- start-up ------------------------------------------------------------------------ */

/* Moves stdin/stdout to private descriptors; fd 0 becomes /dev/null and fd 1 a copy
 * of stderr, so work code that prints cannot corrupt the frames. */
static void claim_protocol_fds(void)
{
    in_fd = fcntl(STDIN_FILENO, F_DUPFD_CLOEXEC, 3);
    out_fd = fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3);
    if (in_fd < 0 || out_fd < 0)
        die(EXIT_USAGE, "cannot duplicate stdin/stdout: %s", strerror(errno));
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0 || dup2(null, STDIN_FILENO) < 0 || dup2(STDERR_FILENO, STDOUT_FILENO) < 0)
        die(EXIT_USAGE, "cannot redirect stdin/stdout: %s", strerror(errno));
    close(null);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    static const char status_option[] = "--status-fd=";
    if (argc > 1 && strncmp(argv[1], status_option, sizeof status_option - 1) == 0) {
        const char *number = argv[1] + sizeof status_option - 1;
        char *end = NULL;
        long fd = strtol(number, &end, 10);
        if (*number == '\0' || *end != '\0' || fd < 3 || fd > 1 << 20 || fcntl((int)fd, F_GETFD) < 0) {
            fprintf(stderr, "orch-port: %s is not an open descriptor above 2\n", argv[1]);
            return EXIT_USAGE;
        }
        /* The runner's alone: a work function that runs a program does not pass it on. */
        if (fcntl((int)fd, F_SETFD, FD_CLOEXEC) < 0) {
            fprintf(stderr, "orch-port: cannot set close-on-exec on %s: %s\n", argv[1], strerror(errno));
            return EXIT_USAGE;
        }
        status_fd = (int)fd;
        argv++;
        argc--;
    }
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: orch-port [--status-fd=N] LIBRARY.so FUNCTION [NODE_NAME]\n"
                        "  runs framed tasks from stdin through FUNCTION, framed results to stdout"
                        " (see PROTOCOL.md)\n");
        status_line("error", "usage: orch-port [--status-fd=N] LIBRARY.so FUNCTION [NODE_NAME]");
        return EXIT_USAGE;
    }
    const char *library = argv[1], *function = argv[2];
    char host[256];
    const char *node_name = argv[3];
    if (node_name == NULL) {
        if (gethostname(host, sizeof host) != 0)
            strcpy(host, "unknown");
        host[sizeof host - 1] = '\0';
        node_name = host;
    }

    claim_protocol_fds();

    void *handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL)
        die(EXIT_NO_LIBRARY, "cannot load %s: %s", library, dlerror());
    dlerror();
    const int *abi = dlsym(handle, "orch_work_abi_version");
    if (abi != NULL && *abi != ORCH_WORK_ABI_VERSION)
        die(EXIT_ABI, "work ABI version mismatch: %s says version %d, this runner speaks version %d "
            "(rebuild the release against this orch's orch_work.h)", library, *abi, ORCH_WORK_ABI_VERSION);
    dlerror();
    /* ISO C forbids converting void* to a function pointer; POSIX requires it to work. */
    orch_work_fn fn;
    void *sym = dlsym(handle, function);
    memcpy(&fn, &sym, sizeof fn);
    if (sym == NULL)
        die(EXIT_NO_FUNCTION, "%s has no function %s", library, function);

    reader r = {malloc(READ_CHUNK), 0, 0, READ_CHUNK};
    port_output po;
    memset(&po, 0, sizeof po);
    po.out.ctx = NULL;
    po.out.write = output_write;
    po.out.fail = output_fail;
    if (r.buf == NULL)
        die(EXIT_USAGE, "out of memory");
    status_line("ready", NULL); /* from here on, an end without an "error" line is the work's */

    uint64_t tasks = 0;
    for (;;) {
        if (!fill(&r, HEADER_LEN)) {
            if (r.end == r.start)
                break; /* clean EOF */
            die(EXIT_MALFORMED, "malformed frame after %llu tasks: end of input inside a header (%zu of %u bytes)",
                (unsigned long long)tasks, r.end - r.start, HEADER_LEN);
        }
        const unsigned char *h = r.buf + r.start;
        uint32_t magic = get_u32(h);
        uint64_t seq = get_u64(h + 4);
        uint32_t attempt = get_u32(h + 12);
        double size = get_f64(h + 16);
        uint32_t data_len = get_u32(h + 24);
        if (magic != TASK_MAGIC)
            die(EXIT_MALFORMED, "malformed frame after %llu tasks: bad magic 0x%08x (want 0x%08x, \"OTSK\")",
                (unsigned long long)tasks, magic, TASK_MAGIC);
        if (data_len > ORCH_PORT_MAX_DATA)
            die(EXIT_MALFORMED, "malformed frame (seq %llu): data_len %u is over the limit of %u bytes",
                (unsigned long long)seq, data_len, ORCH_PORT_MAX_DATA);
        if (!(size > 0.0 && size <= 1.0))
            die(EXIT_MALFORMED, "malformed frame (seq %llu): size %g is not in (0, 1]", (unsigned long long)seq,
                size);
        if (attempt == 0)
            die(EXIT_MALFORMED, "malformed frame (seq %llu): attempt is 0 (the first try is 1)",
                (unsigned long long)seq);
        if (!fill(&r, HEADER_LEN + data_len))
            die(EXIT_MALFORMED, "malformed frame (seq %llu): end of input inside the data (%zu of %u bytes)",
                (unsigned long long)seq, r.end - r.start - HEADER_LEN, data_len);

        orch_task task = {
            .data = r.buf + r.start + HEADER_LEN,
            .data_len = data_len,
            .size = size,
            .seq = seq,
            .attempt = attempt,
            .node_name = node_name,
        };
        po.len = 0;
        po.refused = 0;
        po.refusal = NULL;
        po.failed = 0;
        po.message_len = 0;

        uint64_t t0 = now_ns();
        int rc = fn(&task, &po.out);
        uint64_t elapsed = now_ns() - t0;

        if (po.refused) {
            write_result(seq, ORCH_WORK_FAILED, elapsed, po.refusal, strlen(po.refusal));
        } else if (rc == ORCH_WORK_OK) {
            write_result(seq, ORCH_WORK_OK, elapsed, po.buf, po.len);
        } else if (rc == ORCH_WORK_FAILED) {
            if (po.failed && po.message_len > 0)
                write_result(seq, ORCH_WORK_FAILED, elapsed, po.message, po.message_len);
            else
                write_result(seq, ORCH_WORK_FAILED, elapsed, NO_MESSAGE, sizeof NO_MESSAGE - 1);
        } else {
            char why[MAX_MESSAGE + 96];
            int n = snprintf(why, sizeof why, "returned %d (not ORCH_WORK_OK or ORCH_WORK_FAILED)%s%s", rc,
                             po.message_len ? ": " : "", po.message_len ? po.message : "");
            size_t len = n < 0 ? 0 : (size_t)n < sizeof why ? (size_t)n : sizeof why - 1;
            write_result(seq, ORCH_WORK_FAILED, elapsed, why, len);
        }
        r.start += HEADER_LEN + data_len;
        tasks++;
    }

    free(r.buf);
    free(po.buf);
    dlclose(handle);
    return EXIT_OK;
}
