/* sevmigd.psp._accel: the SEND/RECEIVE_UPDATE_DATA page loop of the emulated PSP in C (issue 16).
 *
 * Optional. The pure-Python path (psp/crypto.py + psp/memengine.py, driven by psp/firmware.py) is the
 * reference; this module computes the very same bytes, one call per batch, with the GIL released for the
 * whole batch so that several threads run batches (or page ranges of one batch) on several cores.
 * psp/accel.py chooses between the two and tests/test_psp_accel.py holds them byte-identical.
 *
 * Per page, exactly as the pure path (see the docstrings of memengine.py and crypto.py):
 *   memory engine (LRW, VEK = K1 || K2), block at guest-physical address a:
 *       D(a) = AES_K2(LE128(a));  C = AES_K1(P ^ D(a)) ^ D(a)
 *   transport packet (sev-reference.md section 4): ciphertext = AES-128-CTR(TEK, IV) with the whole IV as
 *   the initial 128-bit big-endian counter; MAC = HMAC-SHA256(TIK, AAD || ciphertext), AAD = ctx u8 ||
 *   FLAGS LE32 || IV || guest length LE32 || transport length LE32 (29 bytes); header = FLAGS LE32 || IV ||
 *   MAC (0x34 bytes).
 *
 * Randomness is the caller's: IVs come in. Keys come in as bytes and live only in this call's stack and
 * OpenSSL contexts, which are cleansed/freed before returning. Errors are reported by return value; the
 * firmware turns them into the same SevError as the pure path.
 *
 * Buffers are pinned with the buffer protocol before the GIL is released (a bytearray cannot be resized
 * while exported). Guest RAM may change under a SEND while it runs (a vCPU writing): the page is then
 * torn exactly as with the pure path, and the dirty log sends it again.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* SHA256_Init/Update/Final and the SHA256_CTX struct are deprecated in OpenSSL 3 (still exported): they
 * are the only way to copy a keyed HMAC state with a memcpy instead of an allocation per packet. */
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096
#define HDR 0x34
#define AAD 29
#define MACLEN 32
#define MAXPKT 0x5000

/* ----------------------------------------------------------------------------------------------------- */
/* keyed contexts of one call                                                                            */

typedef struct {
    EVP_CIPHER_CTX *k1;   /* memory engine data key: decrypt (SEND reads RAM) or encrypt (RECEIVE writes) */
    EVP_CIPHER_CTX *k2;   /* memory engine mask key: always encrypt */
    EVP_CIPHER_CTX *ctr;  /* TEK, AES-128-CTR, IV set per packet */
    SHA256_CTX inner, outer;
} keys_t;

static void keys_free(keys_t *k)
{
    if (k->k1) EVP_CIPHER_CTX_free(k->k1);
    if (k->k2) EVP_CIPHER_CTX_free(k->k2);
    if (k->ctr) EVP_CIPHER_CTX_free(k->ctr);
    OPENSSL_cleanse(&k->inner, sizeof k->inner);
    OPENSSL_cleanse(&k->outer, sizeof k->outer);
    memset(k, 0, sizeof *k);
}

static int ecb_ctx(EVP_CIPHER_CTX **out, const unsigned char *key, int enc)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (!c) return -1;
    *out = c;
    if (EVP_CipherInit_ex(c, EVP_aes_128_ecb(), NULL, key, NULL, enc) != 1) return -1;
    EVP_CIPHER_CTX_set_padding(c, 0);
    return 0;
}

/* vek may be NULL (transport only). engine_encrypt: 1 = RECEIVE (write RAM), 0 = SEND (read RAM). */
static int keys_init(keys_t *k, const unsigned char *vek, int engine_encrypt,
                     const unsigned char *tek, const unsigned char *tik)
{
    unsigned char pad[64];
    int i;
    memset(k, 0, sizeof *k);
    if (vek) {
        if (ecb_ctx(&k->k1, vek, engine_encrypt) || ecb_ctx(&k->k2, vek + 16, 1)) return -1;
    }
    k->ctr = EVP_CIPHER_CTX_new();
    if (!k->ctr || EVP_EncryptInit_ex(k->ctr, EVP_aes_128_ctr(), NULL, tek, NULL) != 1) return -1;
    /* HMAC key = TIK (16 bytes) zero-padded to the SHA-256 block */
    memset(pad, 0x36, sizeof pad);
    for (i = 0; i < 16; i++) pad[i] ^= tik[i];
    SHA256_Init(&k->inner);
    SHA256_Update(&k->inner, pad, 64);
    memset(pad, 0x5c, sizeof pad);
    for (i = 0; i < 16; i++) pad[i] ^= tik[i];
    SHA256_Init(&k->outer);
    SHA256_Update(&k->outer, pad, 64);
    OPENSSL_cleanse(pad, sizeof pad);
    return 0;
}

static int ecb(EVP_CIPHER_CTX *c, unsigned char *out, const unsigned char *in, int len)
{
    int got = 0;
    if (EVP_CipherUpdate(c, out, &got, in, len) != 1 || got != len) return -1;
    return 0;
}

static int ctr(keys_t *k, const unsigned char *iv, unsigned char *out, const unsigned char *in, int len)
{
    int got = 0;
    if (EVP_EncryptInit_ex(k->ctr, NULL, NULL, NULL, iv) != 1) return -1;
    if (EVP_EncryptUpdate(k->ctr, out, &got, in, len) != 1 || got != len) return -1;
    return 0;
}

static void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}

static void mac(keys_t *k, unsigned ctx, const unsigned char *flags_le, const unsigned char *iv,
                const unsigned char *ct, uint32_t len, unsigned char *out)
{
    unsigned char aad[AAD], ih[MACLEN];
    SHA256_CTX c;
    aad[0] = (unsigned char)ctx;
    memcpy(aad + 1, flags_le, 4);
    memcpy(aad + 5, iv, 16);
    put_le32(aad + 21, len);
    put_le32(aad + 25, len);
    c = k->inner;
    SHA256_Update(&c, aad, AAD);
    SHA256_Update(&c, ct, len);
    SHA256_Final(ih, &c);
    c = k->outer;
    SHA256_Update(&c, ih, MACLEN);
    SHA256_Final(out, &c);
    OPENSSL_cleanse(&c, sizeof c);
}

static void xor_into(unsigned char *dst, const unsigned char *a, const unsigned char *b, size_t n)
{
    size_t i;
    for (i = 0; i < n; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        x ^= y;
        memcpy(dst + i, &x, 8);
    }
}

/* Masks D(a) of the 256 blocks of page pfn. */
static int masks(keys_t *k, uint64_t pfn, unsigned char *addr, unsigned char *m)
{
    uint64_t base = pfn * (uint64_t)PAGE;
    int j;
    for (j = 0; j < PAGE / 16; j++) {                   /* LE128(a): low half a, high half 0 */
        uint64_t a = base + (uint64_t)(16 * j), z = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(addr + 16 * j, &a, 8);
#else
        int b;
        for (b = 0; b < 8; b++) addr[16 * j + b] = (unsigned char)(a >> (8 * b));
#endif
        memcpy(addr + 16 * j + 8, &z, 8);
    }
    return ecb(k->k2, m, addr, PAGE);
}

/* plaintext of one RAM page: D_K1(ram ^ D) ^ D, into out */
static int engine_read(keys_t *k, uint64_t pfn, const unsigned char *ram, unsigned char *out,
                       unsigned char *s1, unsigned char *s2)
{
    if (masks(k, pfn, s1, s2)) return -1;               /* s2 = D */
    xor_into(s1, ram, s2, PAGE);                         /* s1 = ram ^ D */
    if (ecb(k->k1, out, s1, PAGE)) return -1;
    xor_into(out, out, s2, PAGE);
    return 0;
}

/* RAM page = E_K1(plain ^ D) ^ D */
static int engine_write(keys_t *k, uint64_t pfn, const unsigned char *plain, unsigned char *ram,
                        unsigned char *s1, unsigned char *s2)
{
    if (masks(k, pfn, s1, s2)) return -1;
    xor_into(s1, plain, s2, PAGE);
    if (ecb(k->k1, ram, s1, PAGE)) return -1;
    xor_into(ram, ram, s2, PAGE);
    return 0;
}

/* ----------------------------------------------------------------------------------------------------- */
/* argument plumbing                                                                                      */

typedef struct { Py_buffer b; int held; } buf_t;

static int get_buf(PyObject *o, buf_t *b, int writable, const char *name)
{
    if (PyObject_GetBuffer(o, &b->b, writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: a C-contiguous%s buffer is required", name,
                     writable ? " writable" : "");
        return -1;
    }
    b->held = 1;
    return 0;
}

static void rel(buf_t *b)
{
    if (b->held) PyBuffer_Release(&b->b);
    b->held = 0;
}

static int need_len(buf_t *b, Py_ssize_t want, const char *name)
{
    if (b->b.len != want) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd bytes, got %zd", name, want, b->b.len);
        return -1;
    }
    return 0;
}

#define NBUF 8
#define RELEASE_ALL(arr) do { int _i; for (_i = 0; _i < NBUF; _i++) rel(&(arr)[_i]); } while (0)

/* The common tail of every entry point: buffers released, then `result` (NULL: the error already set),
 * or RuntimeError when OpenSSL failed inside (rc != 0). */
static PyObject *finish(buf_t *b, int rc, PyObject *result)
{
    RELEASE_ALL(b);
    if (rc && result) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed inside the PSP accelerator");
        return NULL;
    }
    return result;
}

/* ----------------------------------------------------------------------------------------------------- */
/* page ranges on several threads                                                                         */
/* One batch command may be split into contiguous page ranges, one per thread ("PSP engine"); each thread  */
/* keys its own OpenSSL contexts. The calling thread runs the first range; the others run on threads       */
/* created for this call (pthread_create + join cost ~10-30 us per batch, no Python, no GIL). If a thread  */
/* cannot be created, its range runs on the calling thread: the result is the same.                        */

#define MIN_RANGE_PAGES 32
#define MAX_WORKERS 64

typedef struct {
    const unsigned char *vek, *tek, *tik;
    unsigned ctx;
    unsigned char *ram;
    const int64_t *pfns;
    const unsigned char *ivs;    /* SEND */
    unsigned char *hd_out;       /* SEND */
    unsigned char *data_out;     /* SEND */
    const unsigned char *hd_in;  /* RECEIVE */
    const unsigned char *data_in;/* RECEIVE */
} batch_t;

typedef struct {
    const batch_t *b;
    Py_ssize_t s, e;
    int mode;          /* RECEIVE: 0 verify+apply (stop at first bad), 1 verify only, 2 apply only */
    Py_ssize_t good;   /* RECEIVE: leading packets of [s, e) that verified (e - s when all did) */
    int rc;
    int (*fn)(void *);
} job_t;

static int send_range(void *arg)
{
    job_t *j = arg;
    const batch_t *b = j->b;
    keys_t k;
    unsigned char *s1 = NULL, *s2 = NULL;
    static const unsigned char zero4[4] = {0, 0, 0, 0};
    Py_ssize_t i;
    int rc = keys_init(&k, b->vek, 0, b->tek, b->tik);
    if (!rc) {
        s1 = OPENSSL_malloc(PAGE);
        s2 = OPENSSL_malloc(PAGE);
        if (!s1 || !s2) rc = -1;
    }
    for (i = j->s; !rc && i < j->e; i++) {
        int64_t p;
        unsigned char *h = b->hd_out + i * HDR, *out = b->data_out + i * PAGE;
        const unsigned char *iv = b->ivs + 16 * i;
        memcpy(&p, b->pfns + i, 8);
        /* plaintext straight into the output page, then CTR there in place */
        if (engine_read(&k, (uint64_t)p, b->ram + (size_t)p * PAGE, out, s1, s2) || ctr(&k, iv, out, out, PAGE)) {
            rc = -1;
            break;
        }
        memcpy(h, zero4, 4);
        memcpy(h + 4, iv, 16);
        mac(&k, b->ctx, zero4, iv, out, PAGE, h + 20);
    }
    if (s1) { OPENSSL_cleanse(s1, PAGE); OPENSSL_free(s1); }
    if (s2) { OPENSSL_cleanse(s2, PAGE); OPENSSL_free(s2); }
    keys_free(&k);
    j->rc = rc;
    return rc;
}

static int receive_range(void *arg)
{
    job_t *j = arg;
    const batch_t *b = j->b;
    keys_t k;
    unsigned char *s1 = NULL, *s2 = NULL, *pt = NULL;
    unsigned char want[MACLEN];
    Py_ssize_t i;
    int failed = 0;
    int rc = keys_init(&k, b->vek, 1, b->tek, b->tik);
    if (!rc) {
        s1 = OPENSSL_malloc(PAGE);
        s2 = OPENSSL_malloc(PAGE);
        pt = OPENSSL_malloc(PAGE);
        if (!s1 || !s2 || !pt) rc = -1;
    }
    j->good = j->e - j->s;
    for (i = j->s; !rc && i < j->e; i++) {
        const unsigned char *h = b->hd_in + i * HDR, *ct = b->data_in + i * PAGE;
        int64_t p;
        memcpy(&p, b->pfns + i, 8);
        if (j->mode != 2) {
            mac(&k, b->ctx, h, h + 4, ct, PAGE, want);
            if (CRYPTO_memcmp(want, h + 20, MACLEN) != 0) {   /* constant time over the 32 bytes */
                if (!failed) { failed = 1; j->good = i - j->s; }
                if (j->mode == 0) break;
                continue;                                       /* mode 1: every MAC computed in full */
            }
            if (j->mode == 1) continue;
        }
        if (ctr(&k, h + 4, pt, ct, PAGE) || engine_write(&k, (uint64_t)p, pt, b->ram + (size_t)p * PAGE, s1, s2)) {
            rc = -1;
            break;
        }
    }
    if (s1) { OPENSSL_cleanse(s1, PAGE); OPENSSL_free(s1); }
    if (s2) { OPENSSL_cleanse(s2, PAGE); OPENSSL_free(s2); }
    if (pt) { OPENSSL_cleanse(pt, PAGE); OPENSSL_free(pt); }
    keys_free(&k);
    j->rc = rc;
    return rc;
}

static void *thread_main(void *arg)
{
    job_t *j = arg;
    j->fn(j);
    return NULL;
}

/* Split [0, n) into at most `workers` ranges of at least MIN_RANGE_PAGES (one range when n is smaller). */
static int split(Py_ssize_t n, int workers, job_t *jobs, const batch_t *b, int mode, int (*fn)(void *))
{
    int k = workers, i;
    Py_ssize_t step, extra, s = 0;
    if (k > MAX_WORKERS) k = MAX_WORKERS;
    if (k > n / MIN_RANGE_PAGES) k = (int)(n / MIN_RANGE_PAGES);
    if (k < 1) k = 1;
    step = n / k;
    extra = n % k;
    for (i = 0; i < k; i++) {
        Py_ssize_t e = s + step + (i < extra ? 1 : 0);
        jobs[i].b = b; jobs[i].s = s; jobs[i].e = e; jobs[i].mode = mode;
        jobs[i].good = 0; jobs[i].rc = 0; jobs[i].fn = fn;
        s = e;
    }
    return k;
}

/* Run the jobs: 1..k-1 on new threads, 0 here; returns nonzero when any failed inside OpenSSL. */
static int run_jobs(job_t *jobs, int k)
{
    pthread_t th[MAX_WORKERS];
    int started[MAX_WORKERS];
    int i, rc = 0;
    for (i = 1; i < k; i++) started[i] = pthread_create(&th[i], NULL, thread_main, &jobs[i]) == 0;
    jobs[0].fn(&jobs[0]);
    for (i = 1; i < k; i++) {
        if (started[i]) pthread_join(th[i], NULL);
        else jobs[i].fn(&jobs[i]);
    }
    for (i = 0; i < k; i++) rc |= jobs[i].rc;
    return rc;
}

static int check_pfns(const int64_t *pf, Py_ssize_t n, Py_ssize_t npages)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        int64_t p;
        memcpy(&p, pf + i, 8);
        if (p < 0 || p >= npages) {
            PyErr_Format(PyExc_IndexError, "page %lld is outside guest memory", (long long)p);
            return -1;
        }
    }
    return 0;
}

/* ----------------------------------------------------------------------------------------------------- */
/* send_pages(vek, tek, tik, ctx, ram, pfns, ivs, headers_out, data_out, workers=1) -> None               */

static PyObject *send_pages(PyObject *self, PyObject *args)
{
    PyObject *o[9];
    buf_t b[NBUF];
    unsigned ctx;
    int workers = 1;
    Py_ssize_t n;
    int rc = 0;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "OOOIOOOOO|i", &o[0], &o[1], &o[2], &ctx, &o[4], &o[5], &o[6], &o[7], &o[8],
                          &workers))
        return NULL;
    if (get_buf(o[0], &b[0], 0, "vek") || get_buf(o[1], &b[1], 0, "tek") || get_buf(o[2], &b[2], 0, "tik")
        || get_buf(o[4], &b[3], 0, "ram") || get_buf(o[5], &b[4], 0, "pfns") || get_buf(o[6], &b[5], 0, "ivs")
        || get_buf(o[7], &b[6], 1, "headers") || get_buf(o[8], &b[7], 1, "data"))
        goto fail;
    n = b[4].b.len / 8;
    if (need_len(&b[0], 32, "vek") || need_len(&b[1], 16, "tek") || need_len(&b[2], 16, "tik")
        || need_len(&b[4], n * 8, "pfns") || need_len(&b[5], n * 16, "ivs")
        || need_len(&b[6], n * HDR, "headers") || need_len(&b[7], n * PAGE, "data"))
        goto fail;
    if (check_pfns(b[4].b.buf, n, b[3].b.len / PAGE)) goto fail;
    if (n) {
        batch_t bt = {b[0].b.buf, b[1].b.buf, b[2].b.buf, ctx, b[3].b.buf, b[4].b.buf, b[5].b.buf,
                      b[6].b.buf, b[7].b.buf, NULL, NULL};
        job_t jobs[MAX_WORKERS];
        Py_BEGIN_ALLOW_THREADS
        rc = run_jobs(jobs, split(n, workers, jobs, &bt, 0, send_range));
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    return finish(b, rc, Py_None);
fail:
    return finish(b, 0, NULL);
}

/* ----------------------------------------------------------------------------------------------------- */
/* receive_pages(vek, tek, tik, ctx, ram, pfns, headers, data, workers=1) -> int                          */
/* Verify each packet's MAC, decrypt, write the page under the VEK; returns how many leading packets were */
/* applied (n when all verify). Nothing at or after the first bad packet is written:                       */
/* - one range: per page verify then apply, stop at the first bad MAC;                                   */
/* - several ranges (only when the page numbers strictly increase, so no two ranges write one page):     */
/*   all ranges verify in parallel (every MAC in full), then the pages before the first bad packet are   */
/*   decrypted and written in parallel.                                                                  */

static PyObject *receive_pages(PyObject *self, PyObject *args)
{
    PyObject *o[9];
    buf_t b[NBUF];
    unsigned ctx;
    int workers = 1;
    Py_ssize_t n, i, good = 0;
    int rc = 0;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "OOOIOOOO|i", &o[0], &o[1], &o[2], &ctx, &o[4], &o[5], &o[6], &o[7], &workers))
        return NULL;
    if (get_buf(o[0], &b[0], 0, "vek") || get_buf(o[1], &b[1], 0, "tek") || get_buf(o[2], &b[2], 0, "tik")
        || get_buf(o[4], &b[3], 1, "ram") || get_buf(o[5], &b[4], 0, "pfns")
        || get_buf(o[6], &b[5], 0, "headers") || get_buf(o[7], &b[6], 0, "data"))
        goto fail;
    n = b[4].b.len / 8;
    if (need_len(&b[0], 32, "vek") || need_len(&b[1], 16, "tek") || need_len(&b[2], 16, "tik")
        || need_len(&b[4], n * 8, "pfns") || need_len(&b[5], n * HDR, "headers")
        || need_len(&b[6], n * PAGE, "data"))
        goto fail;
    if (check_pfns(b[4].b.buf, n, b[3].b.len / PAGE)) goto fail;
    if (workers > 1) {                     /* a repeated page ("later packets win"): one range keeps it exact */
        const int64_t *pf = b[4].b.buf;
        for (i = 1; i < n; i++) {
            int64_t x, y;
            memcpy(&x, pf + i - 1, 8);
            memcpy(&y, pf + i, 8);
            if (y <= x) { workers = 1; break; }
        }
    }
    if (n) {
        batch_t bt = {b[0].b.buf, b[1].b.buf, b[2].b.buf, ctx, b[3].b.buf, b[4].b.buf, NULL, NULL, NULL,
                      b[5].b.buf, b[6].b.buf};
        job_t jobs[MAX_WORKERS];
        Py_BEGIN_ALLOW_THREADS
        int k = split(n, workers, jobs, &bt, 0, receive_range);
        if (k == 1) {
            rc = run_jobs(jobs, 1);
            good = jobs[0].good;
        } else {
            int j;
            for (j = 0; j < k; j++) jobs[j].mode = 1;
            rc = run_jobs(jobs, k);
            good = n;
            for (j = 0; j < k; j++) {
                if (jobs[j].good < jobs[j].e - jobs[j].s) { good = jobs[j].s + jobs[j].good; break; }
            }
            if (!rc && good) rc = run_jobs(jobs, split(good, workers, jobs, &bt, 2, receive_range));
        }
        Py_END_ALLOW_THREADS
    }
    return finish(b, rc, PyLong_FromSsize_t(good));
fail:
    return finish(b, 0, NULL);
}

/* ----------------------------------------------------------------------------------------------------- */
/* Transport packets alone (no memory engine), for the golden vectors and any packet length:             */
/* seal_packets(tek, tik, ctx, ivs, plaintext, packet_len, headers_out, data_out) -> None                 */
/* open_packets(tek, tik, ctx, headers, ciphertext, packet_len, out) -> leading packets verified+opened   */

static PyObject *seal_packets(PyObject *self, PyObject *args)
{
    PyObject *o[8];
    buf_t b[NBUF];
    unsigned ctx;
    Py_ssize_t plen, n, i;
    int rc = 0;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "OOIOOnOO", &o[0], &o[1], &ctx, &o[3], &o[4], &plen, &o[6], &o[7]))
        return NULL;
    if (plen <= 0 || plen > MAXPKT || plen % 16) {
        PyErr_SetString(PyExc_ValueError, "packet_len must be a multiple of 16 in 16..0x5000");
        return NULL;
    }
    if (get_buf(o[0], &b[0], 0, "tek") || get_buf(o[1], &b[1], 0, "tik") || get_buf(o[3], &b[2], 0, "ivs")
        || get_buf(o[4], &b[3], 0, "plaintext") || get_buf(o[6], &b[4], 1, "headers")
        || get_buf(o[7], &b[5], 1, "data"))
        goto fail;
    n = b[2].b.len / 16;
    if (need_len(&b[0], 16, "tek") || need_len(&b[1], 16, "tik") || need_len(&b[2], n * 16, "ivs")
        || need_len(&b[3], n * plen, "plaintext") || need_len(&b[4], n * HDR, "headers")
        || need_len(&b[5], n * plen, "data"))
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    {
        keys_t k;
        static const unsigned char zero4[4] = {0, 0, 0, 0};
        const unsigned char *ivs = b[2].b.buf, *pt = b[3].b.buf;
        unsigned char *hd = b[4].b.buf, *out = b[5].b.buf;
        rc = keys_init(&k, NULL, 0, b[0].b.buf, b[1].b.buf);
        for (i = 0; !rc && i < n; i++) {
            const unsigned char *iv = ivs + 16 * i;
            unsigned char *h = hd + i * HDR, *c = out + i * plen;
            if (ctr(&k, iv, c, pt + i * plen, (int)plen)) { rc = -1; break; }
            memcpy(h, zero4, 4);
            memcpy(h + 4, iv, 16);
            mac(&k, ctx, zero4, iv, c, (uint32_t)plen, h + 20);
        }
        keys_free(&k);
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    return finish(b, rc, Py_None);
fail:
    return finish(b, 0, NULL);
}

static PyObject *open_packets(PyObject *self, PyObject *args)
{
    PyObject *o[7];
    buf_t b[NBUF];
    unsigned ctx;
    Py_ssize_t plen, n, i, good = 0;
    int rc = 0;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "OOIOOnO", &o[0], &o[1], &ctx, &o[3], &o[4], &plen, &o[6]))
        return NULL;
    if (plen <= 0 || plen > MAXPKT || plen % 16) {
        PyErr_SetString(PyExc_ValueError, "packet_len must be a multiple of 16 in 16..0x5000");
        return NULL;
    }
    if (get_buf(o[0], &b[0], 0, "tek") || get_buf(o[1], &b[1], 0, "tik") || get_buf(o[3], &b[2], 0, "headers")
        || get_buf(o[4], &b[3], 0, "ciphertext") || get_buf(o[6], &b[4], 1, "out"))
        goto fail;
    n = b[2].b.len / HDR;
    if (need_len(&b[0], 16, "tek") || need_len(&b[1], 16, "tik") || need_len(&b[2], n * HDR, "headers")
        || need_len(&b[3], n * plen, "ciphertext") || need_len(&b[4], n * plen, "out"))
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    {
        keys_t k;
        unsigned char want[MACLEN];
        const unsigned char *hd = b[2].b.buf, *ct = b[3].b.buf;
        unsigned char *out = b[4].b.buf;
        rc = keys_init(&k, NULL, 0, b[0].b.buf, b[1].b.buf);
        for (i = 0; !rc && i < n; i++) {
            const unsigned char *h = hd + i * HDR, *c = ct + i * plen;
            mac(&k, ctx, h, h + 4, c, (uint32_t)plen, want);
            if (CRYPTO_memcmp(want, h + 20, MACLEN) != 0) break;
            if (ctr(&k, h + 4, out + i * plen, c, (int)plen)) { rc = -1; break; }
        }
        good = i;
        keys_free(&k);
    }
    Py_END_ALLOW_THREADS
    return finish(b, rc, PyLong_FromSsize_t(good));
fail:
    return finish(b, 0, NULL);
}

static PyMethodDef methods[] = {
    {"send_pages", send_pages, METH_VARARGS,
     "send_pages(vek, tek, tik, ctx, ram, pfns_int64, ivs, headers_out, data_out, workers=1): SEND_UPDATE_DATA "
     "of N pages, split over `workers` threads."},
    {"receive_pages", receive_pages, METH_VARARGS,
     "receive_pages(vek, tek, tik, ctx, ram, pfns_int64, headers, data, workers=1) -> int: RECEIVE_UPDATE_DATA "
     "of N pages; returns the leading packets applied (N when every MAC verifies)."},
    {"seal_packets", seal_packets, METH_VARARGS,
     "seal_packets(tek, tik, ctx, ivs, plaintext, packet_len, headers_out, data_out): N transport packets."},
    {"open_packets", open_packets, METH_VARARGS,
     "open_packets(tek, tik, ctx, headers, ciphertext, packet_len, out) -> leading packets verified and opened."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sevmigd.psp._accel",
    "Compiled SEND/RECEIVE_UPDATE_DATA page loop (optional; see psp/accel.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__accel(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddStringConstant(m, "openssl_version", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
