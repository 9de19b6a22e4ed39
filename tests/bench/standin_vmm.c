/*
 * standin-vmm: a stand-in for cloud-hypervisor, for tests and benchmarks where guest boot
 * does not matter. It is NOT a hypervisor: no guest runs.
 *
 * No cloud-hypervisor binary can run guests on the CI host (no KVM that boots guests) and
 * QEMU/TCG is far too heavy for the 50-100 machines of the controller fault tests and the
 * thousands of the scale benchmark, so this process plays cloud-hypervisor's part towards
 * the agent: it takes the command line our driver builds
 * (controller/agent/hypervisor/cloud_hypervisor.py), serves cloud-hypervisor's REST API on
 * --api-socket (HTTP/1.1 over a UNIX socket, keep-alive as its micro_http server does) and
 * exits like it. The agent runs it with --hypervisor cloud-hypervisor --vmm-binary PATH;
 * hack/build-standin-vmm.sh builds it (cached by the hash of this file).
 *
 * What it does, as cloud-hypervisor does:
 *
 * - --api-socket PATH | path=PATH | fd=N: GET vmm.ping, vm.info (state Running / Paused /
 *   Created, config echoing payload, cpus, memory, disks, net, fs, serial, console),
 *   vm.counters (zeroed counters keyed by the devices' ids: disk0, net0...); PUT vm.pause,
 *   vm.resume, vm.reboot, vm.shutdown (VM stopped, process stays, vm.info then says
 *   Created), vm.boot, vm.delete, vm.power-button (the "guest" powers off: the process
 *   exits 0 unless --no-shutdown, as when a real guest powers off), vmm.shutdown (200,
 *   then exit 0). 204 replies carry no Content-Length; a wrong verb is 400, an unknown
 *   endpoint 404, an action in the wrong state 500 (pre-v53 behaviour).
 * - SIGTERM / SIGINT: exit 0.
 * - --serial file=PATH appends console lines to PATH; --serial pty opens a pty (the slave
 *   in raw mode) whose path vm.info reports in config.serial.file, and writes the console
 *   lines to it (dropped when nobody reads, like CH's ring buffer); a reboot makes a new
 *   pty as CH >= v40 does.
 * - --event-monitor path=PATH | fd=N: pretty-printed JSON events {timestamp, source, event,
 *   properties}: vmm/starting, vm/booting, vm/booted, vm/pausing, vm/paused, vm/resuming,
 *   vm/resumed, vm/rebooting, vm/rebooted, vm/shutdown, vm/deleted, vmm/shutdown.
 * - A payload file or disk that does not exist fails the start (exit 1), as CH's VM
 *   creation does.
 *
 * What it does not do: it connects to no virtio-fs socket (virtiofsd is left alone,
 * waiting), opens no tap, reads no disk. The console carries two lines: that this is a
 * stand-in, and, with a direct-kernel payload and an initramfs (container mode), the line
 * our initramfs prints when it hands over to the entrypoint, so the agent's boot timer and
 * the controller's Ready condition move as with a real guest.
 *
 * Why C: one stand-in per VM, thousands at once on one host. A Python stand-in held about
 * 5.6 MiB of private memory and took tens of milliseconds of CPU to start; this one holds
 * tens of KiB and starts in about a millisecond. One thread, one poll() loop, libc only.
 * The agent recognises its VMM by the name in argv[0], which is this binary's path.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define VERSION "0.0-standin"
static const char CONSOLE_LINE[] = "standin-vmm: a stand-in for cloud-hypervisor; no guest runs\r\n";
/* What the container-mode initramfs prints right before it starts the entrypoint. */
static const char HANDOVER_LINE[] = "zm-init: switching root\r\n";
static const char POWER_OFF_LINE[] = "reboot: Power down\r\n";
/* Flags that take no value; every other flag takes the arguments after it (--disk A B). */
static const char *const SWITCHES[] = {"--no-shutdown", "-v", "-vv", "-vvv", "--pvpanic",
                                       "--landlock", "--version", "-V", NULL};
#define MAX_CONNS 32            /* more clients wait in the listen backlog */
#define MAX_REQUEST (1 << 20)   /* a client sending more without a complete request is cut */

/* ------------------------------------------------------------------ small helpers */

/* A growable byte buffer: replies and events are built in one and written at once. */
struct buf {
    char *p;
    size_t len, cap;
};

static void need(struct buf *b, size_t more) {
    if (b->len + more <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        fputs("Error: out of memory\n", stderr);
        exit(1);
    }
    b->p = p;
    b->cap = cap;
}

static void put(struct buf *b, const char *s, size_t n) {
    need(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void printf_(struct buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    need(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* A JSON string (or null), escaped for the ASCII paths, ids and kernel command lines the
 * driver passes; bytes above ASCII pass through as they came. */
static void json_str(struct buf *b, const char *s) {
    if (!s) {
        puts_(b, "null");
        return;
    }
    puts_(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        switch (c) {
        case '"': puts_(b, "\\\""); break;
        case '\\': puts_(b, "\\\\"); break;
        case '\n': puts_(b, "\\n"); break;
        case '\r': puts_(b, "\\r"); break;
        case '\t': puts_(b, "\\t"); break;
        case '\b': puts_(b, "\\b"); break;
        case '\f': puts_(b, "\\f"); break;
        default:
            if (c < 0x20)
                printf_(b, "\\u%04x", c);
            else
                put(b, (const char *)&c, 1);
        }
    }
    puts_(b, "\"");
}

static const char *json_bool(bool v) { return v ? "true" : "false"; }

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("Error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs("\n", stderr);
    va_end(ap);
    exit(1); /* CH prints its error and exits 1 when the command line cannot start a VM */
}

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

/* ------------------------------------------------------------------ command line */

static int g_argc;
static char **g_argv;

static bool is_switch(const char *arg) {
    for (const char *const *s = SWITCHES; *s; s++)
        if (!strcmp(arg, *s))
            return true;
    return false;
}

static bool is_flag(const char *arg) {
    return arg[0] == '-' && (!strncmp(arg, "--", 2) || is_switch(arg));
}

/* Every argument must belong to a flag that takes values. */
static void check_argv(void) {
    bool taking = false;
    for (int i = 1; i < g_argc; i++) {
        if (is_flag(g_argv[i]))
            taking = !is_switch(g_argv[i]);
        else if (!taking)
            die("unexpected argument '%s'", g_argv[i]);
    }
}

static bool has_flag(const char *flag) {
    for (int i = 1; i < g_argc; i++)
        if (!strcmp(g_argv[i], flag))
            return true;
    return false;
}

/* The values given after every occurrence of ``flag``, in order; *n is their count. The
 * returned array points into argv. */
static char **values(const char *flag, size_t *n) {
    char **out = calloc((size_t)g_argc, sizeof *out);
    const char *current = NULL;
    *n = 0;
    for (int i = 1; i < g_argc; i++) {
        if (is_flag(g_argv[i]))
            current = g_argv[i];
        else if (current && !strcmp(current, flag))
            out[(*n)++] = g_argv[i];
    }
    return out;
}

/* The first value of ``flag``, or ``otherwise`` when it has none (or an empty one). */
static const char *one(const char *flag, const char *otherwise) {
    size_t n;
    char **v = values(flag, &n);
    const char *out = n && v[0][0] ? v[0] : otherwise;
    free(v);
    return out;
}

/* The value of ``key`` in ``key=value,key=value`` (the last one wins); a bare word is the
 * value of the key "" (``--serial pty``). NULL when absent. */
static char *option(const char *value, const char *key) {
    char *found = NULL;
    size_t klen = strlen(key);
    for (const char *item = value; item;) {
        const char *end = strchr(item, ',');
        size_t len = end ? (size_t)(end - item) : strlen(item);
        const char *eq = memchr(item, '=', len);
        if (eq ? ((size_t)(eq - item) == klen && !strncmp(item, key, klen)) : klen == 0) {
            const char *v = eq ? eq + 1 : item;
            free(found);
            found = strndup(v, len - (size_t)(v - item));
        }
        item = end ? end + 1 : NULL;
    }
    return found;
}

static bool option_on(const char *value, const char *key) {
    char *v = option(value, key);
    bool on = v && (!strcmp(v, "on") || !strcmp(v, "true"));
    free(v);
    return on;
}

static long long number(const char *text, const char *what) {
    char *end;
    errno = 0;
    long long n = strtoll(text, &end, 10);
    if (errno || end == text || *end)
        die("invalid %s '%s'", what, text);
    return n;
}

/* ``512M``, ``1G``, ``4096``: K, M, G, T are powers of 1024, as CH reads them. */
static long long size_bytes(const char *text) {
    static const char units[] = "KMGT";
    size_t len = strlen(text);
    const char *u = len ? strchr(units, text[len - 1] & ~0x20) : NULL;
    if (!u || !*u)
        return number(text, "size");
    char *digits = strndup(text, len - 1);
    long long n = number(digits, "size") << (10 * (u - units + 1));
    free(digits);
    return n;
}

/* ------------------------------------------------------------------ the VM */

struct disk {
    char *path, *id;
    bool readonly;
};
struct net {
    char *tap, *mac, *id;
};
struct fs {
    char *tag, *socket, *id;
};
/* --serial / --console: mode File, Socket, Pty, Tty, Off, Null. */
struct console {
    char *mode, *file, *socket;
    char pty_path[64];
};

static struct {
    struct timespec started;
    int events;          /* event monitor, or -1 */
    const char *payload[4][2]; /* (key, value) for kernel, initramfs, cmdline, firmware */
    long long boot_vcpus, max_vcpus, memory;
    bool shared, hugepages;
    struct disk *disks;
    size_t ndisks;
    struct net *nets;
    size_t nnets;
    struct fs *fss;
    size_t nfss;
    struct console serial, console;
    const char *state;   /* Running, Paused, Created, Deleted */
    int serial_fd;       /* --serial file=: the file; pty: the master; else -1 */
    int pty_slave;       /* kept open so the pty lives while nobody has it open */
    struct timespec console_written; /* when the pty was last written to */
    int api;
    int exit_after_reply; /* an exit status once a reply is sent, or -1 */
} vm = {.events = -1, .serial_fd = -1, .pty_slave = -1, .exit_after_reply = -1};

static void event(const char *source, const char *name) {
    if (vm.events < 0)
        return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ns = (now.tv_sec - vm.started.tv_sec) * 1000000000LL + now.tv_nsec -
                   vm.started.tv_nsec;
    struct buf b = {0};
    /* One pretty-printed record per write; the driver reads them back in order. */
    printf_(&b,
            "{\n  \"timestamp\": {\n    \"secs\": %lld,\n    \"nanos\": %lld\n  },\n"
            "  \"source\": \"%s\",\n  \"event\": \"%s\",\n  \"properties\": null\n}\n",
            ns / 1000000000LL, ns % 1000000000LL, source, name);
    ssize_t w = write(vm.events, b.p, b.len);
    if (w < 0 && errno == EPIPE)
        vm.events = -1; /* the reader went away; CH keeps running too */
    free(b.p);
}

static void console_write(const char *data) {
    if (!strcmp(vm.serial.mode, "File"))
        write_all(vm.serial_fd, data, strlen(data));
    else if (!strcmp(vm.serial.mode, "Pty")) {
        /* Nobody reads and the buffer is full: dropped (EAGAIN), as by CH's ring buffer. */
        ssize_t dropped_if_negative = write(vm.serial_fd, data, strlen(data));
        (void)dropped_if_negative;
        clock_gettime(CLOCK_MONOTONIC, &vm.console_written);
    } else if (!strcmp(vm.serial.mode, "Tty"))
        write_all(STDOUT_FILENO, data, strlen(data));
}

static void console_config(struct console *c, const char *value) {
    c->file = option(value, "file");
    c->socket = option(value, "socket");
    if (c->file)
        c->mode = strdup("File");
    else if (c->socket)
        c->mode = strdup("Socket");
    else {
        /* capitalised as CH's ConsoleOutputMode names: pty -> Pty, off -> Off */
        char *word = option(value, "");
        c->mode = word ? word : strdup("null");
        for (char *p = c->mode; *p; p++)
            *p = (char)(p == c->mode ? toupper((unsigned char)*p) : tolower((unsigned char)*p));
    }
}

static void must_exist(const char *path) {
    struct stat st;
    if (path && stat(path, &st) != 0)
        die("Error booting VM: cannot open %s: No such file", path);
}

static void read_config(void) {
    static const char *const keys[] = {"kernel", "initramfs", "cmdline", "firmware"};
    for (int i = 0; i < 4; i++) {
        char flag[16];
        snprintf(flag, sizeof flag, "--%s", keys[i]);
        size_t n;
        char **v = values(flag, &n);
        vm.payload[i][0] = keys[i];
        vm.payload[i][1] = n ? v[0] : NULL;
        free(v);
    }
    const char *kernel = vm.payload[0][1], *firmware = vm.payload[3][1];
    if (!(kernel && *kernel) && !(firmware && *firmware))
        die("a VM needs a payload: --kernel or --firmware");

    const char *cpus = one("--cpus", "boot=1");
    char *boot = option(cpus, "boot"), *max = option(cpus, "max");
    vm.boot_vcpus = number(boot ? boot : "1", "--cpus boot");
    vm.max_vcpus = max ? number(max, "--cpus max") : vm.boot_vcpus;
    free(boot);
    free(max);

    const char *memory = one("--memory", "size=512M");
    char *size = option(memory, "size");
    vm.memory = size_bytes(size ? size : "512M");
    free(size);
    vm.shared = option_on(memory, "shared");
    vm.hugepages = option_on(memory, "hugepages");

    char **v = values("--disk", &vm.ndisks);
    vm.disks = calloc(vm.ndisks + 1, sizeof *vm.disks);
    for (size_t i = 0; i < vm.ndisks; i++)
        vm.disks[i] = (struct disk){option(v[i], "path"), option(v[i], "id"),
                                    option_on(v[i], "readonly")};
    free(v);
    v = values("--net", &vm.nnets);
    vm.nets = calloc(vm.nnets + 1, sizeof *vm.nets);
    for (size_t i = 0; i < vm.nnets; i++)
        vm.nets[i] = (struct net){option(v[i], "tap"), option(v[i], "mac"), option(v[i], "id")};
    free(v);
    v = values("--fs", &vm.nfss);
    vm.fss = calloc(vm.nfss + 1, sizeof *vm.fss);
    for (size_t i = 0; i < vm.nfss; i++)
        vm.fss[i] = (struct fs){option(v[i], "tag"), option(v[i], "socket"), option(v[i], "id")};
    free(v);

    must_exist(kernel);
    must_exist(vm.payload[1][1]);
    must_exist(firmware);
    for (size_t i = 0; i < vm.ndisks; i++)
        must_exist(vm.disks[i].path);

    console_config(&vm.serial, one("--serial", "null"));
    console_config(&vm.console, one("--console", "tty"));
}

/* An open file descriptor handed over by the parent (fd=N), or exit 1. */
static int inherited_fd(const char *text, const char *what) {
    int fd = (int)number(text, what);
    if (fcntl(fd, F_GETFD) < 0)
        die("%s fd=%d: %s", what, fd, strerror(errno));
    return fd;
}

static void open_event_monitor(void) {
    const char *value = one("--event-monitor", NULL);
    if (!value)
        return;
    char *fd = option(value, "fd"), *path = option(value, "path");
    if (fd) {
        vm.events = inherited_fd(fd, "--event-monitor");
    } else {
        if (!path || !*path) {
            free(path);
            path = option(value, "");
        }
        if (!path)
            die("--event-monitor %s: no path", value);
        vm.events = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
        if (vm.events < 0)
            die("cannot open the event monitor %s: %s", path, strerror(errno));
    }
    free(fd);
    free(path);
}

static void open_api_socket(void) {
    const char *value = one("--api-socket", NULL);
    if (!value)
        die("no --api-socket: a stand-in without an API is of no use");
    char *fd = option(value, "fd"), *path = option(value, "path");
    if (fd) {
        vm.api = inherited_fd(fd, "--api-socket"); /* the parent bound and listens on it */
        free(fd);
        return;
    }
    if (!path || !*path) {
        free(path);
        path = option(value, "");
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!path || strlen(path) >= sizeof addr.sun_path)
        die("Error binding the API socket %s: path too long", path ? path : "");
    strcpy(addr.sun_path, path);
    vm.api = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (vm.api < 0 || bind(vm.api, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(vm.api, 16) != 0)
        die("Error binding the API socket %s: %s", path, strerror(errno));
    free(path);
}

/* A new pty for --serial pty; its slave's path is what vm.info reports. */
static void open_pty(void) {
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    if (master < 0 || grantpt(master) || unlockpt(master) ||
        ptsname_r(master, vm.serial.pty_path, sizeof vm.serial.pty_path))
        die("cannot open a pty: %s", strerror(errno));
    int slave = open(vm.serial.pty_path, O_RDWR | O_NOCTTY | O_CLOEXEC);
    struct termios t;
    if (slave < 0 || tcgetattr(slave, &t) != 0)
        die("cannot open %s: %s", vm.serial.pty_path, strerror(errno));
    cfmakeraw(&t); /* a serial line: bytes as written, no echo, no CR/LF translation */
    tcsetattr(slave, TCSANOW, &t);
    vm.serial_fd = master;
    vm.pty_slave = slave;
    vm.serial.file = vm.serial.pty_path;
}

static void open_serial(void) {
    if (!strcmp(vm.serial.mode, "File")) {
        vm.serial_fd = open(vm.serial.file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0666);
        if (vm.serial_fd < 0)
            die("cannot open %s: %s", vm.serial.file, strerror(errno));
    } else if (!strcmp(vm.serial.mode, "Pty")) {
        open_pty();
    }
}

static void vmm_exit(int code) {
    event("vmm", "shutdown");
    /* The kernel hands what we wrote to the pty's reader asynchronously; exiting at once
     * would drop the last console lines (the guest's power-off line among them): wait
     * until 0.2 s after the last one, which an idle VM's exit does not. */
    if (vm.pty_slave >= 0) {
        struct timespec until = vm.console_written;
        until.tv_nsec += 200000000;
        if (until.tv_nsec >= 1000000000) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR) {
        }
    }
    exit(code);
}

/* ------------------------------------------------------------------ API */

/* One reply: HTTP status and JSON body (empty: none). */
struct reply {
    int status;
    struct buf body;
};

__attribute__((format(printf, 3, 4))) static void error_body(struct reply *r, int status,
                                                              const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    r->status = status;
    puts_(&r->body, "[");
    json_str(&r->body, msg);
    puts_(&r->body, "]");
}

/* {"k1": v1, "k2": v2, ...<tail>}: string fields (NULL: null), as in vm.info's devices. */
static void json_object(struct buf *b, size_t n, const char *const kv[], const char *tail) {
    for (size_t i = 0; i < n; i++) {
        printf_(b, "%s\"%s\": ", i ? ", " : "{", kv[2 * i]);
        json_str(b, kv[2 * i + 1]);
    }
    printf_(b, "%s}", tail);
}

/* vm.info's body: the parts of CH's VmInfo the driver and the tests read, in a fixed order
 * (", " and ": " separators, as before the stand-in was C). */
static void info_json(struct buf *b) {
    puts_(b, "{\"config\": {\"payload\": {");
    const char *sep = "";
    for (int i = 0; i < 4; i++) {
        if (!vm.payload[i][1])
            continue;
        printf_(b, "%s\"%s\": ", sep, vm.payload[i][0]);
        json_str(b, vm.payload[i][1]);
        sep = ", ";
    }
    printf_(b, "}, \"cpus\": {\"boot_vcpus\": %lld, \"max_vcpus\": %lld}, ", vm.boot_vcpus,
            vm.max_vcpus);
    printf_(b, "\"memory\": {\"size\": %lld, \"shared\": %s, \"hugepages\": %s}, \"disks\": [",
            vm.memory, json_bool(vm.shared), json_bool(vm.hugepages));
    for (size_t i = 0; i < vm.ndisks; i++) {
        puts_(b, i ? ", {\"path\": " : "{\"path\": ");
        json_str(b, vm.disks[i].path);
        printf_(b, ", \"readonly\": %s, \"id\": ", json_bool(vm.disks[i].readonly));
        json_str(b, vm.disks[i].id);
        puts_(b, "}");
    }
    puts_(b, "], \"net\": [");
    for (size_t i = 0; i < vm.nnets; i++) {
        const struct net *n = &vm.nets[i];
        puts_(b, i ? ", " : "");
        json_object(b, 3, (const char *[]){"tap", n->tap, "mac", n->mac, "id", n->id}, "");
    }
    puts_(b, "], \"fs\": [");
    for (size_t i = 0; i < vm.nfss; i++) {
        const struct fs *f = &vm.fss[i];
        puts_(b, i ? ", " : "");
        json_object(b, 3, (const char *[]){"tag", f->tag, "socket", f->socket, "id", f->id},
                    ", \"num_queues\": 1, \"queue_size\": 1024");
    }
    const struct console *c = &vm.serial;
    puts_(b, "], \"serial\": ");
    json_object(b, 3, (const char *[]){"mode", c->mode, "file", c->file, "socket", c->socket}, "");
    c = &vm.console;
    puts_(b, ", \"console\": ");
    json_object(b, 3, (const char *[]){"mode", c->mode, "file", c->file, "socket", c->socket}, "");
    puts_(b, "}, \"state\": ");
    json_str(b, vm.state);
    printf_(b, ", \"memory_actual_size\": %lld}", vm.memory);
}

/* vm.counters: zeroed counters per device id (an unnamed device: _disks0, _net0). */
static void counters_json(struct buf *b) {
    static const char disk[] =
        "{\"read_bytes\": 0, \"write_bytes\": 0, \"read_ops\": 0, \"write_ops\": 0}";
    static const char net[] =
        "{\"rx_bytes\": 0, \"rx_frames\": 0, \"tx_bytes\": 0, \"tx_frames\": 0}";
    const char *sep = "";
    char unnamed[32];
    puts_(b, "{");
    for (size_t i = 0; i < vm.ndisks; i++, sep = ", ") {
        snprintf(unnamed, sizeof unnamed, "_disks%zu", i);
        puts_(b, sep);
        json_str(b, vm.disks[i].id && *vm.disks[i].id ? vm.disks[i].id : unnamed);
        printf_(b, ": %s", disk);
    }
    for (size_t i = 0; i < vm.nnets; i++, sep = ", ") {
        snprintf(unnamed, sizeof unnamed, "_net%zu", i);
        puts_(b, sep);
        json_str(b, vm.nets[i].id && *vm.nets[i].id ? vm.nets[i].id : unnamed);
        printf_(b, ": %s", net);
    }
    puts_(b, "}");
}

/* pause, resume, boot: from one state to another, with an event before and after. */
static void transition(struct reply *r, const char *want, const char *to, const char *before,
                       const char *after) {
    if (strcmp(vm.state, want)) {
        error_body(r, 500, "VM is %s, not %s", vm.state, want);
        return;
    }
    event("vm", before);
    vm.state = to;
    event("vm", after);
    r->status = 204;
}

static bool running_or_paused(void) {
    return !strcmp(vm.state, "Running") || !strcmp(vm.state, "Paused");
}

static void reboot(struct reply *r) {
    if (!running_or_paused()) {
        error_body(r, 500, "VM is %s, cannot reboot", vm.state);
        return;
    }
    event("vm", "rebooting");
    if (vm.pty_slave >= 0) { /* CH >= v40 re-creates its consoles on a reboot */
        int master = vm.serial_fd, slave = vm.pty_slave;
        open_pty(); /* before closing the old one, so that the path really changes */
        close(master);
        close(slave);
    }
    vm.state = "Running";
    console_write(CONSOLE_LINE);
    event("vm", "rebooted");
    r->status = 204;
}

static void shutdown_vm(struct reply *r) {
    if (!running_or_paused()) {
        error_body(r, 500, "VM is %s, cannot shut down", vm.state);
        return;
    }
    vm.state = "Created"; /* what CH's vm.info says once the VM object is dropped */
    event("vm", "shutdown");
    r->status = 204;
}

/* The "guest" answers the ACPI button by powering off; CH then exits 0. */
static void power_button(struct reply *r) {
    if (strcmp(vm.state, "Running")) {
        error_body(r, 500, "VM is %s, cannot press its power button", vm.state);
        return;
    }
    console_write(POWER_OFF_LINE);
    vm.state = "Created";
    event("vm", "shutdown");
    if (!has_flag("--no-shutdown"))
        vm.exit_after_reply = 0;
    r->status = 204;
}

static const char *const GETTERS[] = {"vmm.ping", "vm.info", "vm.counters", NULL};
static const char *const ACTIONS[] = {"vm.pause",  "vm.resume", "vm.reboot",       "vm.shutdown",
                                      "vm.boot",   "vm.delete", "vm.power-button", "vmm.shutdown",
                                      NULL};

static bool listed(const char *const *names, const char *name) {
    for (; *names; names++)
        if (!strcmp(*names, name))
            return true;
    return false;
}

static void handle(const char *method, const char *path, struct reply *r) {
    static const char prefix[] = "/api/v1/";
    const char *endpoint = path + strlen(prefix);
    if (strncmp(path, prefix, strlen(prefix)) ||
        (!listed(GETTERS, endpoint) && !listed(ACTIONS, endpoint))) {
        r->status = 404;
        return;
    }
    if (!strcmp(method, "GET") != listed(GETTERS, endpoint)) {
        error_body(r, 400, "Wrong method %s for %s", method, endpoint);
        return;
    }
    r->status = 200;
    if (!strcmp(endpoint, "vmm.ping")) {
        printf_(&r->body,
                "{\"build_version\": \"v" VERSION "\", \"version\": \"" VERSION "\", "
                "\"pid\": %d, \"features\": []}",
                (int)getpid());
    } else if (!strcmp(endpoint, "vm.info")) {
        if (!strcmp(vm.state, "Deleted"))
            error_body(r, 404, "VM is not created");
        else
            info_json(&r->body);
    } else if (!strcmp(endpoint, "vm.counters")) {
        if (!strcmp(vm.state, "Created") || !strcmp(vm.state, "Deleted"))
            error_body(r, 500, "VM is not running");
        else
            counters_json(&r->body);
    } else if (!strcmp(endpoint, "vm.pause")) {
        transition(r, "Running", "Paused", "pausing", "paused");
    } else if (!strcmp(endpoint, "vm.resume")) {
        transition(r, "Paused", "Running", "resuming", "resumed");
    } else if (!strcmp(endpoint, "vm.boot")) {
        transition(r, "Created", "Running", "booting", "booted");
    } else if (!strcmp(endpoint, "vm.reboot")) {
        reboot(r);
    } else if (!strcmp(endpoint, "vm.shutdown")) {
        shutdown_vm(r);
    } else if (!strcmp(endpoint, "vm.delete")) {
        vm.state = "Deleted";
        event("vm", "deleted");
        r->status = 204;
    } else if (!strcmp(endpoint, "vm.power-button")) {
        power_button(r);
    } else { /* vmm.shutdown: 200 without a body, then exit */
        vm.exit_after_reply = 0;
    }
}

static const char *reason(int status) {
    switch (status) {
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    default: return "Error";
    }
}

/* The reply's bytes, as CH's micro_http writes them: 204 without Content-Length, a 200
 * without a body (vmm.shutdown) without one either (the client reads to EOF). */
static void response(struct buf *out, const struct reply *r, bool close) {
    printf_(out, "HTTP/1.1 %d %s\r\nServer: Cloud Hypervisor API\r\n", r->status,
            reason(r->status));
    if (close)
        puts_(out, "Connection: close\r\n");
    if (r->body.len)
        printf_(out, "Content-Type: application/json\r\nContent-Length: %zu\r\n", r->body.len);
    else if (r->status != 200 && r->status != 204)
        puts_(out, "Content-Length: 0\r\n");
    puts_(out, "\r\n");
    put(out, r->body.p ? r->body.p : "", r->body.len);
}

/* ------------------------------------------------------------------ connections */

struct conn {
    int fd; /* -1: a free slot */
    struct buf in;
};

static struct conn conns[MAX_CONNS];

static void conn_close(struct conn *c) {
    close(c->fd);
    c->fd = -1;
    free(c->in.p);
    c->in = (struct buf){0};
}

/* The value of header ``name`` (lower case) in the header lines [head, end), or NULL;
 * the last one wins. Names compare without case, values are trimmed. */
static char *header(const char *head, const char *end, const char *name) {
    char *found = NULL;
    size_t nlen = strlen(name);
    for (const char *line = memmem(head, (size_t)(end - head), "\r\n", 2); line && line < end;) {
        line += 2;
        const char *eol = memmem(line, (size_t)(end - line), "\r\n", 2);
        if (!eol)
            eol = end;
        const char *colon = memchr(line, ':', (size_t)(eol - line));
        if (colon) {
            const char *k = line, *ke = colon;
            while (k < ke && (*k == ' ' || *k == '\t'))
                k++;
            while (ke > k && (ke[-1] == ' ' || ke[-1] == '\t'))
                ke--;
            if ((size_t)(ke - k) == nlen && !strncasecmp(k, name, nlen)) {
                const char *v = colon + 1, *ve = eol;
                while (v < ve && (*v == ' ' || *v == '\t'))
                    v++;
                while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                    ve--;
                free(found);
                found = strndup(v, (size_t)(ve - v));
            }
        }
        line = eol;
    }
    return found;
}

/* Serve every complete request in the buffer, in order; false once the connection is to
 * be closed (the client asked, the reply has no length, or it could not be sent). */
static bool serve_requests(struct conn *c) {
    for (;;) {
        char *head = c->in.p;
        char *end = head ? memmem(head, c->in.len, "\r\n\r\n", 4) : NULL;
        if (!end)
            return c->in.len < MAX_REQUEST;
        size_t head_len = (size_t)(end - head) + 4;
        char *length_text = header(head, end, "content-length");
        char *connection = header(head, end, "connection");
        long long length = length_text ? strtoll(length_text, NULL, 10) : 0;
        bool wants_close = connection && !strcasecmp(connection, "close");
        free(length_text);
        free(connection);
        if (length < 0)
            return false;
        if (c->in.len - head_len < (size_t)length)
            return c->in.len < MAX_REQUEST; /* the body is still on its way */

        /* request line: METHOD SP PATH SP VERSION */
        char *line_end = memmem(head, (size_t)(end - head) + 2, "\r\n", 2);
        char *method = strndup(head, (size_t)(line_end - head));
        char *path = strchr(method, ' ');
        if (!path) {
            free(method);
            return false;
        }
        *path++ = '\0';
        char *space = strchr(path, ' ');
        if (space)
            *space = '\0';

        struct reply r = {0};
        handle(method, path, &r);
        free(method);
        bool last = wants_close || vm.exit_after_reply >= 0 || (r.status == 200 && !r.body.len);
        struct buf out = {0};
        response(&out, &r, last);
        free(r.body.p);
        if (send(c->fd, out.p, out.len, MSG_NOSIGNAL) != (ssize_t)out.len)
            last = true;
        free(out.p);
        if (vm.exit_after_reply >= 0) {
            conn_close(c);
            vmm_exit(vm.exit_after_reply);
        }
        size_t used = head_len + (size_t)length;
        memmove(c->in.p, c->in.p + used, c->in.len - used);
        c->in.len -= used;
        if (last)
            return false;
    }
}

static void on_readable(struct conn *c) {
    need(&c->in, 4096);
    ssize_t n = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, 0);
    if (n > 0)
        c->in.len += (size_t)n;
    /* Requests already received are answered even when the client closed its side. */
    if (!serve_requests(c) || n <= 0)
        conn_close(c);
}

static void serve(int signals) {
    for (int i = 0; i < MAX_CONNS; i++)
        conns[i].fd = -1;
    for (;;) {
        struct pollfd fds[MAX_CONNS + 2];
        struct conn *owner[MAX_CONNS + 2];
        nfds_t n = 0, free_slots = 0;
        fds[n++] = (struct pollfd){.fd = signals, .events = POLLIN};
        for (int i = 0; i < MAX_CONNS; i++) {
            if (conns[i].fd < 0) {
                free_slots++;
                continue;
            }
            owner[n] = &conns[i];
            fds[n++] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
        }
        nfds_t api_index = n;
        if (free_slots) /* with no free slot, new clients wait in the backlog */
            fds[n++] = (struct pollfd){.fd = vm.api, .events = POLLIN};
        if (poll(fds, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll: %s", strerror(errno));
        }
        if (fds[0].revents)
            vmm_exit(0); /* SIGTERM / SIGINT: CH tears the VM down and exits 0 */
        for (nfds_t i = 1; i < api_index; i++)
            if (fds[i].revents)
                on_readable(owner[i]);
        if (api_index < n && fds[api_index].revents) {
            int fd = accept4(vm.api, NULL, NULL, SOCK_CLOEXEC);
            for (int i = 0; fd >= 0 && i < MAX_CONNS; i++) {
                if (conns[i].fd < 0) {
                    conns[i].fd = fd;
                    fd = -1;
                }
            }
        }
    }
}

int main(int argc, char **argv) {
    g_argc = argc;
    g_argv = argv;
    /* Signals are read from a signalfd in the poll loop; blocked from the start, so that
     * one sent while starting is served too. A write to a gone reader is an error, not a
     * death. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);
    int signals = signalfd(-1, &stop, SFD_CLOEXEC);
    if (signals < 0)
        die("signalfd: %s", strerror(errno));

    check_argv();
    if (has_flag("--version") || has_flag("-V")) {
        puts("standin-vmm v" VERSION);
        return 0;
    }
    clock_gettime(CLOCK_MONOTONIC, &vm.started);
    open_event_monitor();
    event("vmm", "starting");
    read_config();
    vm.state = "Running";
    open_api_socket();
    open_serial();
    event("vm", "booting");
    console_write(CONSOLE_LINE);
    if (vm.payload[0][1] && *vm.payload[0][1] && vm.payload[1][1] && *vm.payload[1][1])
        console_write(HANDOVER_LINE);
    event("vm", "booted");
    serve(signals);
}
