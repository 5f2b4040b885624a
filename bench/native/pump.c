/* The load generator's native rate pump: the steady state of `rate` mode, in C.
 *
 * Why: at 64 KB/s per session the Python generator needs about a core per 2,000 sessions
 * (32,000 sends and 32,000 checked receives a second), so on a 2-core machine the relay and
 * its generator no longer fit and the latency measured is the generator's own lag. This pump
 * does the same work at a small fraction of that cost, so the relay can have a core.
 *
 * Python (bench/loadgen.py, bench/_native.py) still connects every session (TCP, upgrade,
 * HELLO/WELCOME, pairing); it then hands the connected, non-blocking sockets to `pump_run`,
 * which runs in a thread with the GIL released and owns the sockets until it returns:
 *
 *   - heartbeats: one per connection every `hb_interval_ns`, from the due times Python hands
 *     over (the same random phase per connection), and their echoes' latency;
 *   - rate sends: each flow sends one message every `interval_ns` on a schedule with a random
 *     phase per flow; a send more than MAX_LAG_NS late is re-based on now (and counted); a
 *     connection holding more than PENDING_LIMIT unsent bytes skips the send (and counts it);
 *   - receives: every message is checked as bench/loadgen.py checks it (seq the flow's next,
 *     length, the filler byte for byte on every `verify_mask + 1`-th message) and its latency
 *     is `now - the send timestamp in its payload` (CLOCK_MONOTONIC in both processes).
 *
 * The wire format is bench/_wire.py's: a 12-byte rescue header (version 1, kind, flags 0,
 * channel 0, u64 seq) + u64 send timestamp + filler, as one masked WebSocket binary frame
 * (`ws`) or prefixed by its u32 length (`tcp`). Server frames that are fragmented are not
 * expected from any target and are counted as wire errors (the Python generator reassembles
 * them).
 *
 * Control: `ctl[0]` is written by Python, read here every loop (at most every 10 ms):
 * 0 heartbeats only, 1 sending, 2 sending and recording (histograms and counts restart at the
 * first look), 3 stop: no more sends, drain (wait for every flow's messages in flight, at most
 * DRAIN_NS) and return, 4 return now.
 *
 * Histograms: buckets of 1 % on a log scale of microseconds, the same index as loadgen.Hist:
 * floor(log1p(us) * 100), capped at HIST_SIZE - 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HIST_SIZE 1900
#define HIST_SCALE 100.0
#define RECV_CHUNK 262144
#define PENDING_LIMIT (1 << 20)
#define MAX_LAG_NS 1000000000LL
#define DRAIN_NS 15000000000LL
#define CTL_POLL_NS 10000000LL
#define MASK_KEYS 16
#define HEAD_SIZE 20
#define KIND_DATA 0x01
#define KIND_HEARTBEAT 0x02
#define KIND_CLOSE 0x03
#define MAX_EVENTS 512

enum {
    C_MSGS, C_BYTES, C_SENT, C_RECV, C_SEQ_ERRORS, C_CORRUPT, C_DROPPED, C_REBASED,
    C_HB_TX, C_HB_RX, C_RELAY_HB, C_RELAY_CLOSED, C_CONN_ERRORS, C_WIRE_ERRORS,
    C_LOOPS, C_DRAIN_NS, C_COUNT
};

typedef struct {
    int64_t counters[C_COUNT];
    int64_t lat[HIST_SIZE];
    int64_t gen_lag[HIST_SIZE];
    int64_t hb_lat[HIST_SIZE];
} pump_stats;

typedef struct {
    int fd;
    int state;      /* 0 open, 1 closed, 2 closed with a half-sent frame */
    int rx_flow;    /* flow this connection receives, or -1 */
    uint32_t keyi;  /* next mask key */
    uint8_t *carry; /* a partial frame left from the last read */
    size_t carry_len, carry_cap;
    uint8_t *out;   /* bytes the kernel has not taken yet */
    size_t out_len, out_off, out_cap;
    int want_out;
} conn_t;

typedef struct {
    int src, dst;
    uint64_t tx, rx;
} flow_t;

typedef struct {
    int64_t due;
    int32_t idx;
} slot_t;

typedef struct {
    slot_t *v;
    int n;
} heap_t;

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void hist_add(int64_t *h, int64_t ns) {
    double us = ns > 0 ? (double)ns / 1000.0 : 0.0;
    long i = (long)(log1p(us) * HIST_SCALE);
    h[i < HIST_SIZE ? i : HIST_SIZE - 1] += 1;
}

static void heap_down(heap_t *h, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && h->v[l].due < h->v[m].due) m = l;
        if (r < h->n && h->v[r].due < h->v[m].due) m = r;
        if (m == i) return;
        slot_t t = h->v[i];
        h->v[i] = h->v[m];
        h->v[m] = t;
        i = m;
    }
}

static void heap_build(heap_t *h) {
    for (int i = h->n / 2 - 1; i >= 0; i--) heap_down(h, i);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rng(void) { /* xorshift64*: phases and mask keys, nothing that needs more */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = (uint8_t)v; v >>= 8; }
}

static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static int grow(uint8_t **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    uint8_t *p = realloc(*buf, c);
    if (!p) return -1;
    *buf = p;
    *cap = c;
    return 0;
}

typedef struct {
    conn_t *conns;
    flow_t *flows;
    int nconns, nflows;
    int ws;
    int size;
    uint64_t verify_mask;
    const uint8_t *filler;  /* size - HEAD_SIZE bytes */
    uint8_t *masked;        /* MASK_KEYS premasked fillers */
    uint8_t keys[MASK_KEYS][4];
    uint8_t *msg;           /* scratch for one outgoing message */
    int epfd;
    int recording;
    pump_stats *st;
} pump_t;

static void close_conn(pump_t *p, conn_t *c, int counted_error) {
    if (c->state) return;
    c->state = c->out_len > c->out_off ? 2 : 1;
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (counted_error) p->st->counters[C_CONN_ERRORS]++;
}

/* Send now; what the kernel does not take waits in the connection's out buffer. */
static void send_bytes(pump_t *p, conn_t *c, const uint8_t *data, size_t n) {
    if (c->state) return;
    size_t sent = 0;
    if (c->out_len == c->out_off) {
        ssize_t r = send(c->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                close_conn(p, c, 1);
                return;
            }
            r = 0;
        }
        sent = (size_t)r;
        if (sent == n) return;
        c->out_len = c->out_off = 0;
    }
    size_t rest = n - sent;
    if (c->out_off && c->out_off >= c->out_len / 2) { /* keep a buffer that never empties bounded */
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    if (grow(&c->out, &c->out_cap, c->out_len + rest)) {
        close_conn(p, c, 1);
        return;
    }
    memcpy(c->out + c->out_len, data + sent, rest);
    c->out_len += rest;
    if (!c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)(c - p->conns)};
        epoll_ctl(p->epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = 1;
    }
}

static void flush_out(pump_t *p, conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t r = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            close_conn(p, c, 1);
            return;
        }
        c->out_off += (size_t)r;
    }
    c->out_len = c->out_off = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(c - p->conns)};
    epoll_ctl(p->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = 0;
}

/* Write the head of an n-byte message into out (ws: FIN + opcode, length, mask key; tcp: u32 length);
 * returns its length. */
static size_t frame_prefix(pump_t *p, uint8_t *out, size_t n, const uint8_t *key, int opcode) {
    size_t h = 0;
    if (!p->ws) {
        out[0] = (uint8_t)(n >> 24); out[1] = (uint8_t)(n >> 16); out[2] = (uint8_t)(n >> 8); out[3] = (uint8_t)n;
        return 4;
    }
    out[h++] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        out[h++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        out[h++] = 0xFE;
        out[h++] = (uint8_t)(n >> 8);
        out[h++] = (uint8_t)n;
    } else {
        out[h++] = 0xFF;
        put64(out + h, n);
        h += 8;
    }
    memcpy(out + h, key, 4);
    return h + 4;
}

static void send_control(pump_t *p, conn_t *c, const uint8_t *payload, size_t n, int opcode) {
    uint8_t buf[160];
    if (n > 125) return;
    uint8_t key[4];
    uint64_t r = rng();
    memcpy(key, &r, 4);
    size_t h = frame_prefix(p, buf, n, key, opcode);
    for (size_t i = 0; i < n; i++) buf[h + i] = p->ws ? payload[i] ^ key[i & 3] : payload[i];
    send_bytes(p, c, buf, h + n);
}

static void send_heartbeat(pump_t *p, conn_t *c, int64_t now) {
    uint8_t hb[12] = {1, KIND_HEARTBEAT, 0, 0};
    put64(hb + 4, (uint64_t)now);
    send_control(p, c, hb, sizeof hb, 0x2);
    if (!c->state) p->st->counters[C_HB_TX]++;
}

static void send_data(pump_t *p, conn_t *c, uint64_t seq, int64_t now) {
    uint32_t k = c->keyi++ % MASK_KEYS;
    const uint8_t *key = p->keys[k];
    size_t n = (size_t)p->size;
    size_t h = frame_prefix(p, p->msg, n, key, 0x2);
    uint8_t *q = p->msg + h;
    q[0] = 1; q[1] = KIND_DATA; q[2] = 0; q[3] = 0;
    put64(q + 4, seq);
    put64(q + 12, (uint64_t)now);
    if (p->ws)
        for (int i = 0; i < HEAD_SIZE; i++) q[i] ^= key[i & 3]; /* HEAD_SIZE % 4 == 0: key-aligned */
    memcpy(q + HEAD_SIZE, p->ws ? p->masked + (size_t)k * (n - HEAD_SIZE) : p->filler, n - HEAD_SIZE);
    send_bytes(p, c, p->msg, h + n);
}

/* One complete message (payload `b`, `ln` bytes) that is not on the DATA fast path. */
static void on_message(pump_t *p, conn_t *c, const uint8_t *b, size_t ln, int64_t now) {
    int kind = ln >= 2 ? b[1] : -1;
    pump_stats *st = p->st;
    if (kind == KIND_HEARTBEAT && ln >= 12) {
        uint64_t sent = get64(b + 4);
        if (sent == 0) {
            st->counters[C_RELAY_HB]++;
            return;
        }
        st->counters[C_HB_RX]++;
        if (p->recording) hist_add(st->hb_lat, now - (int64_t)sent);
    } else if (kind == KIND_CLOSE) {
        st->counters[C_RELAY_CLOSED]++;
        close_conn(p, c, 0);
    } else if (kind == KIND_DATA) {
        st->counters[C_SEQ_ERRORS]++; /* DATA on a connection that receives no flow, or too short */
    }
    /* anything else (PEER events after pairing) is not part of the measurement */
}

static void on_data(pump_t *p, flow_t *f, const uint8_t *b, size_t ln, int64_t now) {
    pump_stats *st = p->st;
    uint64_t seq = get64(b + 4);
    int64_t ts = (int64_t)get64(b + 12);
    if (seq != f->rx + 1) st->counters[C_SEQ_ERRORS]++;
    f->rx = seq;
    st->counters[C_RECV]++;
    if (ln != (size_t)p->size ||
        (!(seq & p->verify_mask) && memcmp(b + HEAD_SIZE, p->filler, ln - HEAD_SIZE) != 0))
        st->counters[C_CORRUPT]++;
    if (p->recording) {
        st->counters[C_MSGS]++;
        st->counters[C_BYTES] += (int64_t)ln;
        hist_add(st->lat, now - ts);
    }
}

/* Parse complete messages in buf[0:n]; returns the bytes used, or -1 on a wire error. */
static long parse(pump_t *p, conn_t *c, const uint8_t *buf, size_t n, int64_t now) {
    flow_t *f = c->rx_flow >= 0 ? &p->flows[c->rx_flow] : NULL;
    size_t off = 0;
    while (!c->state) {
        const uint8_t *b;
        size_t ln;
        int b0 = 0x82;
        if (!p->ws) {
            if (n - off < 4) break;
            ln = ((size_t)buf[off] << 24) | ((size_t)buf[off + 1] << 16) | ((size_t)buf[off + 2] << 8) | buf[off + 3];
            if (n - off - 4 < ln) break;
            b = buf + off + 4;
            off += 4 + ln;
        } else {
            if (n - off < 2) break;
            b0 = buf[off];
            size_t l = buf[off + 1];
            size_t q = off + 2;
            if (l & 0x80) return -1; /* server frames are never masked */
            if (l == 126) {
                if (n - q < 2) break;
                l = ((size_t)buf[q] << 8) | buf[q + 1];
                q += 2;
            } else if (l == 127) {
                if (n - q < 8) break;
                l = (size_t)get64(buf + q);
                q += 8;
                if (l > (1u << 30)) return -1;
            }
            if (n - q < l) break;
            b = buf + q;
            ln = l;
            off = q + l;
        }
        if (b0 == 0x82) {
            if (f && ln >= HEAD_SIZE && b[1] == KIND_DATA)
                on_data(p, f, b, ln, now);
            else
                on_message(p, c, b, ln, now);
            continue;
        }
        int opcode = b0 & 0x0F;
        if (opcode == 0x9) {
            send_control(p, c, b, ln, 0xA); /* ping: pong with the same payload */
        } else if (opcode == 0x8) {
            p->st->counters[C_RELAY_CLOSED]++;
            close_conn(p, c, 0);
        } else if (opcode != 0xA) {
            return -1; /* text, fragments, unknown opcodes: not something any target sends */
        }
    }
    return (long)off;
}

static void on_readable(pump_t *p, conn_t *c, uint8_t *rbuf) {
    ssize_t r = recv(c->fd, rbuf, RECV_CHUNK, MSG_DONTWAIT);
    if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) close_conn(p, c, 1);
        return;
    }
    if (r == 0) {
        close_conn(p, c, 0);
        return;
    }
    int64_t now = mono_ns();
    const uint8_t *view = rbuf;
    size_t end = (size_t)r;
    if (c->carry_len) {
        if (grow(&c->carry, &c->carry_cap, c->carry_len + end)) {
            close_conn(p, c, 1);
            return;
        }
        memcpy(c->carry + c->carry_len, rbuf, end);
        c->carry_len += end;
        view = c->carry;
        end = c->carry_len;
    }
    long used = parse(p, c, view, end, now);
    if (used < 0) {
        p->st->counters[C_WIRE_ERRORS]++;
        close_conn(p, c, 1);
        return;
    }
    size_t rest = end - (size_t)used;
    if (view == c->carry) {
        memmove(c->carry, c->carry + used, rest);
        c->carry_len = rest;
    } else if (rest) {
        if (grow(&c->carry, &c->carry_cap, rest)) {
            close_conn(p, c, 1);
            return;
        }
        memcpy(c->carry, rbuf + used, rest);
        c->carry_len = rest;
    }
}

static int drained(pump_t *p) {
    for (int i = 0; i < p->nflows; i++) {
        flow_t *f = &p->flows[i];
        if (f->rx != f->tx && !p->conns[f->dst].state) return 0;
    }
    return 1;
}

/* Run the pump (see the top of this file). Returns 0, or -1 when it could not start (errno). */
int pump_run(
    int nconns, const int32_t *fds, const int64_t *hb_due, const uint8_t *carry, const int64_t *carry_off,
    const uint8_t *pending, const int64_t *pending_off,
    int nflows, const int32_t *flow_src, const int32_t *flow_dst,
    int ws, int size, int64_t interval_ns, int64_t hb_interval_ns, int64_t verify_mask,
    const uint8_t *filler, uint64_t seed, volatile int32_t *ctl,
    pump_stats *st, uint64_t *flow_seqs, int32_t *conn_states)
{
    pump_t P = {0};
    pump_t *p = &P;
    int rc = -1;
    size_t fsize = (size_t)size - HEAD_SIZE;
    uint8_t *rbuf = malloc(RECV_CHUNK);
    heap_t hb = {0}, tx = {0};
    struct epoll_event *events = calloc(MAX_EVENTS, sizeof *events);
    rng_state ^= seed | 1;
    memset(st, 0, sizeof *st);
    p->st = st;
    p->nconns = nconns;
    p->nflows = nflows;
    p->ws = ws;
    p->size = size;
    p->verify_mask = (uint64_t)verify_mask;
    p->filler = filler;
    p->conns = calloc((size_t)nconns + 1, sizeof *p->conns);
    p->flows = calloc((size_t)nflows + 1, sizeof *p->flows);
    p->masked = malloc(MASK_KEYS * fsize + 1);
    p->msg = malloc((size_t)size + 16);
    hb.v = calloc((size_t)nconns + 1, sizeof *hb.v);
    tx.v = calloc((size_t)nflows + 1, sizeof *tx.v);
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!rbuf || !events || !p->conns || !p->flows || !p->masked || !p->msg || !hb.v || !tx.v || p->epfd < 0)
        goto out;
    for (int k = 0; k < MASK_KEYS; k++) {
        uint64_t r = rng();
        memcpy(p->keys[k], &r, 4);
        for (size_t i = 0; i < fsize; i++) p->masked[k * fsize + i] = filler[i] ^ p->keys[k][i & 3];
    }
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &p->conns[i];
        c->fd = fds[i];
        c->rx_flow = -1;
        c->keyi = (uint32_t)i;
        hb.v[i].due = hb_due[i];
        hb.v[i].idx = i;
        if (c->fd < 0) {
            c->state = 1;
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, c->fd, &ev)) goto out;
        size_t pn = (size_t)(pending_off[i + 1] - pending_off[i]);
        if (pn) send_bytes(p, c, pending + pending_off[i], pn);
    }
    hb.n = nconns;
    heap_build(&hb);
    for (int i = 0; i < nflows; i++) {
        p->flows[i].src = flow_src[i];
        p->flows[i].dst = flow_dst[i];
        p->conns[flow_dst[i]].rx_flow = i;
    }
    /* bytes Python read past the handshake: parsed before anything new */
    for (int i = 0; i < nconns; i++) {
        size_t cn = (size_t)(carry_off[i + 1] - carry_off[i]);
        if (!cn) continue;
        conn_t *c = &p->conns[i];
        if (grow(&c->carry, &c->carry_cap, cn)) goto out;
        memcpy(c->carry, carry + carry_off[i], cn);
        long used = parse(p, c, c->carry, cn, mono_ns());
        if (used < 0) {
            st->counters[C_WIRE_ERRORS]++;
            close_conn(p, c, 1);
            continue;
        }
        memmove(c->carry, c->carry + used, cn - (size_t)used);
        c->carry_len = cn - (size_t)used;
    }
    rc = 0;
    int sending = 0, stopping = 0;
    int64_t drain_start = 0;
    for (;;) {
        int cmd = __atomic_load_n(ctl, __ATOMIC_ACQUIRE);
        if (cmd >= 4) break;
        int64_t now = mono_ns();
        if (cmd >= 1 && !sending && !stopping) {
            sending = 1;
            for (int i = 0; i < nflows; i++) {
                tx.v[i].due = now + (int64_t)(rng() % (uint64_t)interval_ns);
                tx.v[i].idx = i;
            }
            tx.n = nflows;
            heap_build(&tx);
        }
        if (cmd == 2 && !p->recording && !stopping) {
            /* the window begins: what the warm-up recorded is not part of it */
            st->counters[C_MSGS] = st->counters[C_BYTES] = 0;
            memset(st->lat, 0, sizeof st->lat);
            memset(st->gen_lag, 0, sizeof st->gen_lag);
            memset(st->hb_lat, 0, sizeof st->hb_lat);
            p->recording = 1;
        }
        if (cmd == 3 && !stopping) {
            stopping = 1;
            sending = 0;
            p->recording = 0;
            drain_start = now;
        }
        if (stopping && (drained(p) || now - drain_start > DRAIN_NS)) {
            st->counters[C_DRAIN_NS] = now - drain_start;
            break;
        }
        while (sending && tx.n && tx.v[0].due <= now) {
            int64_t due = tx.v[0].due;
            int64_t lag = now - due;
            flow_t *f = &p->flows[tx.v[0].idx];
            conn_t *src = &p->conns[f->src];
            if (lag > MAX_LAG_NS) {
                st->counters[C_REBASED]++;
                due = now;
            }
            if (src->out_len - src->out_off > PENDING_LIMIT) {
                st->counters[C_DROPPED]++;
            } else if (!src->state) {
                f->tx += 1;
                st->counters[C_SENT]++;
                send_data(p, src, f->tx, mono_ns());
            }
            if (p->recording) hist_add(st->gen_lag, lag);
            tx.v[0].due = due + interval_ns;
            heap_down(&tx, 0);
            now = mono_ns();
        }
        while (hb.n && hb.v[0].due <= now) {
            int64_t due = hb.v[0].due;
            conn_t *c = &p->conns[hb.v[0].idx];
            if (!c->state) send_heartbeat(p, c, mono_ns());
            hb.v[0].due = due + hb_interval_ns > now ? due + hb_interval_ns : now;
            heap_down(&hb, 0);
        }
        int64_t next = now + CTL_POLL_NS;
        if (sending && tx.n && tx.v[0].due < next) next = tx.v[0].due;
        if (hb.n && hb.v[0].due < next) next = hb.v[0].due;
        int64_t wait_ns = next - mono_ns();
        /* whole milliseconds, rounded up, at least 1 ms: sends due within the same ms coalesce */
        int timeout = wait_ns <= 0 ? 0 : (int)((wait_ns + 999999) / 1000000);
        if (stopping && timeout > 10) timeout = 10;
        int ne = epoll_wait(p->epfd, events, MAX_EVENTS, timeout);
        st->counters[C_LOOPS]++;
        if (ne < 0) {
            if (errno == EINTR) continue;
            rc = -1;
            break;
        }
        for (int e = 0; e < ne; e++) {
            conn_t *c = &p->conns[events[e].data.u32];
            if (c->state) continue;
            if (events[e].events & EPOLLOUT) flush_out(p, c);
            if (!c->state && events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(p, c, rbuf);
        }
    }
    for (int i = 0; i < nflows; i++) {
        flow_seqs[2 * i] = p->flows[i].tx;
        flow_seqs[2 * i + 1] = p->flows[i].rx;
    }
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &p->conns[i];
        conn_states[i] = c->state ? c->state : (c->out_len > c->out_off ? 2 : 0);
    }
out:
    if (p->conns)
        for (int i = 0; i < nconns; i++) {
            free(p->conns[i].carry);
            free(p->conns[i].out);
        }
    if (p->epfd >= 0) close(p->epfd);
    free(p->conns);
    free(p->flows);
    free(p->masked);
    free(p->msg);
    free(hb.v);
    free(tx.v);
    free(events);
    free(rbuf);
    return rc;
}

/* The size of pump_stats, so Python can check its ctypes mirror. */
size_t pump_stats_size(void) { return sizeof(pump_stats); }
int pump_counter_count(void) { return C_COUNT; }
