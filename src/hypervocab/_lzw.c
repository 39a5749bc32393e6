/*
 * The compiled core of hypervocab's LZW codec: the loops and nothing else.
 *
 * Everything a user touches (argument checking, batching, padding, error
 * messages, pickling) lives in hypervocab/codec.py.  This file trusts its
 * caller: ids and codes arrive as contiguous int64 buffers, the disabled map is
 * a bytes object of length V, and V + C < 2**31.  The rules are the ones of
 * docs/design.md sections 2-3; hypervocab/reference_codec.py states them in Python.
 *
 * Outputs are int64 arrays owned by a tiny `Buffer` object that exposes the
 * buffer protocol, so NumPy wraps them without a copy (np.frombuffer).
 * All heavy work runs with the GIL released; batches run on POSIX threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HASH_MUL 0x9E3779B97F4A7C15ULL
#define PHRASE_SEED 0x243F6A8885A308D3ULL
#define EMPTY_KEY UINT64_MAX

/* ------------------------------------------------------------------------- */
/* Buffer: an owned int64 array exposed through the buffer protocol.         */
/* ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int64_t *data;
    Py_ssize_t len;
} BufferObject;

static void Buffer_dealloc(BufferObject *self) {
    free(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Buffer_getbuffer(BufferObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->len * (Py_ssize_t)sizeof(int64_t), 0, flags);
}

static PyBufferProcs Buffer_as_buffer = {(getbufferproc)Buffer_getbuffer, NULL};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hypervocab._lzw.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_dealloc = (destructor)Buffer_dealloc,
    .tp_as_buffer = &Buffer_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "int64 array owned by the codec core (wrap with numpy.frombuffer).",
};

/* Takes ownership of `data` (malloc'd, may be shrunk here); frees it on failure. */
static PyObject *buffer_wrap(int64_t *data, Py_ssize_t len) {
    if (len > 0) {
        int64_t *shrunk = realloc(data, (size_t)len * sizeof(int64_t));
        if (shrunk) data = shrunk;
    } else {
        free(data);
        data = malloc(sizeof(int64_t)); /* never hand out NULL */
        if (!data) return PyErr_NoMemory();
    }
    BufferObject *b = PyObject_New(BufferObject, &BufferType);
    if (!b) {
        free(data);
        return NULL;
    }
    b->data = data;
    b->len = len;
    return (PyObject *)b;
}

static int64_t *alloc_i64(int64_t n) { return malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t)); }

/* ------------------------------------------------------------------------- */
/* Configuration shared by encoder and decoder.                              */
/* ------------------------------------------------------------------------- */

typedef struct {
    int64_t V, C, M;
    const uint8_t *disabled; /* length V; 1 = never merged */
} cfg_t;

static int parse_cfg(PyObject *args_V, PyObject *args_C, PyObject *args_M, Py_buffer *dis, cfg_t *cfg) {
    cfg->V = PyLong_AsLongLong(args_V);
    cfg->C = PyLong_AsLongLong(args_C);
    cfg->M = PyLong_AsLongLong(args_M);
    if (PyErr_Occurred()) return -1;
    if (dis->len != cfg->V) {
        PyErr_SetString(PyExc_ValueError, "disabled map must have length V");
        return -1;
    }
    cfg->disabled = (const uint8_t *)dis->buf;
    return 0;
}

static int log2_ceil(int64_t x) {
    int b = 1;
    while (((int64_t)1 << b) < x) b++;
    return b;
}

/* ------------------------------------------------------------------------- */
/* Encoder.  The encoder's codebook is prefix-closed (an entry is its known  */
/* prefix plus one id), so it is a trie stored in a hash table keyed by      */
/* (code of the prefix, last id): one probe per input id, no phrase compare. */
/* ------------------------------------------------------------------------- */

typedef struct {
    uint64_t key;
    int64_t val;
} eslot_t;

typedef struct {
    eslot_t *slots;
    int bits;
    int64_t *buf; /* the current phrase, only kept when the codebook is wanted */
} escratch_t;

/* The table starts small and doubles as entries arrive (a huge C costs nothing up front). */
static int escratch_init(escratch_t *s, int64_t cap, int64_t M) {
    if (cap > 4096) cap = 4096;
    s->bits = log2_ceil(2 * cap + 2);
    s->slots = malloc(sizeof(eslot_t) << s->bits);
    s->buf = alloc_i64(M + 1);
    if (!s->slots || !s->buf) {
        free(s->slots);
        free(s->buf);
        return -1;
    }
    return 0;
}

static void escratch_free(escratch_t *s) {
    free(s->slots);
    free(s->buf);
}

/* Double the table, keeping every key.  Returns -1 when memory runs out. */
static int escratch_grow(escratch_t *s) {
    const int bits = s->bits + 1;
    eslot_t *slots = malloc(sizeof(eslot_t) << bits);
    if (!slots) return -1;
    const uint64_t mask = ((uint64_t)1 << bits) - 1;
    for (uint64_t k = 0; k <= mask; k++) slots[k].key = EMPTY_KEY;
    for (uint64_t k = 0; k < ((uint64_t)1 << s->bits); k++) {
        if (s->slots[k].key == EMPTY_KEY) continue;
        uint64_t h = (s->slots[k].key * HASH_MUL) >> (64 - bits);
        while (slots[h].key != EMPTY_KEY) h = (h + 1) & mask;
        slots[h] = s->slots[k];
    }
    free(s->slots);
    s->slots = slots;
    s->bits = bits;
    return 0;
}

/*
 * Encode ids[0:n] into out (room for n codes), stopping once `max_codes` codes
 * are out.  A window never creates the entry that would contain the first id
 * of the next window, so its codes and codebook equal those of encoding the
 * slice ids[0:*consumed] alone.  cb (room for min(C, n) rows of M) receives the
 * phrases padded with -1, or is NULL.  *err is the position of an id outside
 * [0, V), or -1.  Returns the number of codes written.
 */
static int64_t lzw_encode(const cfg_t *cfg, const int64_t *ids, int64_t n, int64_t max_codes, int64_t *out,
                          int64_t *cb, int64_t *cb_n, int64_t *consumed, int64_t *err, escratch_t *s) {
    const int64_t V = cfg->V, C = cfg->C, M = cfg->M;
    const uint8_t *dis = cfg->disabled;
    int shift = 64 - s->bits;
    uint64_t mask = ((uint64_t)1 << s->bits) - 1;
    int64_t grow_at = (int64_t)(mask + 1) / 2; /* keep the load factor at most 1/2 */
    eslot_t *slots = s->slots;
    int64_t *buf = s->buf;
    int64_t nout = 0, ncb = 0, cur = -1, blen = 0, i;

    for (uint64_t k = 0; k <= mask; k++) slots[k].key = EMPTY_KEY;
    *err = -1;
    for (i = 0; i < n; i++) {
        const int64_t t = ids[i];
        if ((uint64_t)t >= (uint64_t)V) {
            *err = i;
            break;
        }
        if (dis[t]) { /* rule 1: flush, pass through, nothing merges across it */
            if (cur >= 0) {
                out[nout++] = cur;
                if (nout == max_codes) break;
            }
            out[nout++] = t;
            cur = -1;
            blen = 0;
            if (nout == max_codes) {
                i++;
                break;
            }
            continue;
        }
        if (cur < 0) {
            cur = t;
            blen = 1;
            if (cb) buf[0] = t;
        } else { /* rule 2: extend the phrase or emit it and start over */
            const uint64_t key = ((uint64_t)cur << 32) | (uint64_t)t;
            uint64_t h = (key * HASH_MUL) >> shift;
            int64_t found = -1;
            while (slots[h].key != EMPTY_KEY) {
                if (slots[h].key == key) {
                    found = slots[h].val;
                    break;
                }
                h = (h + 1) & mask;
            }
            if (found >= 0) {
                cur = found;
                if (cb) buf[blen] = t;
                blen++;
            } else {
                if (nout + 1 == max_codes) { /* last code of a window: t starts the next one */
                    out[nout++] = cur;
                    break;
                }
                if (ncb < C) {
                    if (ncb + 1 >= grow_at) {
                        if (escratch_grow(s) < 0) {
                            *err = -2; /* out of memory */
                            break;
                        }
                        slots = s->slots;
                        shift = 64 - s->bits;
                        mask = ((uint64_t)1 << s->bits) - 1;
                        grow_at = (int64_t)(mask + 1) / 2;
                        h = (key * HASH_MUL) >> shift;
                        while (slots[h].key != EMPTY_KEY) h = (h + 1) & mask;
                    }
                    slots[h].key = key;
                    slots[h].val = V + ncb;
                    if (cb) {
                        int64_t *row = cb + ncb * M, j;
                        for (j = 0; j < blen; j++) row[j] = buf[j];
                        row[blen] = t;
                        for (j = blen + 1; j < M; j++) row[j] = -1;
                    }
                    ncb++;
                }
                out[nout++] = cur;
                cur = t;
                blen = 1;
                if (cb) buf[0] = t;
            }
        }
        if (blen == M) { /* rule 3: a full phrase is emitted, no entry is made */
            out[nout++] = cur;
            cur = -1;
            blen = 0;
            if (nout == max_codes) {
                i++;
                break;
            }
        }
    }
    if (i == n && cur >= 0 && *err == -1) out[nout++] = cur;
    *consumed = i;
    *cb_n = ncb;
    return nout;
}

/* ------------------------------------------------------------------------- */
/* Decoder state.  A model may write base tokens where the encoder would     */
/* have used a hypertoken, so the decoder can install phrases whose prefix   */
/* is not an entry: its table is keyed by the whole phrase (hash + compare). */
/* ------------------------------------------------------------------------- */

typedef struct {
    cfg_t cfg;
    PyObject *disabled_owner; /* keeps cfg.disabled alive (online states only) */
    int64_t n, cap;           /* entries installed, rows allocated (cap <= C) */
    int64_t *phr;             /* cap rows of M ids (row k = id V + k) */
    int64_t *len;             /* cap phrase lengths */
    uint64_t *hsh;            /* cap phrase hashes */
    int32_t *slots;           /* entry index + 1, 0 = empty */
    int bits;
    int64_t *P; /* pending phrase (M ids) */
    int64_t plen;
    uint64_t hP;
    int64_t *E; /* scratch for an expansion built from P (M ids) */
} dstate_t;

static inline uint64_t phrase_step(uint64_t h, int64_t x) { return (h ^ (uint64_t)x) * HASH_MUL + 0x632BE59BD9B4E019ULL; }

static uint64_t phrase_hash(const int64_t *p, int64_t len) {
    uint64_t h = PHRASE_SEED;
    for (int64_t j = 0; j < len; j++) h = phrase_step(h, p[j]);
    return h;
}

static void dstate_free(dstate_t *s) {
    free(s->phr);
    free(s->len);
    free(s->hsh);
    free(s->slots);
    free(s->P);
    free(s->E);
    s->phr = s->len = s->P = s->E = NULL;
    s->hsh = NULL;
    s->slots = NULL;
}

static void slots_insert(dstate_t *s, int64_t e) {
    const uint64_t mask = ((uint64_t)1 << s->bits) - 1;
    uint64_t h = s->hsh[e] >> (64 - s->bits);
    while (s->slots[h]) h = (h + 1) & mask;
    s->slots[h] = (int32_t)(e + 1);
}

/* Make room for `want` rows (capped at C) and a hash table twice as large. */
static int dstate_reserve(dstate_t *s, int64_t want) {
    if (want > s->cfg.C) want = s->cfg.C;
    if (want <= s->cap && s->slots) return 0;
    int64_t cap = s->cap > 0 ? s->cap : 8;
    while (cap < want) cap *= 2;
    if (cap > s->cfg.C) cap = s->cfg.C;
    if (cap < 1) cap = 1;
    int64_t *phr = realloc(s->phr, (size_t)(cap * s->cfg.M) * sizeof(int64_t));
    if (!phr) return -1;
    s->phr = phr;
    int64_t *len = realloc(s->len, (size_t)cap * sizeof(int64_t));
    if (!len) return -1;
    s->len = len;
    uint64_t *hsh = realloc(s->hsh, (size_t)cap * sizeof(uint64_t));
    if (!hsh) return -1;
    s->hsh = hsh;
    int bits = log2_ceil(2 * cap + 2);
    int32_t *slots = calloc((size_t)1 << bits, sizeof(int32_t));
    if (!slots) return -1;
    free(s->slots);
    s->slots = slots;
    s->bits = bits;
    s->cap = cap;
    for (int64_t e = 0; e < s->n; e++) slots_insert(s, e);
    return 0;
}

static int dstate_init(dstate_t *s, const cfg_t *cfg, int64_t initial_rows) {
    memset(s, 0, sizeof(*s));
    s->cfg = *cfg;
    s->P = alloc_i64(cfg->M + 1);
    s->E = alloc_i64(cfg->M + 1);
    s->hP = PHRASE_SEED;
    if (!s->P || !s->E || dstate_reserve(s, initial_rows) < 0) {
        dstate_free(s);
        return -1;
    }
    return 0;
}

static int64_t dstate_find(const dstate_t *s, const int64_t *p, int64_t len, uint64_t h) {
    const uint64_t mask = ((uint64_t)1 << s->bits) - 1;
    uint64_t k = h >> (64 - s->bits);
    int32_t v;
    while ((v = s->slots[k]) != 0) {
        const int64_t e = v - 1;
        if (s->hsh[e] == h && s->len[e] == len && memcmp(s->phr + e * s->cfg.M, p, (size_t)len * sizeof(int64_t)) == 0)
            return e;
        k = (k + 1) & mask;
    }
    return -1;
}

/* Room for one more entry must have been reserved. */
static void dstate_install(dstate_t *s, const int64_t *p, int64_t len, uint64_t h) {
    const int64_t e = s->n++;
    int64_t *row = s->phr + e * s->cfg.M;
    memcpy(row, p, (size_t)len * sizeof(int64_t));
    for (int64_t j = len; j < s->cfg.M; j++) row[j] = -1;
    s->len[e] = len;
    s->hsh[e] = h;
    slots_insert(s, e);
}

/* Undo installs back to n0 entries.  Linear probing allows clearing slots in
 * reverse insertion order: nothing inserted earlier probed past a later key. */
static void dstate_truncate(dstate_t *s, int64_t n0) {
    const uint64_t mask = ((uint64_t)1 << s->bits) - 1;
    while (s->n > n0) {
        const int64_t e = --s->n;
        uint64_t k = s->hsh[e] >> (64 - s->bits);
        while (s->slots[k] != (int32_t)(e + 1)) k = (k + 1) & mask;
        s->slots[k] = 0;
    }
}

static void dstate_set_pending(dstate_t *s, const int64_t *p, int64_t len) {
    memmove(s->P, p, (size_t)len * sizeof(int64_t));
    s->plen = len;
    s->hP = phrase_hash(s->P, len);
}

/* Whether code c may come next (docs/design.md section 3: everything else is invalid). */
static inline int dstate_valid(const dstate_t *s, int64_t c) {
    const int64_t V = s->cfg.V;
    if (c >= 0 && c < V + s->n) return 1;
    return c == V + s->n && s->n < s->cfg.C && s->plen > 0 && s->plen < s->cfg.M;
}

/* Grow *out to hold `need` more ids. */
static int out_reserve(int64_t **out, int64_t *cap, int64_t used, int64_t need) {
    if (used + need <= *cap) return 0;
    int64_t ncap = *cap > 16 ? *cap : 16;
    while (ncap < used + need) ncap *= 2;
    int64_t *p = realloc(*out, (size_t)ncap * sizeof(int64_t));
    if (!p) return -1;
    *out = p;
    *cap = ncap;
    return 0;
}

/*
 * Decode one valid code (the caller has checked dstate_valid) and append its
 * expansion to out (room for M more ids must exist).  Returns the number of
 * ids appended, or -1 when memory for a new entry could not be found.
 */
static int64_t dstate_push(dstate_t *s, int64_t c, int64_t *out) {
    const int64_t V = s->cfg.V, M = s->cfg.M;
    const int64_t *E;
    int64_t elen, j;

    if (s->n == s->cap && s->n < s->cfg.C && dstate_reserve(s, s->n + 1) < 0) return -1;
    if (c < V) {
        if (s->cfg.disabled[c]) { /* rule 1 */
            s->plen = 0;
            s->hP = PHRASE_SEED;
            out[0] = c;
            return 1;
        }
        E = out; /* the expansion is the id itself */
        out[0] = c;
        elen = 1;
    } else if (c < V + s->n) {
        E = s->phr + (c - V) * M;
        elen = s->len[c - V];
        memcpy(out, E, (size_t)elen * sizeof(int64_t));
    } else { /* "KwKwK": the code names the entry it defines, P + P[0] */
        memcpy(s->E, s->P, (size_t)s->plen * sizeof(int64_t));
        s->E[s->plen] = s->P[0];
        elen = s->plen + 1;
        dstate_install(s, s->E, elen, phrase_step(s->hP, s->P[0]));
        memcpy(out, s->E, (size_t)elen * sizeof(int64_t));
        dstate_set_pending(s, s->E, elen);
        return elen;
    }
    /* rule 3: learn from this expansion as the encoder would have */
    if (s->n >= s->cfg.C) {
        s->plen = 0;
        s->hP = PHRASE_SEED;
    } else if (s->plen == 0 || s->plen == M) {
        dstate_set_pending(s, E, elen);
    } else {
        for (j = 0; j < elen; j++) {
            const uint64_t h = phrase_step(s->hP, E[j]);
            s->P[s->plen] = E[j];
            if (dstate_find(s, s->P, s->plen + 1, h) < 0) {
                dstate_install(s, s->P, s->plen + 1, h);
                dstate_set_pending(s, E + j, elen - j);
                break;
            }
            s->plen++;
            s->hP = h;
            if (s->plen == M) {
                dstate_set_pending(s, E + j + 1, elen - j - 1);
                break;
            }
        }
    }
    return elen;
}

enum { ERRORS_STRICT = 0, ERRORS_REPLACE = 1, ERRORS_IGNORE = 2 };

/*
 * Decode codes[0:n] through state s, appending to *out.  Under "strict" the
 * first invalid code stops decoding: *err = its position, and the caller rolls
 * back.  Otherwise an invalid code resets the pending phrase (nothing merges
 * across it) and writes `replacement` when it is >= 0.  Returns -1 on memory
 * failure, else 0.
 */
/* Record, after code i, how many entries exist and the pending phrase (for the model's masks). */
static inline void trace_record(const dstate_t *s, int64_t i, int64_t *trace_n, int64_t *trace_p) {
    const int64_t M = s->cfg.M;
    trace_n[i] = s->n;
    int64_t *row = trace_p + i * M, j;
    for (j = 0; j < s->plen; j++) row[j] = s->P[j];
    for (; j < M; j++) row[j] = -1;
}

static int dstate_decode(dstate_t *s, const int64_t *codes, int64_t n, int errors, int64_t replacement,
                         int64_t **out, int64_t *outn, int64_t *outcap, int64_t *err, int64_t *trace_n,
                         int64_t *trace_p) {
    const int64_t M = s->cfg.M;
    *err = -1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = codes[i];
        if (out_reserve(out, outcap, *outn, M + 1) < 0) return -1;
        if (!dstate_valid(s, c)) {
            if (errors == ERRORS_STRICT) {
                *err = i;
                return 0;
            }
            s->plen = 0;
            s->hP = PHRASE_SEED;
            if (errors == ERRORS_REPLACE && replacement >= 0) (*out)[(*outn)++] = replacement;
            if (trace_n) trace_record(s, i, trace_n, trace_p);
            continue;
        }
        const int64_t k = dstate_push(s, c, *out + *outn);
        if (k < 0) return -1;
        *outn += k;
        if (trace_n) trace_record(s, i, trace_n, trace_p);
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Batches: sequences laid end to end in one buffer, with offsets[B + 1].    */
/* Threads take sequences from a shared counter.                             */
/* ------------------------------------------------------------------------- */

typedef struct {
    const cfg_t *cfg;
    const int64_t *data, *offsets;
    int64_t B, max_codes;
    int want_cb, errors;
    int64_t replacement;
    /* encode outputs: codes at the input's offsets, codebooks at cb_offsets */
    int64_t *out, *nout, *consumed, *err, *cb, *cb_offsets, *cb_n;
    /* decode outputs: one malloc'd array per sequence, joined afterwards */
    int64_t **dout, *dn;
    int64_t *trace_n, *trace_p; /* decode: entries and pending phrase after each code, or NULL */
    int64_t next; /* next sequence to take (atomic) */
    int failed;   /* memory failure (atomic) */
} job_t;

static void *encode_worker(void *arg) {
    job_t *J = arg;
    escratch_t s = {0};
    int64_t scratch_cap = -1;
    for (;;) {
        const int64_t b = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
        if (b >= J->B) break;
        const int64_t lo = J->offsets[b], n = J->offsets[b + 1] - lo;
        int64_t cap = n < J->cfg->C ? n : J->cfg->C;
        if (cap > 4096) cap = 4096;
        if (cap > scratch_cap) { /* size the trie for the longest sequence seen so far (it grows as needed) */
            escratch_free(&s);
            if (escratch_init(&s, cap, J->cfg->M) < 0) {
                __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED);
                s.slots = NULL;
                s.buf = NULL;
                break;
            }
            scratch_cap = cap;
        }
        J->nout[b] = lzw_encode(J->cfg, J->data + lo, n, J->max_codes, J->out + lo,
                                J->want_cb ? J->cb + J->cb_offsets[b] : NULL, &J->cb_n[b], &J->consumed[b], &J->err[b], &s);
        if (J->err[b] == -2) __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED);
    }
    escratch_free(&s);
    return NULL;
}

static void *decode_worker(void *arg) {
    job_t *J = arg;
    for (;;) {
        const int64_t b = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
        if (b >= J->B) break;
        const int64_t lo = J->offsets[b], n = J->offsets[b + 1] - lo;
        dstate_t s;
        int64_t cap = 0, outn = 0;
        int64_t *out = NULL;
        /* a sequence of n codes installs at most n entries; start small and double */
        if (dstate_init(&s, J->cfg, n < 1024 ? n : 1024) < 0 ||
            dstate_decode(&s, J->data + lo, n, J->errors, J->replacement, &out, &outn, &cap, &J->err[b],
                          J->trace_n ? J->trace_n + lo : NULL, J->trace_n ? J->trace_p + lo * J->cfg->M : NULL) < 0) {
            __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED);
            free(out);
            dstate_free(&s);
            J->dout[b] = NULL;
            J->dn[b] = 0;
            continue;
        }
        J->dout[b] = out;
        J->dn[b] = outn;
        J->cb_n[b] = s.n;
        if (J->want_cb) { /* keep the phrases: reuse dout's neighbour slot via cb pointer array */
            int64_t *rows = alloc_i64(s.n * s.cfg.M);
            if (!rows) {
                __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED);
            } else {
                memcpy(rows, s.phr, (size_t)(s.n * s.cfg.M) * sizeof(int64_t));
            }
            J->dout[J->B + b] = rows;
        }
        dstate_free(&s);
    }
    return NULL;
}

static void run_job(job_t *J, void *(*worker)(void *), int nthreads) {
    if (nthreads > J->B) nthreads = (int)J->B;
    if (nthreads <= 1) {
        worker(J);
        return;
    }
    pthread_t *tids = malloc(sizeof(pthread_t) * (size_t)nthreads);
    int started = 0;
    if (tids) {
        for (; started < nthreads - 1; started++)
            if (pthread_create(&tids[started], NULL, worker, J) != 0) break;
    }
    worker(J); /* the calling thread works too */
    for (int k = 0; k < started; k++) pthread_join(tids[k], NULL);
    free(tids);
}

/* Borrow a contiguous int64 buffer. */
static int get_i64(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (view->itemsize != 8 || !view->format || (strcmp(view->format, "q") && strcmp(view->format, "l") && strcmp(view->format, "<q") && strcmp(view->format, "<l") && strcmp(view->format, "=q") && strcmp(view->format, "=l"))) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "expected a contiguous int64 buffer");
        return -1;
    }
    return 0;
}

/*
 * encode(data, offsets, V, C, M, disabled, max_codes, num_threads, want_codebook)
 * -> (codes, ncodes, consumed, err, cb, cb_offsets, cb_n)
 * codes has data's layout; sequence b's codes start at offsets[b].
 */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    PyObject *data_o, *off_o, *V_o, *C_o, *M_o;
    Py_buffer data, off, dis;
    long long max_codes;
    int nthreads, want_cb;
    if (!PyArg_ParseTuple(args, "OOOOOy*Lip", &data_o, &off_o, &V_o, &C_o, &M_o, &dis, &max_codes, &nthreads, &want_cb))
        return NULL;
    PyObject *result = NULL;
    cfg_t cfg;
    int have_data = 0, have_off = 0;
    job_t J;
    memset(&J, 0, sizeof(J));
    if (parse_cfg(V_o, C_o, M_o, &dis, &cfg) < 0) goto done;
    if (get_i64(data_o, &data) < 0) goto done;
    have_data = 1;
    if (get_i64(off_o, &off) < 0) goto done;
    have_off = 1;
    const int64_t B = off.len / 8 - 1, total = data.len / 8;
    const int64_t *offsets = off.buf;
    J.cfg = &cfg;
    J.data = data.buf;
    J.offsets = offsets;
    J.B = B;
    J.max_codes = max_codes > 0 ? max_codes : INT64_MAX;
    J.want_cb = want_cb;
    J.out = alloc_i64(total);
    J.nout = alloc_i64(B);
    J.consumed = alloc_i64(B);
    J.err = alloc_i64(B);
    J.cb_n = alloc_i64(B);
    J.cb_offsets = alloc_i64(B + 1);
    if (!J.out || !J.nout || !J.consumed || !J.err || !J.cb_n || !J.cb_offsets) {
        PyErr_NoMemory();
        goto done;
    }
    J.cb_offsets[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = offsets[b + 1] - offsets[b];
        J.cb_offsets[b + 1] = J.cb_offsets[b] + (want_cb ? (n < cfg.C ? n : cfg.C) * cfg.M : 0);
    }
    J.cb = alloc_i64(J.cb_offsets[B]);
    if (!J.cb) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS run_job(&J, encode_worker, nthreads);
    Py_END_ALLOW_THREADS
    if (J.failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_BuildValue("(NNNNNNN)", buffer_wrap(J.out, total), buffer_wrap(J.nout, B), buffer_wrap(J.consumed, B),
                           buffer_wrap(J.err, B), buffer_wrap(J.cb, J.cb_offsets[B]), buffer_wrap(J.cb_offsets, B + 1),
                           buffer_wrap(J.cb_n, B));
    J.out = J.nout = J.consumed = J.err = J.cb = J.cb_offsets = J.cb_n = NULL; /* now owned by the buffers */
done:
    free(J.out);
    free(J.nout);
    free(J.consumed);
    free(J.err);
    free(J.cb);
    free(J.cb_offsets);
    free(J.cb_n);
    if (have_data) PyBuffer_Release(&data);
    if (have_off) PyBuffer_Release(&off);
    PyBuffer_Release(&dis);
    return result;
}

/*
 * decode(data, offsets, V, C, M, disabled, errors, replacement, num_threads, want_codebook)
 * -> (ids, id_offsets, err, cb, cb_offsets, cb_n)
 */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    PyObject *data_o, *off_o, *V_o, *C_o, *M_o;
    Py_buffer data, off, dis;
    int errors, nthreads, want_cb, want_trace = 0;
    long long replacement;
    if (!PyArg_ParseTuple(args, "OOOOOy*iLip|p", &data_o, &off_o, &V_o, &C_o, &M_o, &dis, &errors, &replacement, &nthreads,
                          &want_cb, &want_trace))
        return NULL;
    PyObject *result = NULL;
    cfg_t cfg;
    int have_data = 0, have_off = 0;
    job_t J;
    memset(&J, 0, sizeof(J));
    int64_t *ids = NULL, *id_off = NULL, *cb = NULL, *cb_off = NULL;
    int64_t B = 0;
    if (parse_cfg(V_o, C_o, M_o, &dis, &cfg) < 0) goto done;
    if (get_i64(data_o, &data) < 0) goto done;
    have_data = 1;
    if (get_i64(off_o, &off) < 0) goto done;
    have_off = 1;
    B = off.len / 8 - 1;
    J.cfg = &cfg;
    J.data = data.buf;
    J.offsets = off.buf;
    J.B = B;
    J.errors = errors;
    J.replacement = replacement;
    J.want_cb = want_cb;
    J.err = alloc_i64(B);
    J.cb_n = alloc_i64(B);
    J.dn = alloc_i64(B);
    J.dout = calloc((size_t)(2 * B + 1), sizeof(int64_t *));
    if (want_trace) {
        J.trace_n = alloc_i64(data.len / 8);
        J.trace_p = alloc_i64(data.len / 8 * cfg.M);
    }
    if (!J.err || !J.cb_n || !J.dn || !J.dout || (want_trace && (!J.trace_n || !J.trace_p))) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS run_job(&J, decode_worker, nthreads);
    Py_END_ALLOW_THREADS
    if (J.failed) {
        PyErr_NoMemory();
        goto done;
    }
    /* join the per-sequence outputs; a single sequence keeps its array */
    id_off = alloc_i64(B + 1);
    cb_off = alloc_i64(B + 1);
    if (!id_off || !cb_off) {
        PyErr_NoMemory();
        goto done;
    }
    id_off[0] = cb_off[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        id_off[b + 1] = id_off[b] + J.dn[b];
        cb_off[b + 1] = cb_off[b] + (want_cb ? J.cb_n[b] * cfg.M : 0);
    }
    if (B == 1) {
        ids = J.dout[0];
        J.dout[0] = NULL;
    } else {
        ids = alloc_i64(id_off[B]);
        if (!ids) {
            PyErr_NoMemory();
            goto done;
        }
        for (int64_t b = 0; b < B; b++)
            if (J.dn[b]) memcpy(ids + id_off[b], J.dout[b], (size_t)J.dn[b] * sizeof(int64_t));
    }
    cb = alloc_i64(cb_off[B]);
    if (!cb) {
        PyErr_NoMemory();
        goto done;
    }
    for (int64_t b = 0; b < B && want_cb; b++)
        if (J.cb_n[b]) memcpy(cb + cb_off[b], J.dout[B + b], (size_t)(J.cb_n[b] * cfg.M) * sizeof(int64_t));
    if (want_trace) {
        result = Py_BuildValue("(NNNNNNNN)", buffer_wrap(ids, id_off[B]), buffer_wrap(id_off, B + 1),
                               buffer_wrap(J.err, B), buffer_wrap(cb, cb_off[B]), buffer_wrap(cb_off, B + 1),
                               buffer_wrap(J.cb_n, B), buffer_wrap(J.trace_n, data.len / 8),
                               buffer_wrap(J.trace_p, data.len / 8 * cfg.M));
        J.trace_n = J.trace_p = NULL;
    } else {
        result = Py_BuildValue("(NNNNNN)", buffer_wrap(ids, id_off[B]), buffer_wrap(id_off, B + 1), buffer_wrap(J.err, B),
                               buffer_wrap(cb, cb_off[B]), buffer_wrap(cb_off, B + 1), buffer_wrap(J.cb_n, B));
    }
    ids = id_off = cb = cb_off = J.err = J.cb_n = NULL;
done:
    if (J.dout)
        for (int64_t b = 0; b < 2 * B; b++) free(J.dout[b]);
    free(J.dout);
    free(J.dn);
    free(J.trace_n);
    free(J.trace_p);
    free(J.err);
    free(J.cb_n);
    free(ids);
    free(id_off);
    free(cb);
    free(cb_off);
    if (have_data) PyBuffer_Release(&data);
    if (have_off) PyBuffer_Release(&off);
    PyBuffer_Release(&dis);
    return result;
}

/* ------------------------------------------------------------------------- */
/* Decoder: the online decoder state as a Python object.                     */
/* ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    dstate_t s;
    uint64_t epoch; /* last push_batch call that saw this state: a state given twice is refused */
} DecoderObject;

static uint64_t push_batch_epoch = 0; /* guarded by the GIL */
static PyObject *core_attr = NULL;     /* "_core": the Decoder inside a hypervocab.DecoderState */

/* The Decoder of a batch item: a Decoder, or an object holding one as `_core` (borrowed), or NULL. */
static DecoderObject *as_decoder(PyObject *d);

static PyTypeObject DecoderType;

static void Decoder_dealloc(DecoderObject *self) {
    dstate_free(&self->s);
    Py_XDECREF(self->s.disabled_owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Decoder(V, C, M, disabled: bytes) */
static PyObject *Decoder_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *V_o, *C_o, *M_o, *dis_o;
    if (!PyArg_ParseTuple(args, "OOOS", &V_o, &C_o, &M_o, &dis_o)) return NULL;
    Py_buffer dis;
    if (PyObject_GetBuffer(dis_o, &dis, PyBUF_SIMPLE) < 0) return NULL;
    cfg_t cfg;
    int rc = parse_cfg(V_o, C_o, M_o, &dis, &cfg);
    PyBuffer_Release(&dis); /* bytes are immutable: the pointer stays valid while we hold a reference */
    if (rc < 0) return NULL;
    DecoderObject *self = (DecoderObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    if (dstate_init(&self->s, &cfg, 8) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    Py_INCREF(dis_o);
    self->s.disabled_owner = dis_o;
    return (PyObject *)self;
}

/* push(codes, errors, replacement) -> (ids, err_position); on a strict error nothing changes. */
static PyObject *Decoder_push(DecoderObject *self, PyObject *args) {
    PyObject *codes_o;
    int errors;
    long long replacement;
    if (!PyArg_ParseTuple(args, "OiL", &codes_o, &errors, &replacement)) return NULL;
    Py_buffer codes;
    if (get_i64(codes_o, &codes) < 0) return NULL;
    dstate_t *s = &self->s;
    const int64_t n0 = s->n, plen0 = s->plen;
    const uint64_t hP0 = s->hP;
    int64_t *P0 = alloc_i64(s->cfg.M + 1);
    int64_t *out = NULL, outn = 0, cap = 0, err = -1;
    int rc = -1;
    if (P0) {
        memcpy(P0, s->P, (size_t)s->plen * sizeof(int64_t));
        /* the GIL stays held: a state shared between threads must not be raced */
        rc = dstate_decode(s, codes.buf, codes.len / 8, errors, replacement, &out, &outn, &cap, &err, NULL, NULL);
    }
    PyBuffer_Release(&codes);
    if (rc < 0 || err >= 0) { /* roll back: a failed push leaves the state as it was */
        dstate_truncate(s, n0);
        if (P0) memcpy(s->P, P0, (size_t)plen0 * sizeof(int64_t));
        s->plen = plen0;
        s->hP = hP0;
    }
    free(P0);
    if (rc < 0) {
        free(out);
        return PyErr_NoMemory();
    }
    if (err >= 0) {
        free(out);
        return Py_BuildValue("(OL)", Py_None, (long long)err);
    }
    return Py_BuildValue("(NL)", buffer_wrap(out, outn), (long long)-1);
}

/* push_one(code) -> number of entries installed (0/1), or -1 when code is invalid (state unchanged). */
static PyObject *Decoder_push_one(DecoderObject *self, PyObject *arg) {
    const long long c = PyLong_AsLongLong(arg);
    if (c == -1 && PyErr_Occurred()) return NULL;
    dstate_t *s = &self->s;
    if (!dstate_valid(s, c)) return PyLong_FromLong(-1);
    int64_t buf[64];
    int64_t *out = s->cfg.M + 1 <= 64 ? buf : alloc_i64(s->cfg.M + 1);
    if (!out) return PyErr_NoMemory();
    const int64_t n0 = s->n, k = dstate_push(s, c, out);
    if (out != buf) free(out);
    if (k < 0) return PyErr_NoMemory();
    return PyLong_FromLongLong(s->n - n0);
}

/* entries(start) -> Buffer of rows [start, n) of M ids, padded with -1 */
static PyObject *Decoder_entries(DecoderObject *self, PyObject *arg) {
    long long start = PyLong_AsLongLong(arg);
    if (start == -1 && PyErr_Occurred()) return NULL;
    dstate_t *s = &self->s;
    if (start < 0) start = 0;
    if (start > s->n) start = s->n;
    const int64_t k = (s->n - start) * s->cfg.M;
    int64_t *rows = alloc_i64(k);
    if (!rows) return PyErr_NoMemory();
    if (k) memcpy(rows, s->phr + start * s->cfg.M, (size_t)k * sizeof(int64_t));
    return buffer_wrap(rows, k);
}

static PyObject *Decoder_pending(DecoderObject *self, PyObject *unused) {
    PyObject *t = PyTuple_New(self->s.plen);
    if (!t) return NULL;
    for (int64_t j = 0; j < self->s.plen; j++) {
        PyObject *v = PyLong_FromLongLong(self->s.P[j]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, j, v);
    }
    return t;
}

static PyObject *Decoder_size(DecoderObject *self, PyObject *unused) { return PyLong_FromLongLong(self->s.n); }

static PyObject *Decoder_copy(DecoderObject *self, PyObject *unused) {
    const dstate_t *s = &self->s;
    DecoderObject *c = (DecoderObject *)DecoderType.tp_alloc(&DecoderType, 0);
    if (!c) return NULL;
    if (dstate_init(&c->s, &s->cfg, s->cap) < 0) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    Py_INCREF(s->disabled_owner);
    c->s.disabled_owner = s->disabled_owner;
    memcpy(c->s.phr, s->phr, (size_t)(s->n * s->cfg.M) * sizeof(int64_t));
    memcpy(c->s.len, s->len, (size_t)s->n * sizeof(int64_t));
    memcpy(c->s.hsh, s->hsh, (size_t)s->n * sizeof(uint64_t));
    if (c->s.bits == s->bits) {
        memcpy(c->s.slots, s->slots, sizeof(int32_t) << s->bits);
        c->s.n = s->n;
    } else {
        for (int64_t e = 0; e < s->n; e++) slots_insert(&c->s, e);
        c->s.n = s->n;
    }
    memcpy(c->s.P, s->P, (size_t)s->plen * sizeof(int64_t));
    c->s.plen = s->plen;
    c->s.hP = s->hP;
    return (PyObject *)c;
}

static PyObject *Decoder_reset(DecoderObject *self, PyObject *unused) {
    dstate_truncate(&self->s, 0);
    self->s.plen = 0;
    self->s.hP = PHRASE_SEED;
    Py_RETURN_NONE;
}

/* load(rows, lengths, pending): restore a state (the caller checked it is consistent). */
static PyObject *Decoder_load(DecoderObject *self, PyObject *args) {
    PyObject *rows_o, *len_o, *p_o;
    if (!PyArg_ParseTuple(args, "OOO", &rows_o, &len_o, &p_o)) return NULL;
    Py_buffer rows, lens, p;
    if (get_i64(rows_o, &rows) < 0) return NULL;
    if (get_i64(len_o, &lens) < 0) {
        PyBuffer_Release(&rows);
        return NULL;
    }
    if (get_i64(p_o, &p) < 0) {
        PyBuffer_Release(&rows);
        PyBuffer_Release(&lens);
        return NULL;
    }
    dstate_t *s = &self->s;
    const int64_t n = lens.len / 8, M = s->cfg.M;
    PyObject *ret = NULL;
    dstate_truncate(s, 0);
    int ok = rows.len / 8 == n * M && p.len / 8 < M + 1 && n <= s->cfg.C;
    for (int64_t e = 0; ok && e < n; e++) {
        const int64_t len = ((const int64_t *)lens.buf)[e];
        ok = len >= 1 && len <= M;
        for (int64_t j = 0; ok && j < len; j++) {
            const int64_t x = ((const int64_t *)rows.buf)[e * M + j];
            ok = x >= 0 && x < s->cfg.V;
        }
    }
    for (int64_t j = 0; ok && j < p.len / 8; j++) ok = ((const int64_t *)p.buf)[j] >= 0 && ((const int64_t *)p.buf)[j] < s->cfg.V;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "inconsistent decoder state");
    } else if (dstate_reserve(s, n) < 0) {
        PyErr_NoMemory();
    } else {
        const int64_t *r = rows.buf, *l = lens.buf;
        for (int64_t e = 0; e < n; e++) dstate_install(s, r + e * M, l[e], phrase_hash(r + e * M, l[e]));
        dstate_set_pending(s, p.buf, p.len / 8);
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&rows);
    PyBuffer_Release(&lens);
    PyBuffer_Release(&p);
    return ret;
}

static PyMethodDef Decoder_methods[] = {
    {"push", (PyCFunction)Decoder_push, METH_VARARGS, "push(codes, errors, replacement) -> (ids | None, err_pos)"},
    {"push_one", (PyCFunction)Decoder_push_one, METH_O, "push_one(code) -> entries installed, or -1 if invalid"},
    {"entries", (PyCFunction)Decoder_entries, METH_O, "entries(start) -> rows [start, n) padded with -1"},
    {"pending", (PyCFunction)Decoder_pending, METH_NOARGS, "the pending phrase"},
    {"size", (PyCFunction)Decoder_size, METH_NOARGS, "number of entries installed"},
    {"copy", (PyCFunction)Decoder_copy, METH_NOARGS, "an independent copy"},
    {"reset", (PyCFunction)Decoder_reset, METH_NOARGS, "forget everything"},
    {"load", (PyCFunction)Decoder_load, METH_VARARGS, "load(rows, lengths, pending)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hypervocab._lzw.Decoder",
    .tp_basicsize = sizeof(DecoderObject),
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Online LZW decoder state (private; use hypervocab.DecoderState).",
    .tp_methods = Decoder_methods,
    .tp_new = Decoder_new,
};

/*
 * push_batch(decoders, codes) -> list of (batch_index, entry_id, phrase tuple), or
 * an int: the index of the first sequence whose code is invalid (then nothing changed).
 * One code per decoder; validity depends only on each state, so checking first
 * makes the step all-or-nothing.
 */
static DecoderObject *as_decoder(PyObject *d) {
    if (Py_TYPE(d) == &DecoderType) return (DecoderObject *)d;
    PyObject *core = PyObject_GetAttr(d, core_attr);
    if (!core) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(core); /* the state keeps it alive for the whole call */
    return Py_TYPE(core) == &DecoderType ? (DecoderObject *)core : NULL;
}

static PyObject *py_push_batch(PyObject *self, PyObject *args) {
    PyObject *decs, *codes_o;
    if (!PyArg_ParseTuple(args, "OO", &decs, &codes_o)) return NULL;
    if (!PyList_Check(decs) && !PyTuple_Check(decs)) {
        PyErr_SetString(PyExc_TypeError, "states must be a list or tuple");
        return NULL;
    }
    Py_buffer codes;
    int64_t small[64];
    int have_buffer = 0;
    const Py_ssize_t B = PySequence_Fast_GET_SIZE(decs);
    PyObject **items = PySequence_Fast_ITEMS(decs);
    const int64_t *c;
    Py_ssize_t ncodes;
    if (PyList_Check(codes_o) && PyList_GET_SIZE(codes_o) <= 64) { /* the common per-step call: no NumPy */
        ncodes = PyList_GET_SIZE(codes_o);
        for (Py_ssize_t b = 0; b < ncodes; b++) {
            PyObject *v = PyList_GET_ITEM(codes_o, b);
            int overflow = 0;
            small[b] = PyLong_Check(v) && !PyBool_Check(v) ? PyLong_AsLongLongAndOverflow(v, &overflow) : 0;
            if (!PyLong_Check(v) || PyBool_Check(v) || overflow) {
                PyErr_SetString(PyExc_TypeError, "codes must be ints that fit in int64");
                return NULL;
            }
        }
        c = small;
    } else {
        if (get_i64(codes_o, &codes) < 0) return NULL;
        have_buffer = 1;
        c = codes.buf;
        ncodes = codes.len / 8;
    }
    PyObject *result = NULL;
    if (ncodes != B) {
        PyErr_SetString(PyExc_TypeError, "one code per decoder");
        goto done;
    }
    const uint64_t epoch = ++push_batch_epoch;
    for (Py_ssize_t b = 0; b < B; b++) {
        DecoderObject *d = as_decoder(items[b]);
        if (!d) {
            PyErr_SetString(PyExc_TypeError, "expected decoder states");
            goto done;
        }
        /* every code is checked against its state before any is applied, so each state may appear once */
        if (d->epoch == epoch) {
            result = PyLong_FromSsize_t(-1 - b);
            goto done;
        }
        d->epoch = epoch;
        if (!dstate_valid(&d->s, c[b])) {
            result = PyLong_FromSsize_t(b);
            goto done;
        }
    }
    result = PyList_New(0);
    if (!result) goto done;
    int64_t buf[64];
    for (Py_ssize_t b = 0; b < B; b++) {
        dstate_t *s = &as_decoder(items[b])->s;
        int64_t *out = s->cfg.M + 1 <= 64 ? buf : alloc_i64(s->cfg.M + 1);
        if (!out) {
            Py_CLEAR(result);
            PyErr_NoMemory();
            goto done;
        }
        const int64_t n0 = s->n, k = dstate_push(s, c[b], out);
        if (out != buf) free(out);
        if (k < 0) {
            Py_CLEAR(result);
            PyErr_NoMemory();
            goto done;
        }
        if (s->n > n0) {
            const int64_t e = s->n - 1, len = s->len[e];
            PyObject *ph = PyTuple_New(len);
            if (!ph) {
                Py_CLEAR(result);
                goto done;
            }
            for (int64_t j = 0; j < len; j++) PyTuple_SET_ITEM(ph, j, PyLong_FromLongLong(s->phr[e * s->cfg.M + j]));
            PyObject *item = Py_BuildValue("(nLN)", b, (long long)(s->cfg.V + e), ph);
            if (!item || PyList_Append(result, item) < 0) {
                Py_XDECREF(item);
                Py_CLEAR(result);
                goto done;
            }
            Py_DECREF(item);
        }
    }
done:
    if (have_buffer) PyBuffer_Release(&codes);
    return result;
}

/*
 * from_lists(batch) -> (flat, offsets), or None when batch is not a list/tuple
 * of lists/tuples of ints that fit in int64 (the caller then takes the slow,
 * well-explained NumPy path).  Much faster than numpy.asarray on Python lists.
 */
static PyObject *py_from_lists(PyObject *self, PyObject *batch) {
    if (!PyList_Check(batch) && !PyTuple_Check(batch)) Py_RETURN_NONE;
    const Py_ssize_t B = PySequence_Fast_GET_SIZE(batch);
    PyObject **rows = PySequence_Fast_ITEMS(batch);
    int64_t total = 0;
    for (Py_ssize_t b = 0; b < B; b++) {
        if (!PyList_Check(rows[b]) && !PyTuple_Check(rows[b])) Py_RETURN_NONE;
        total += PySequence_Fast_GET_SIZE(rows[b]);
    }
    int64_t *flat = alloc_i64(total), *off = alloc_i64(B + 1);
    if (!flat || !off) {
        free(flat);
        free(off);
        return PyErr_NoMemory();
    }
    int64_t k = 0;
    off[0] = 0;
    for (Py_ssize_t b = 0; b < B; b++) {
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(rows[b]);
        PyObject **items = PySequence_Fast_ITEMS(rows[b]);
        for (Py_ssize_t j = 0; j < n; j++) {
            PyObject *v = items[j];
            int overflow = 0;
            const long long x = PyLong_Check(v) && !PyBool_Check(v) ? PyLong_AsLongLongAndOverflow(v, &overflow) : 0;
            if (!PyLong_Check(v) || PyBool_Check(v) || overflow || (x == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                free(flat);
                free(off);
                Py_RETURN_NONE;
            }
            flat[k++] = x;
        }
        off[b + 1] = k;
    }
    return Py_BuildValue("(NN)", buffer_wrap(flat, total), buffer_wrap(off, B + 1));
}

static PyMethodDef module_methods[] = {
    {"from_lists", py_from_lists, METH_O, "from_lists(batch) -> (flat, offsets) or None"},
    {"encode", py_encode, METH_VARARGS, "encode(data, offsets, V, C, M, disabled, max_codes, num_threads, want_codebook)"},
    {"decode", py_decode, METH_VARARGS, "decode(data, offsets, V, C, M, disabled, errors, replacement, num_threads, want_codebook)"},
    {"push_batch", py_push_batch, METH_VARARGS, "push_batch(decoders, codes)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_lzw", "Compiled LZW loops of hypervocab (private).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__lzw(void) {
    if (PyType_Ready(&BufferType) < 0 || PyType_Ready(&DecoderType) < 0) return NULL;
    core_attr = PyUnicode_InternFromString("_core");
    if (!core_attr) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&BufferType);
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "Buffer", (PyObject *)&BufferType) < 0 ||
        PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "ERRORS_STRICT", ERRORS_STRICT);
    PyModule_AddIntConstant(m, "ERRORS_REPLACE", ERRORS_REPLACE);
    PyModule_AddIntConstant(m, "ERRORS_IGNORE", ERRORS_IGNORE);
    return m;
}
