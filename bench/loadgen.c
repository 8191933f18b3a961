/* An open-loop HTTP/1.1 load generator for the burst benchmark (bench/burst.py).
 *
 * Why C and why open loop: a closed-loop client sends the next attempt only when the
 * previous one came back, so a slow server slows the client and its latency never shows
 * (coordinated omission); and a Python client at 40,000 requests/s would spend a core of
 * its own and measure itself. Here every attempt has a time it was due (start + i / rate),
 * it is sent on the first idle keep-alive connection at or after that time, and its latency
 * is counted from the time it was due. How far sending fell behind the schedule is recorded
 * per attempt, so a run whose generator could not keep up says so.
 *
 * Who presses Buy: the first `--first` attempts are every user's first press, in a random
 * order; every later attempt is a retry by a "bot" (a share of the users, --retry-share)
 * who was last answered 410 or 429, picked at random (while no bot has been refused yet,
 * any bot). Modes: `buy` POSTs /api/v1/seckill/{pid}; `look` GETs the caller's order, as a
 * sale page loaded before the start would (the token is verified, no stock is touched).
 *
 * Output: one binary record per attempt to --out (struct rec below, little endian), a JSON
 * summary on stdout, a progress line on stderr every second.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct rec {            /* 32 bytes per attempt */
    uint64_t due_ns;    /* from the start */
    uint64_t sent_ns;   /* 0: never sent */
    uint64_t done_ns;   /* 0: never answered */
    uint32_t user;      /* index into the token file */
    uint16_t status;    /* HTTP status; 0: no answer (connection error or cut off) */
    uint16_t retry;     /* 1: a retry, 0: the user's first press */
};

struct conn {
    int fd;
    int busy;           /* an attempt in flight */
    long attempt;       /* its index */
    char in[8192];
    size_t have;
    char out[4096];
    size_t out_len, out_off;
};

static struct {
    const char *host, *tokens_path, *out_path, *mode;
    int port, connections;
    long product, count, first;
    double rate, retry_share, timeout_s, give_up_s;
    unsigned long long seed;
} opt = {"127.0.0.1", NULL, NULL, "buy", 0, 256, 0, 0, -1, 0, 0.2, 10.0, 0, 1};

static char **tokens;
static size_t *token_len;
static long users;
static struct rec *recs;
static struct conn *conns;
static int epfd;
static uint64_t t0;
static long *pool;             /* bots last refused (410/429), swap-removed on pick */
static long pool_len;
static unsigned char *in_pool;
static long bots;
static long connect_errors, closed_in_flight, bad_responses, timeouts;
static long answered;          /* attempts finished with an HTTP status */
static struct conn **idle;     /* connections open with nothing in flight */
static int n_idle, n_busy;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static unsigned long long rng_state;
static unsigned long long rng(void) { /* splitmix64: reproducible with --seed */
    unsigned long long z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, errno ? strerror(errno) : "invalid");
    exit(2);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P --tokens FILE --product ID --rate PER_S --count N "
            "--out FILE\n"
            "       [--host 127.0.0.1] [--first N (default: every user once)] [--mode buy|look]\n"
            "       [--retry-share 0.2] [--connections 256] [--timeout 10] [--seed 1]\n"
            "       [--give-up-behind SECONDS (default 0: never)]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) opt.host = v;
        else if (!strcmp(a, "--port")) opt.port = atoi(v);
        else if (!strcmp(a, "--tokens")) opt.tokens_path = v;
        else if (!strcmp(a, "--out")) opt.out_path = v;
        else if (!strcmp(a, "--mode")) opt.mode = v;
        else if (!strcmp(a, "--product")) opt.product = atol(v);
        else if (!strcmp(a, "--rate")) opt.rate = atof(v);
        else if (!strcmp(a, "--count")) opt.count = atol(v);
        else if (!strcmp(a, "--first")) opt.first = atol(v);
        else if (!strcmp(a, "--retry-share")) opt.retry_share = atof(v);
        else if (!strcmp(a, "--connections")) opt.connections = atoi(v);
        else if (!strcmp(a, "--timeout")) opt.timeout_s = atof(v);
        else if (!strcmp(a, "--give-up-behind")) opt.give_up_s = atof(v);
        else if (!strcmp(a, "--seed")) opt.seed = strtoull(v, NULL, 10);
        else usage();
    }
    if (!opt.port || !opt.tokens_path || !opt.out_path || opt.product <= 0 || opt.rate <= 0
        || opt.count <= 0 || opt.connections <= 0
        || (strcmp(opt.mode, "buy") && strcmp(opt.mode, "look")))
        usage();
}

/* The token file of bench/tokens.py: one "<user id> <token>" line per user. */
static void read_tokens(void) {
    FILE *f = fopen(opt.tokens_path, "r");
    if (!f) die(opt.tokens_path);
    size_t cap = 1024;
    tokens = malloc(cap * sizeof *tokens);
    token_len = malloc(cap * sizeof *token_len);
    char *line = NULL;
    size_t n = 0;
    ssize_t got;
    while ((got = getline(&line, &n, f)) > 0) {
        while (got && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        char *sp = strchr(line, ' ');
        if (!sp) continue;
        if ((size_t)users == cap) {
            cap *= 2;
            tokens = realloc(tokens, cap * sizeof *tokens);
            token_len = realloc(token_len, cap * sizeof *token_len);
        }
        tokens[users] = strdup(sp + 1);
        token_len[users] = strlen(sp + 1);
        users++;
    }
    free(line);
    fclose(f);
    if (!users) { errno = 0; die("no tokens in the token file"); }
}

static int open_conn(struct conn *c) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(opt.port)};
    if (inet_pton(AF_INET, opt.host, &sa.sin_addr) != 1) { errno = 0; die("--host (IPv4)"); }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        close(fd);
        connect_errors++;
        return -1;
    }
    c->fd = fd;
    c->busy = 0;
    c->have = 0;
    c->out_len = c->out_off = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    idle[n_idle++] = c;
    return 0;
}

static void finish(struct conn *c, uint16_t status);

static void drop_conn(struct conn *c) {
    if (c->busy) { closed_in_flight++; finish(c, 0); }
    for (int i = 0; i < n_idle; i++) /* finish() made it idle, or it was */
        if (idle[i] == c) { idle[i] = idle[--n_idle]; break; }
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

static int is_bot(long user) {
    /* a fixed share of the users, spread over the file: the same bots in every run */
    return (double)((user * 2654435761u) % 10000) < opt.retry_share * 10000.0;
}

static void pool_add(long user) {
    if (in_pool[user]) return;
    in_pool[user] = 1;
    pool[pool_len++] = user;
}

static long next_retry_user(void) {
    if (pool_len) {
        long i = (long)(rng() % (unsigned long long)pool_len);
        long user = pool[i];
        pool[i] = pool[--pool_len];
        in_pool[user] = 0;
        return user;
    }
    for (;;) { /* nobody refused yet: any bot */
        long user = (long)(rng() % (unsigned long long)users);
        if (is_bot(user) || !bots) return user;
    }
}

static void finish(struct conn *c, uint16_t status) {
    struct rec *r = &recs[c->attempt];
    r->done_ns = now_ns() - t0;
    r->status = status;
    answered += status != 0;
    c->busy = 0;
    n_busy--;
    idle[n_idle++] = c;
    if ((status == 410 || status == 429) && is_bot(r->user)) pool_add(r->user);
}

/* The request around the token: built once (snprintf per attempt showed in a profile). */
static char req_head[256], req_tail[64];
static size_t req_head_len, req_tail_len;

static void build_request(void) {
    if (!strcmp(opt.mode, "buy")) {
        req_head_len = (size_t)snprintf(req_head, sizeof req_head,
                                        "POST /api/v1/seckill/%ld HTTP/1.1\r\nHost: burst\r\n"
                                        "Authorization: Bearer ", opt.product);
        req_tail_len = (size_t)snprintf(req_tail, sizeof req_tail,
                                        "\r\nContent-Length: 0\r\n\r\n");
    } else {
        req_head_len = (size_t)snprintf(req_head, sizeof req_head,
                                        "GET /api/v1/seckill/%ld/order HTTP/1.1\r\n"
                                        "Host: burst\r\nAuthorization: Bearer ", opt.product);
        req_tail_len = (size_t)snprintf(req_tail, sizeof req_tail, "\r\n\r\n");
    }
}

static int send_attempt(struct conn *c, long i) {
    struct rec *r = &recs[i];
    long u = r->user;
    size_t n = req_head_len + token_len[u] + req_tail_len;
    if (n > sizeof c->out) { errno = 0; die("token too long"); }
    memcpy(c->out, req_head, req_head_len);
    memcpy(c->out + req_head_len, tokens[u], token_len[u]);
    memcpy(c->out + req_head_len + token_len[u], req_tail, req_tail_len);
    c->out_len = n;
    c->out_off = 0;
    c->busy = 1;
    n_busy++;
    c->attempt = i;
    r->sent_ns = now_ns() - t0;
    ssize_t w = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN) { drop_conn(c); return -1; }
    if (w > 0) c->out_off = (size_t)w;
    if (c->out_off < c->out_len) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
    return 0;
}

/* One response: status line, headers (Content-Length), body. Returns bytes consumed,
 * 0 when more is needed, -1 on a response we cannot read. */
static long parse_response(struct conn *c, uint16_t *status, int *close_after) {
    if (c->have < 12) return 0;
    char *end = memmem(c->in, c->have, "\r\n\r\n", 4);
    if (!end) return c->have == sizeof c->in ? -1 : 0;
    if (memcmp(c->in, "HTTP/1.", 7)) return -1;
    *status = (uint16_t)atoi(c->in + 9);
    long body = 0;
    *close_after = 0;
    for (char *p = memchr(c->in, '\n', (size_t)(end - c->in)); p && p < end;
         p = memchr(p + 1, '\n', (size_t)(end - p))) {
        char *h = p + 1;
        if (!strncasecmp(h, "content-length:", 15)) body = atol(h + 15);
        else if (!strncasecmp(h, "connection:", 11)) {
            char *eol = memchr(h, '\n', (size_t)(end + 2 - h));
            char *cl = strcasestr(h, "close");
            *close_after = cl && eol && cl < eol;
        }
        else if (!strncasecmp(h, "transfer-encoding:", 18)) return -1;
    }
    long total = (end + 4 - c->in) + body;
    if (total > (long)sizeof c->in) return -1;
    return (long)c->have >= total ? total : 0;
}

static void on_readable(struct conn *c) {
    for (;;) {
        size_t room = sizeof c->in - c->have;
        ssize_t got = recv(c->fd, c->in + c->have, room, 0);
        if (got > 0) {
            c->have += (size_t)got;
            /* a short read took all there was: no second recv just to hear EAGAIN (one
             * syscall an answer less; epoll is level-triggered, so anything that arrives
             * later wakes us again) */
            if ((size_t)got < room) break;
            continue;
        }
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        drop_conn(c); /* closed by the server, or reset */
        return;
    }
    while (c->have) {
        uint16_t status = 0;
        int close_after = 0;
        long used = parse_response(c, &status, &close_after);
        if (used == 0) return;
        if (used < 0 || !c->busy) { bad_responses++; drop_conn(c); return; }
        memmove(c->in, c->in + used, c->have - (size_t)used);
        c->have -= (size_t)used;
        finish(c, status);
        if (close_after) { drop_conn(c); return; }
    }
}

static void on_writable(struct conn *c) {
    ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN) { drop_conn(c); return; }
    if (w > 0) c->out_off += (size_t)w;
    if (c->out_off == c->out_len) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

static void plan(void) {
    recs = calloc((size_t)opt.count, sizeof *recs);
    pool = malloc((size_t)users * sizeof *pool);
    in_pool = calloc((size_t)users, 1);
    if (!recs || !pool || !in_pool) die("memory");
    for (long u = 0; u < users; u++) bots += is_bot(u);
    long first = opt.first < 0 || opt.first > users ? users : opt.first;
    if (first > opt.count) first = opt.count;
    long *order = malloc((size_t)users * sizeof *order);
    for (long u = 0; u < users; u++) order[u] = u;
    for (long u = users - 1; u > 0; u--) { /* Fisher-Yates */
        long j = (long)(rng() % (unsigned long long)(u + 1)), t = order[u];
        order[u] = order[j];
        order[j] = t;
    }
    double step = 1e9 / opt.rate;
    for (long i = 0; i < opt.count; i++) {
        recs[i].due_ns = (uint64_t)(i * step);
        if (i < first) recs[i].user = (uint32_t)order[i];
        else recs[i].retry = 1; /* the user is chosen when it is sent: who was refused by then */
    }
    opt.first = first;
    free(order);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    rng_state = opt.seed;
    read_tokens();
    build_request();
    plan();
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl = {(rlim_t)opt.connections + 64, (rlim_t)opt.connections + 64};
    setrlimit(RLIMIT_NOFILE, &rl);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)opt.connections, sizeof *conns);
    idle = malloc((size_t)opt.connections * sizeof *idle);
    for (int i = 0; i < opt.connections; i++)
        if (open_conn(&conns[i]) < 0) conns[i].fd = -1;
    struct epoll_event events[512];
    struct timespec cpu0;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu0);
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    t0 = now_ns();
    long next = 0;
    uint64_t last_progress = 0, last_sweep = 0, timeout_ns = (uint64_t)(opt.timeout_s * 1e9);
    uint64_t max_lag = 0, give_up_ns = (uint64_t)(opt.give_up_s * 1e9);
    long not_sent = 0;
    for (;;) {
        uint64_t now = now_ns() - t0;
        if (now - last_sweep >= 100000000ull) { /* every 0.1 s: reopen, time out */
            last_sweep = now;
            for (int i = 0; i < opt.connections; i++) {
                struct conn *c = &conns[i];
                if (c->fd < 0 && next < opt.count) open_conn(c);
                else if (c->fd >= 0 && c->busy && now - recs[c->attempt].sent_ns > timeout_ns) {
                    timeouts++;
                    drop_conn(c);
                }
            }
        }
        while (next < opt.count && recs[next].due_ns <= now && n_idle) {
            struct conn *c = idle[--n_idle];
            if (recs[next].retry) recs[next].user = (uint32_t)next_retry_user();
            uint64_t lag = now - recs[next].due_ns;
            if (lag > max_lag) max_lag = lag;
            send_attempt(c, next++);
        }
        /* a server that answers far slower than the schedule has not held the rate: past
         * --give-up-behind, the attempts still to send are dropped (recorded as never sent)
         * so that a broken rate costs seconds, not minutes */
        if (give_up_ns && next < opt.count && recs[next].due_ns + give_up_ns < now) {
            not_sent = opt.count - next;
            next = opt.count;
        }
        if (next >= opt.count && !n_busy) break;
        if (now - last_progress >= 1000000000ull) {
            last_progress = now;
            fprintf(stderr, "loadgen: %5.1f s  sent %ld/%ld  answered %ld  in flight %d  "
                    "behind %.1f ms\n", now / 1e9, next, opt.count, answered, n_busy,
                    next < opt.count && recs[next].due_ns < now
                        ? (now - recs[next].due_ns) / 1e6 : 0.0);
        }
        /* sleep until the next attempt is due, to the microsecond (epoll_pwait2): a
         * millisecond timeout would either spin or send late at tens of thousands a second */
        struct timespec wait = {0, 100000000};  /* all sent: wake for answers, time-outs */
        if (next < opt.count && recs[next].due_ns > now) {
            uint64_t gap = recs[next].due_ns - now;
            if (gap < 100000000ull) wait.tv_nsec = (long)gap;
        } else if (next < opt.count) {
            wait.tv_nsec = n_idle ? 0 : 1000000;  /* behind: wait for a connection to free */
        }
        int ready = epoll_pwait2(epfd, events, 512, &wait, NULL);
        for (int k = 0; k < ready; k++) {
            struct conn *c = events[k].data.ptr;
            if (c->fd < 0) continue;
            if (events[k].events & EPOLLOUT) on_writable(c);
            if (c->fd >= 0 && events[k].events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP))
                on_readable(c);
        }
    }
    uint64_t elapsed = now_ns() - t0;
    struct timespec cpu1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu1);
    double cpu = (cpu1.tv_sec - cpu0.tv_sec) + (cpu1.tv_nsec - cpu0.tv_nsec) / 1e9;
    FILE *out = fopen(opt.out_path, "wb");
    if (!out || fwrite(recs, sizeof *recs, (size_t)opt.count, out) != (size_t)opt.count
        || fclose(out))
        die(opt.out_path);
    printf("{\"attempts\": %ld, \"answered\": %ld, \"first_presses\": %ld, \"users\": %ld, "
           "\"bots\": %ld, \"seconds\": %.6f, \"generator_cpu_s\": %.6f, \"max_behind_ms\": %.3f, "
           "\"connect_errors\": %ld, \"closed_in_flight\": %ld, \"bad_responses\": %ld, "
           "\"timeouts\": %ld, \"not_sent\": %ld, \"record_bytes\": %zu, "
           "\"start_unix_ns\": %llu}\n",
           opt.count, answered, opt.first, users, bots, elapsed / 1e9, cpu, max_lag / 1e6,
           connect_errors, closed_in_flight, bad_responses, timeouts, not_sent, sizeof(struct rec),
           (unsigned long long)wall.tv_sec * 1000000000ull + (unsigned long long)wall.tv_nsec);
    return 0;
}
