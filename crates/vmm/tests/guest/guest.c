/*
 * Tiny test guest for vessel-vmm. Runs in 32-bit protected mode without paging or
 * interrupts, polls its devices, and ends the VM through the i8042 reset (or a triple
 * fault in mode=panic). The kernel command line picks what it does:
 *   mode=hello            print a line, reset
 *   mode=count [count=N]  print T1..TN with a busy delay between, then reset
 *   mode=block            exercise every virtio-blk device: get-id, read, write, flush
 *   mode=vsock [connect=P] echo server on vsock; optionally connect out to host port P
 *   mode=balloon          inflate a page, report a free page, wait for a new target
 *   mode=net              send a frame until one comes back, print it
 *   mode=fs               FUSE_INIT and LOOKUP hello.txt over virtio-fs
 *   mode=rng              read the virtio-rng device twice
 *   mode=idle             print IDLE, then halt forever (no CPU use)
 *   mode=panic            triple fault
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0,%1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(port)); return v; }
static inline void pause(void) { __asm__ volatile("pause"); }
extern void triple_fault(void);

static void putc_(char c) {
    while (!(inb(0x3fd) & 0x20))
        pause();
    outb(0x3f8, (u8)c);
}
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void putn(u32 v) {
    char b[12]; int i = 0;
    if (!v) { putc_('0'); return; }
    while (v) { b[i++] = '0' + v % 10; v /= 10; }
    while (i) putc_(b[--i]);
}
static void putx(u32 v) { for (int i = (v > 0xff ? 28 : 4); i >= 0; i -= 4) putc_("0123456789abcdef"[(v >> i) & 15]); }

static void reset(void) {
    puts_("RESET\n");
    for (;;) outb(0x64, 0xfe);
}

static void *memset_(void *d, int c, u32 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
static void memcpy_(void *d, const void *s, u32 n) { u8 *a = d; const u8 *b = s; while (n--) *a++ = *b++; }
void *memset(void *d, int c, unsigned int n) { return memset_(d, c, n); }
void *memcpy(void *d, const void *s, unsigned int n) { memcpy_(d, s, n); return d; }
static int starts(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }
static u32 strlen_(const char *s) { u32 n = 0; while (s[n]) n++; return n; }

/* ---- command line ---- */
static const char *cmdline;
static const char *arg(const char *key) {
    const char *s = cmdline;
    while (s && *s) {
        while (*s == ' ') s++;
        if (starts(s, key)) return s + strlen_(key);
        while (*s && *s != ' ') s++;
    }
    return 0;
}
static u32 arg_num(const char *key, u32 def) {
    const char *v = arg(key);
    if (!v) return def;
    u32 n = 0;
    while (*v >= '0' && *v <= '9') n = n * 10 + (u32)(*v++ - '0');
    return n;
}

/* ---- virtio-mmio ---- */
#define MMIO_BASE 0xd0000000u
#define R(base, off) (*(volatile u32 *)((base) + (off)))
enum { Q_SIZE = 64 };
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[Q_SIZE]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[Q_SIZE]; u16 avail_event; };
struct vq {
    u32 base, index;
    struct desc *desc; struct avail *avail; volatile struct used *used;
    u16 last_used;
};
#define F_NEXT 1
#define F_WRITE 2

static u8 ring_mem[8][4096 * 3] __attribute__((aligned(4096)));
static u32 rings_used;

static u32 find_device(u32 type, u32 nth) {
    for (u32 i = 0; i < 8; i++) {
        u32 b = MMIO_BASE + i * 0x1000;
        if (R(b, 0) == 0x74726976 && R(b, 8) == type && nth-- == 0) return b;
    }
    return 0;
}

static int device_init_features(u32 b, u32 low);
static int device_init(u32 b) { return device_init_features(b, 0); }

static int device_init_features(u32 b, u32 low) {
    R(b, 0x70) = 0;
    R(b, 0x70) = 1;
    R(b, 0x70) = 1 | 2;
    R(b, 0x14) = 1;
    if (!(R(b, 0x10) & 1)) { puts_("no VERSION_1\n"); return -1; }
    R(b, 0x24) = 1; R(b, 0x20) = 1;   /* VIRTIO_F_VERSION_1 only */
    R(b, 0x24) = 0; R(b, 0x14) = 0; R(b, 0x20) = low & R(b, 0x10);
    R(b, 0x70) = 1 | 2 | 8;
    if (!(R(b, 0x70) & 8)) { puts_("FEATURES_OK refused\n"); return -1; }
    return 0;
}

static void vq_init(struct vq *q, u32 b, u32 index) {
    u8 *m = ring_mem[rings_used++];
    memset_(m, 0, sizeof(ring_mem[0]));
    q->base = b; q->index = index;
    q->desc = (struct desc *)m;
    q->avail = (struct avail *)(m + 4096);
    q->used = (struct used *)(m + 8192);
    q->last_used = 0;
    R(b, 0x30) = index;
    if (R(b, 0x34) < Q_SIZE) { puts_("queue too small\n"); reset(); }
    R(b, 0x38) = Q_SIZE;
    R(b, 0x80) = (u32)q->desc; R(b, 0x84) = 0;
    R(b, 0x90) = (u32)q->avail; R(b, 0x94) = 0;
    R(b, 0xa0) = (u32)q->used; R(b, 0xa4) = 0;
    R(b, 0x44) = 1;
}

static void device_ready(u32 b) { R(b, 0x70) = 1 | 2 | 8 | 4; }

/* Makes chain `head` available and notifies the device. */
static void vq_submit(struct vq *q, u16 head) {
    q->avail->ring[q->avail->idx % Q_SIZE] = head;
    barrier();
    q->avail->idx++;
    barrier();
    R(q->base, 0x50) = q->index;
}

/* Returns the next used element, or 0 if none. */
static volatile struct used_elem *vq_poll(struct vq *q) {
    barrier();
    if (q->last_used == q->used->idx) return 0;
    volatile struct used_elem *e = &q->used->ring[q->last_used % Q_SIZE];
    q->last_used++;
    return e;
}

static volatile struct used_elem *vq_wait(struct vq *q) {
    volatile struct used_elem *e;
    while (!(e = vq_poll(q))) pause();
    return e;
}

/* ---- modes ---- */
static void mode_count(void) {
    static volatile u32 tick;   /* in guest RAM, so a snapshot carries it */
    u32 n = arg_num("count=", 20), delay = arg_num("delay=", 200000);
    while (tick < n) {
        for (volatile u32 i = 0; i < delay; i++) pause();
        tick++;
        puts_("T"); putn(tick); puts_("\n");
    }
    puts_("COUNT-DONE\n");
    reset();
}

static u8 blk_hdr[16] __attribute__((aligned(16)));
static u8 blk_data[512] __attribute__((aligned(512)));
static volatile u8 blk_status;

static u8 blk_req(struct vq *q, u32 type, u32 sector, int data_len, int data_dev_writes) {
    *(u32 *)&blk_hdr[0] = type; *(u32 *)&blk_hdr[4] = 0;
    *(u32 *)&blk_hdr[8] = sector; *(u32 *)&blk_hdr[12] = 0;
    blk_status = 0xff;
    int i = 0;
    q->desc[i] = (struct desc){ (u32)blk_hdr, 16, F_NEXT, 1 }; i++;
    if (data_len) { q->desc[i] = (struct desc){ (u32)blk_data, (u32)data_len, F_NEXT | (data_dev_writes ? F_WRITE : 0), 2 }; i++; }
    q->desc[i] = (struct desc){ (u32)&blk_status, 1, F_WRITE, 0 };
    if (!data_len) q->desc[0].next = 1;
    vq_submit(q, 0);
    vq_wait(q);
    return blk_status;
}

static void mode_block(void) {
    for (u32 n = 0;; n++) {
        u32 b = find_device(2, n);
        if (!b) break;
        struct vq q;
        if (device_init(b)) reset();
        vq_init(&q, b, 0);
        device_ready(b);
        u32 cap = R(b, 0x100);
        puts_("BLOCK"); putn(n); puts_(" capacity="); putn(cap);
        memset_(blk_data, 0, 21);
        u8 s = blk_req(&q, 8, 0, 20, 1);
        puts_(" id="); puts_((char *)blk_data); puts_(" idstatus="); putn(s); puts_("\n");
        s = blk_req(&q, 0, 0, 512, 1);
        blk_data[32] = 0;
        puts_("BLOCK"); putn(n); puts_(" read status="); putn(s); puts_(" data="); puts_((char *)blk_data); puts_("\n");
        memset_(blk_data, 0, 512);
        memcpy_(blk_data, "written-by-guest", 16);
        s = blk_req(&q, 1, 1, 512, 0);
        puts_("BLOCK"); putn(n); puts_(" write status="); putn(s); puts_("\n");
        s = blk_req(&q, 4, 0, 0, 0);
        puts_("BLOCK"); putn(n); puts_(" flush status="); putn(s); puts_("\n");
        s = blk_req(&q, 0, cap, 512, 1);
        puts_("BLOCK"); putn(n); puts_(" beyond-end status="); putn(s); puts_("\n");
    }
    puts_("BLOCK-DONE\n");
    reset();
}

static void mode_rng(void) {
    u32 b = find_device(4, 0);
    if (!b) { puts_("no rng device\n"); reset(); }
    struct vq q;
    if (device_init(b)) reset();
    vq_init(&q, b, 0);
    device_ready(b);
    for (int round = 0; round < 2; round++) {
        memset_(blk_data, 0, 16);
        q.desc[0] = (struct desc){ (u32)blk_data, 16, F_WRITE, 0 };
        vq_submit(&q, 0);
        volatile struct used_elem *e = vq_wait(&q);
        puts_("RNG len="); putn(e->len); puts_(" bytes=");
        for (int i = 0; i < 16; i++) { putc_("0123456789abcdef"[blk_data[i] >> 4]); putc_("0123456789abcdef"[blk_data[i] & 15]); }
        puts_("\n");
    }
    puts_("RNG-DONE\n");
    reset();
}

static u8 balloon_pages[2][4096] __attribute__((aligned(4096)));
static u32 pfn_buf[1];

static void mode_balloon(void) {
    u32 b = find_device(5, 0);
    if (!b) { puts_("no balloon device\n"); reset(); }
    struct vq inflate, deflate, report;
    if (device_init_features(b, 1u << 5)) reset();   /* VIRTIO_BALLOON_F_REPORTING */
    vq_init(&inflate, b, 0); vq_init(&deflate, b, 1); vq_init(&report, b, 2);
    device_ready(b);
    u32 target = R(b, 0x100);
    puts_("BALLOON target="); putn(target); puts_("\n");
    balloon_pages[0][0] = 0x5a; balloon_pages[1][100] = 0x5a;
    pfn_buf[0] = (u32)balloon_pages[0] >> 12;
    inflate.desc[0] = (struct desc){ (u32)pfn_buf, 4, 0, 0 };
    vq_submit(&inflate, 0); vq_wait(&inflate);
    R(b, 0x104) = 1;
    puts_("BALLOON inflated page reads "); putn(*(volatile u8 *)&balloon_pages[0][0]); puts_("\n");
    report.desc[0] = (struct desc){ (u32)balloon_pages[1], 4096, F_WRITE, 0 };
    vq_submit(&report, 0); vq_wait(&report);
    puts_("BALLOON reported page reads "); putn(*(volatile u8 *)&balloon_pages[1][100]); puts_("\n");
    puts_("BALLOON-WAIT\n");
    while (R(b, 0x100) == target) pause();
    puts_("BALLOON new target="); putn(R(b, 0x100)); puts_("\n");
    (void)deflate;
    reset();
}

static u8 net_tx[12 + 64] __attribute__((aligned(16)));
static u8 net_rx[4][12 + 1518] __attribute__((aligned(16)));

static void mode_net(void) {
    u32 b = find_device(1, 0);
    if (!b) { puts_("no net device\n"); reset(); }
    struct vq rx, tx;
    if (device_init_features(b, 1u << 5)) reset();   /* VIRTIO_NET_F_MAC */
    vq_init(&rx, b, 0); vq_init(&tx, b, 1);
    device_ready(b);
    u8 mac[6];
    for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(b + 0x100 + i);
    puts_("NET mac="); for (int i = 0; i < 6; i++) { putx(mac[i]); } puts_("\n");
    for (u16 i = 0; i < 4; i++) {
        rx.desc[i] = (struct desc){ (u32)net_rx[i], sizeof(net_rx[i]), F_WRITE, 0 };
        vq_submit(&rx, i);
    }
    /* A broadcast frame, ethertype 0x88b5 (local experimental). */
    memset_(net_tx, 0, sizeof(net_tx));
    u8 *f = net_tx + 12;
    memset_(f, 0xff, 6); memcpy_(f + 6, mac, 6); f[12] = 0x88; f[13] = 0xb5;
    memcpy_(f + 14, "hello-from-guest-net", 20);
    for (u32 tries = 0;; tries++) {
        tx.desc[0] = (struct desc){ (u32)net_tx, sizeof(net_tx), 0, 0 };
        vq_submit(&tx, 0); vq_wait(&tx);
        for (u32 spin = 0; spin < 20000; spin++) {
            volatile struct used_elem *e = vq_poll(&rx);
            if (!e) { pause(); continue; }
            u8 *p = net_rx[e->id] + 12;
            if (p[12] == 0x88 && p[13] == 0xb5) {
                p[14 + 20] = 0;
                puts_("NET-RX "); puts_((char *)p + 14); puts_("\n");
                reset();
            }
            rx.desc[e->id] = (struct desc){ (u32)net_rx[e->id], sizeof(net_rx[0]), F_WRITE, 0 };
            vq_submit(&rx, (u16)e->id);
        }
    }
}

static u8 fuse_in[128] __attribute__((aligned(16)));
static u8 fuse_out[512] __attribute__((aligned(16)));

/* One FUSE request on the request queue: `in_len` bytes in, up to 512 out. */
static u32 fuse_call(struct vq *q, u32 opcode, u64 nodeid, const void *arg, u32 arg_len) {
    static u64 unique = 1;
    u32 len = 40 + arg_len;
    memset_(fuse_in, 0, sizeof(fuse_in));
    memset_(fuse_out, 0, sizeof(fuse_out));
    *(u32 *)&fuse_in[0] = len; *(u32 *)&fuse_in[4] = opcode;
    *(u64 *)&fuse_in[8] = unique++; *(u64 *)&fuse_in[16] = nodeid;
    memcpy_(fuse_in + 40, arg, arg_len);
    q->desc[0] = (struct desc){ (u32)fuse_in, len, F_NEXT, 1 };
    q->desc[1] = (struct desc){ (u32)fuse_out, sizeof(fuse_out), F_WRITE, 0 };
    vq_submit(q, 0);
    volatile struct used_elem *e = vq_wait(q);
    return e->len;
}

static void mode_fs(void) {
    u32 b = find_device(26, 0);
    if (!b) { puts_("no fs device\n"); reset(); }
    struct vq hiprio, req;
    if (device_init(b)) reset();
    vq_init(&hiprio, b, 0); vq_init(&req, b, 1);
    device_ready(b);
    char tag[37]; for (int i = 0; i < 36; i++) tag[i] = *(volatile char *)(b + 0x100 + i); tag[36] = 0;
    puts_("FS tag="); puts_(tag); puts_("\n");
    u32 init_in[4] = { 7, 31, 0, 0 };
    u32 n = fuse_call(&req, 26 /* FUSE_INIT */, 0, init_in, sizeof(init_in));
    puts_("FS-INIT len="); putn(n); puts_(" error="); putn(-*(int *)&fuse_out[4]);
    puts_(" major="); putn(*(u32 *)&fuse_out[16]); puts_(" minor="); putn(*(u32 *)&fuse_out[20]); puts_("\n");
    n = fuse_call(&req, 1 /* FUSE_LOOKUP */, 1, "hello.txt", 10);
    /* fuse_entry_out: nodeid(8) generation(8) entry_valid(8) attr_valid(8) ev_nsec(4) av_nsec(4) attr{ino(8) size(8)...} */
    puts_("FS-LOOKUP error="); putn(-*(int *)&fuse_out[4]);
    puts_(" size="); putn(*(u32 *)&fuse_out[16 + 40 + 8]); puts_("\n");
    (void)hiprio;
    reset();
}

/* vsock */
struct __attribute__((packed)) vhdr {
    u64 src_cid, dst_cid; u32 src_port, dst_port, len; u16 type, op; u32 flags, buf_alloc, fwd_cnt;
};
enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
enum { RX_BUF = 4096 + sizeof(struct vhdr), RXN = 32, CONNS = 64, GUEST_BUF = 65536 };
static u8 rxbufs[RXN][RX_BUF] __attribute__((aligned(16)));
static u8 txbuf[RX_BUF] __attribute__((aligned(16)));
static u8 evbufs[4][8];
static struct vq rxq, txq, evq;
static u32 my_cid;
struct conn { u32 used, local, peer, fwd_cnt; };
static struct conn conns[CONNS];

static struct conn *conn_find(u32 local, u32 peer) {
    for (int i = 0; i < CONNS; i++)
        if (conns[i].used && conns[i].local == local && conns[i].peer == peer) return &conns[i];
    return 0;
}
static struct conn *conn_new(u32 local, u32 peer) {
    for (int i = 0; i < CONNS; i++)
        if (!conns[i].used) { conns[i] = (struct conn){ 1, local, peer, 0 }; return &conns[i]; }
    return 0;
}

static void vsend(u32 local, u32 peer, u16 op, u32 flags, const u8 *data, u32 len, u32 fwd) {
    struct vhdr *h = (struct vhdr *)txbuf;
    *h = (struct vhdr){ my_cid, 2, local, peer, len, 1, op, flags, GUEST_BUF, fwd };
    if (len) memcpy_(txbuf + sizeof(*h), data, len);
    txq.desc[0] = (struct desc){ (u32)txbuf, (u32)sizeof(*h) + len, 0, 0 };
    vq_submit(&txq, 0);
    vq_wait(&txq);
}

static void rx_post(u16 i) {
    rxq.desc[i] = (struct desc){ (u32)rxbufs[i], RX_BUF, F_WRITE, 0 };
    vq_submit(&rxq, i);
}

static void mode_vsock(void) {
    u32 b = find_device(19, 0);
    if (!b) { puts_("no vsock device\n"); reset(); }
    if (device_init(b)) reset();
    my_cid = R(b, 0x100);
    vq_init(&rxq, b, 0); vq_init(&txq, b, 1); vq_init(&evq, b, 2);
    device_ready(b);
    for (u16 i = 0; i < RXN; i++) rx_post(i);
    for (u16 i = 0; i < 4; i++) {
        evq.desc[i] = (struct desc){ (u32)evbufs[i], 8, F_WRITE, 0 };
        vq_submit(&evq, i);
    }
    puts_("VSOCK-READY cid="); putn(my_cid); puts_("\n");
    u32 connect_port = arg_num("connect=", 0);
    const u32 out_local = 5000;
    if (connect_port) vsend(out_local, connect_port, OP_REQUEST, 0, 0, 0, 0);
    for (;;) {
        volatile struct used_elem *e = vq_poll(&rxq);
        if (!e) {
            if (vq_poll(&evq)) { puts_("VSOCK-EVENT transport reset\n"); for (int i = 0; i < CONNS; i++) conns[i].used = 0; }
            pause();
            continue;
        }
        u16 id = (u16)e->id;
        struct vhdr *h = (struct vhdr *)rxbufs[id];
        u8 *payload = rxbufs[id] + sizeof(*h);
        u32 local = h->dst_port, peer = h->src_port, len = h->len;
        if (len > 4096) len = 0;
        struct conn *c = conn_find(local, peer);
        switch (h->op) {
        case OP_REQUEST:
            if (!c) c = conn_new(local, peer);
            vsend(local, peer, c ? OP_RESPONSE : OP_RST, 0, 0, 0, 0);
            break;
        case OP_RESPONSE:
            if (local == out_local && !c) {
                c = conn_new(local, peer);
                puts_("VSOCK-CONNECTED port="); putn(peer); puts_("\n");
                vsend(local, peer, OP_RW, 0, (const u8 *)"hello-from-guest\n", 17, 0);
            }
            break;
        case OP_RW:
            if (!c) { vsend(local, peer, OP_RST, 0, 0, 0, 0); break; }
            c->fwd_cnt += len;
            if (local == out_local) {
                payload[len] = 0;
                puts_("VSOCK-GUEST-ECHO "); puts_((char *)payload);
                vsend(local, peer, OP_CREDIT_UPDATE, 0, 0, 0, c->fwd_cnt);
            } else {
                vsend(local, peer, OP_RW, 0, payload, len, c->fwd_cnt);
            }
            break;
        case OP_CREDIT_REQUEST:
            if (c) vsend(local, peer, OP_CREDIT_UPDATE, 0, 0, 0, c->fwd_cnt);
            break;
        case OP_SHUTDOWN:
            if (c) { vsend(local, peer, OP_RST, 0, 0, 0, 0); c->used = 0; }
            break;
        case OP_RST:
            if (c) c->used = 0;
            else if (local == out_local) puts_("VSOCK-CONNECT-REFUSED\n");
            break;
        default:
            break;
        }
        rx_post(id);
    }
}

void guest_main(u32 start_info) {
    cmdline = (const char *)*(u32 *)(start_info + 24);
    puts_("vessel tiny guest: ");
    puts_(cmdline);
    puts_("\n");
    if (arg("mode=count")) mode_count();
    if (arg("mode=block")) mode_block();
    if (arg("mode=vsock")) mode_vsock();
    if (arg("mode=rng")) mode_rng();
    if (arg("mode=fs")) mode_fs();
    if (arg("mode=net")) mode_net();
    if (arg("mode=balloon")) mode_balloon();
    if (arg("mode=idle")) {
        puts_("IDLE\n");
        for (;;) __asm__ volatile("cli; hlt");
    }
    if (arg("mode=panic")) { puts_("PANIC-NOW\n"); triple_fault(); }
    puts_("Hello from the vessel tiny guest\n");
    (void)putx;
    reset();
}
