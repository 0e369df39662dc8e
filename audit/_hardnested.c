/* The hot loops of the hardnested attack (audit/hardnested.py): the sum-property counts of every half state,
 * and the brute force of (odd, even) initial states against the collected encrypted nonces, on threads.
 *
 * The state and its clock are those of crypto1_core.h (as cardsim/crypto1.py has them). The initial state of an
 * authentication is the key itself, so a state that explains every nonce is the key.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdlib.h>

#include "crypto1_core.h"

#include <string.h>

#define MAX_FOUND 4096 /* more survivors than this means too few nonces: the caller collects more */
#define MAX_THREADS 64

/* The XOR of the filter outputs the 20 low bits of a half give while it takes k fed bits (k = 0..4 low bits of
 * ``fed``, first fed highest), starting with ``first`` shifts: this is the half's share of the parity of the
 * keystream bits 0..8 of an authentication (odd half: clocks 0, 2, 4, 6, 8; even: 1, 3, 5, 7). */
static uint32_t half_parity(uint32_t half, uint32_t fed, int odd) {
    uint32_t acc = 0;
    int start = odd ? 0 : 1;
    for (int k = start; k <= 4; k++) {
        uint32_t x = (half << k) | (fed >> (4 - k));
        acc ^= filter(x);
    }
    return acc;
}

/* half_sums() -> (bytes, bytes): for each of the 2^20 low-20-bit patterns of the odd half, the count p of the
 * 16 fed nibbles that give its share 1; the same (q) for the even half. Sum(a0) = p(16 - q) + (16 - p)q. */
static PyObject *half_sums(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *odd = PyBytes_FromStringAndSize(NULL, 1 << 20);
    PyObject *even = PyBytes_FromStringAndSize(NULL, 1 << 20);
    if (odd == NULL || even == NULL) {
        Py_XDECREF(odd);
        Py_XDECREF(even);
        return NULL;
    }
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(odd), *q = (uint8_t *)PyBytes_AS_STRING(even);
    Py_BEGIN_ALLOW_THREADS
    for (uint32_t half = 0; half < (1u << 20); half++) {
        uint8_t po = 0, qe = 0;
        for (uint32_t fed = 0; fed < 16; fed++) {
            po += (uint8_t)half_parity(half, fed, 1);
            qe += (uint8_t)half_parity(half, fed, 0);
        }
        p[half] = po;
        q[half] = qe;
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NN)", odd, even);
}

typedef struct {
    const uint32_t *odd, *even;
    size_t n_odd, n_even;
    const uint32_t *fed;    /* per nonce: uid ^ {nT} */
    const uint8_t *targets; /* per nonce, bit k: parity(keystream byte k) ^ keystream bit 8k+8 */
    size_t n_nonces;
    const uint32_t *fed8;    /* brute_force8: the nonces of the chosen first byte B, checked from the state after B */
    const uint8_t *targets8;
    size_t n8;
    const void *planes; /* bitsliced brute_force8: the even list as bit planes, 24 vectors per block of lanes */
    size_t begin, end; /* this thread's share of the odd list */
    uint64_t found[MAX_FOUND];
    size_t n_found;
} Work;

/* Whether the initial state (odd, even) explains every nonce: decrypting {nT} while feeding uid ^ nT, each
 * encrypted parity bit checks. A wrong state fails after ~17 clocks on average (each check halves them). */
static inline int explains(uint32_t odd, uint32_t even, const Work *w) {
    for (size_t n = 0; n < w->n_nonces; n++) {
        State s = {odd, even};
        uint32_t fed = w->fed[n], target = w->targets[n], acc = 0;
        for (int i = 0; i < 32; i++) {
            acc ^= clock_bit(&s, bebit(fed, i), 1);
            if ((i & 7) == 7) {
                if ((acc ^ filter(s.odd)) != ((target >> (i >> 3)) & 1)) return 0;
                acc = 0;
            }
        }
    }
    return 1;
}

/* Undo one clock that consumed the encrypted bit whose plain value was ``in``: the inverse of clock_bit(s, in, 1). */
static inline void rollback_bit(State *s, uint32_t in) {
    uint32_t odd = s->even, even = s->odd;
    uint32_t out = even & 1;
    even >>= 1;
    out ^= parity((LF_POLY_EVEN & even) ^ (LF_POLY_ODD & odd)) ^ in ^ filter(odd);
    s->odd = odd;
    s->even = even | (out & 1) << 23;
}

/* Whether the state after the first byte (B, the same for every nonce of fed8) explains bytes 1..3 of each nonce
 * of B: clocks 8..31 only. A wrong state fails after ~16 clocks on average, as in explains(). */
static inline int explains8(uint32_t odd, uint32_t even, const Work *w) {
    for (size_t n = 0; n < w->n8; n++) {
        State s = {odd, even};
        uint32_t fed = w->fed8[n], target = w->targets8[n], acc = 0;
        for (int i = 8; i < 32; i++) {
            acc ^= clock_bit(&s, bebit(fed, i), 1);
            if ((i & 7) == 7) {
                if ((acc ^ filter(s.odd)) != ((target >> (i >> 3)) & 1)) return 0;
                acc = 0;
            }
        }
    }
    return 1;
}

static void *run8(void *arg) {
    Work *w = arg;
    for (size_t i = w->begin; i < w->end; i++)
        for (size_t j = 0; j < w->n_even; j++) {
            if (!explains8(w->odd[i], w->even[j], w)) continue;
            State s = {w->odd[i], w->even[j]};
            for (int k = 7; k >= 0; k--) rollback_bit(&s, bebit(w->fed8[0], k));
            if (explains(s.odd, s.even, w) && w->n_found < MAX_FOUND)
                w->found[w->n_found++] = ((uint64_t)s.odd << 24) | s.even;
        }
    return NULL;
}


/* Bitsliced brute_force8: one vector holds one bit of LANES states (the same odd half, LANES even halves of the
 * list), so one pass of the clock below is a clock of LANES states. The state is kept as the stream of LFSR
 * bits z: before clock t, bit k of the odd half is z[t + 47 - 2k] and bit k of the even half z[t + 46 - 2k]
 * (from the clock: the odd half after a clock is the even half shifted with the feedback below, the even half
 * the old odd half), and clock t appends the feedback as z[t + 48]: nothing moves. The filter is its truth
 * tables as multiplexer trees over the planes (constant leaves fold away). A block stops at the first check that
 * leaves no lane alive; the lanes alive after every nonce of B are checked one by one as run8 does. */
#if defined(__GNUC__)
#define BITSLICED 1
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors passed between always-inline functions only */
typedef uint64_t V __attribute__((vector_size(32)));
#define LANES 256
#define ALWAYS static inline __attribute__((always_inline))

ALWAYS V v_all(uint32_t bit) { return (V){0, 0, 0, 0} - (uint64_t)(bit & 1); }
ALWAYS V mux(V s, V a, V b) { return a ^ ((a ^ b) & s); } /* s ? b : a, per bit */
ALWAYS V lut1(uint32_t t, V x) {
    t &= 3;
    return t == 0 ? v_all(0) : t == 1 ? ~x : t == 2 ? x : v_all(1);
}
ALWAYS V lut2(uint32_t t, V x0, V x1) { return mux(x1, lut1(t, x0), lut1(t >> 2, x0)); }
ALWAYS V lut3(uint32_t t, V x0, V x1, V x2) { return mux(x2, lut2(t & 0xF, x0, x1), lut2(t >> 4, x0, x1)); }
ALWAYS V lut4(uint32_t t, V x0, V x1, V x2, V x3) {
    return mux(x3, lut3(t & 0xFF, x0, x1, x2), lut3(t >> 8, x0, x1, x2));
}
ALWAYS V lut5(uint32_t t, V x0, V x1, V x2, V x3, V x4) {
    return mux(x4, lut4(t & 0xFFFF, x0, x1, x2, x3), lut4(t >> 16, x0, x1, x2, x3));
}

/* The filter of the state before the clock at z (odd half bit k at z[47 - 2k]). */
ALWAYS V bs_filter(const V *z) {
#define ODD(k) z[47 - 2 * (k)]
    V a = lut4(FB, ODD(0), ODD(1), ODD(2), ODD(3));
    V b = lut4(FA, ODD(4), ODD(5), ODD(6), ODD(7));
    V c = lut4(FB, ODD(8), ODD(9), ODD(10), ODD(11));
    V d = lut4(FB, ODD(12), ODD(13), ODD(14), ODD(15));
    V e = lut4(FA, ODD(16), ODD(17), ODD(18), ODD(19));
#undef ODD
    return lut5(FC, e, d, c, b, a);
}

/* The linear feedback of the state at z: the taps of LF_POLY_ODD and LF_POLY_EVEN (x0, 5, 9, 10, 12, ...). */
ALWAYS V bs_feedback(const V *z) {
    return z[43] ^ z[41] ^ z[39] ^ z[35] ^ z[29] ^ z[27] ^ z[25] ^ z[19] ^ z[17] ^ z[15] ^ z[9] ^ z[5] ^ z[42] ^
           z[24] ^ z[14] ^ z[12] ^ z[10] ^ z[0];
}

ALWAYS int none(V x) { return (x[0] | x[1] | x[2] | x[3]) == 0; }

/* The lanes of (odd, the block's even planes) that explain bytes 1..3 of every nonce of B, from after B. */
ALWAYS V bs_explains8(uint32_t odd, const V *even, V alive, const Work *w) {
    V z[48 + 24];
    for (size_t n = 0; n < w->n8; n++) {
        for (int k = 0; k < 24; k++) {
            z[47 - 2 * k] = v_all(odd >> k);
            z[46 - 2 * k] = even[k];
        }
        uint32_t fed = w->fed8[n], target = w->targets8[n];
        V acc = v_all(0);
        for (int t = 0; t < 24; t++) {
            V ks = bs_filter(z + t);
            z[48 + t] = bs_feedback(z + t) ^ ks ^ v_all(bebit(fed, 8 + t));
            acc ^= ks;
            if ((t & 7) == 7) {
                alive &= ~(acc ^ bs_filter(z + t + 1) ^ v_all(target >> ((t >> 3) + 1)));
                if (none(alive)) return alive;
                acc = v_all(0);
            }
        }
    }
    return alive;
}

#if defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void *run8_bitsliced(void *arg) {
    Work *w = arg;
    const V *planes = w->planes;
    size_t blocks = (w->n_even + LANES - 1) / LANES;
    for (size_t i = w->begin; i < w->end; i++)
        for (size_t b = 0; b < blocks; b++) {
            size_t lanes = w->n_even - b * LANES < LANES ? w->n_even - b * LANES : LANES;
            V valid;
            for (int q = 0; q < 4; q++)
                valid[q] = lanes >= 64 * (size_t)(q + 1) ? ~0ull
                           : lanes > 64 * (size_t)q  ? (1ull << (lanes - 64 * (size_t)q)) - 1
                                                      : 0;
            V alive = bs_explains8(w->odd[i], planes + 24 * b, valid, w);
            if (none(alive)) continue;
            for (size_t l = 0; l < lanes; l++) {
                if (!((alive[l / 64] >> (l % 64)) & 1)) continue;
                State s = {w->odd[i], w->even[b * LANES + l]};
                for (int k = 7; k >= 0; k--) rollback_bit(&s, bebit(w->fed8[0], k));
                if (explains(s.odd, s.even, w) && w->n_found < MAX_FOUND)
                    w->found[w->n_found++] = ((uint64_t)s.odd << 24) | s.even;
            }
        }
    return NULL;
}

/* The even list as bit planes: 24 vectors per block of LANES halves (the last block's spare lanes zero). */
static V *even_planes(const uint32_t *even, size_t n) {
    size_t blocks = (n + LANES - 1) / LANES;
    V *planes = aligned_alloc(32, (blocks ? blocks : 1) * 24 * sizeof(V));
    if (planes == NULL) return NULL;
    memset(planes, 0, (blocks ? blocks : 1) * 24 * sizeof(V));
    for (size_t j = 0; j < n; j++)
        for (int k = 0; k < 24; k++)
            planes[24 * (j / LANES) + k][(j % LANES) / 64] |= (uint64_t)((even[j] >> k) & 1) << (j % 64);
    return planes;
}
#else
#define BITSLICED 0
#endif

static void *run(void *arg) {
    Work *w = arg;
    for (size_t i = w->begin; i < w->end; i++)
        for (size_t j = 0; j < w->n_even; j++)
            if (explains(w->odd[i], w->even[j], w) && w->n_found < MAX_FOUND)
                w->found[w->n_found++] = ((uint64_t)w->odd[i] << 24) | w->even[j];
    return NULL;
}

/* The search of brute_force and brute_force8 (with fed8, targets8): odd x even, split over threads. */
static PyObject *search(Py_buffer odd, Py_buffer even, Py_buffer fed, Py_buffer targets, Py_buffer *fed8,
                        Py_buffer *targets8, int threads, int bitsliced) {
    PyObject *result = NULL;
    Work *works = NULL;
    void *planes = NULL;
    void *(*runner)(void *) = fed8 ? run8 : run;
#if BITSLICED
    if (fed8 && bitsliced && even.len >= 4 * 64) { /* fewer even halves than that leave most lanes empty */
        planes = even_planes(even.buf, (size_t)even.len / 4);
        if (planes == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        runner = run8_bitsliced;
    }
#else
    (void)bitsliced;
#endif
    if (odd.len % 4 || even.len % 4 || fed.len % 4 || (size_t)targets.len != (size_t)fed.len / 4) {
        PyErr_SetString(PyExc_ValueError, "odd, even and fed are uint32 arrays; one target byte per fed word");
        goto done;
    }
    if (fed8 && (fed8->len % 4 || fed8->len == 0 || (size_t)targets8->len != (size_t)fed8->len / 4)) {
        PyErr_SetString(PyExc_ValueError, "fed8 is a non-empty uint32 array; one target byte per fed8 word");
        goto done;
    }
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_SetString(PyExc_ValueError, "threads must be 1..64");
        goto done;
    }
    works = calloc((size_t)threads, sizeof(Work));
    if (works == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t n_odd = (size_t)odd.len / 4;
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) {
        Work *w = &works[t];
        w->odd = odd.buf;
        w->even = even.buf;
        w->n_odd = n_odd;
        w->n_even = (size_t)even.len / 4;
        w->fed = fed.buf;
        w->targets = targets.buf;
        w->n_nonces = (size_t)fed.len / 4;
        w->fed8 = fed8 ? fed8->buf : NULL;
        w->targets8 = fed8 ? targets8->buf : NULL;
        w->n8 = fed8 ? (size_t)fed8->len / 4 : 0;
        w->planes = planes;
        w->begin = n_odd * (size_t)t / (size_t)threads;
        w->end = n_odd * (size_t)(t + 1) / (size_t)threads;
        started[t] = t > 0 && pthread_create(&ids[t], NULL, runner, w) == 0;
    }
    runner(&works[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            runner(&works[t]); /* no thread to be had: do its share here */
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(0);
    for (int t = 0; result != NULL && t < threads; t++)
        for (size_t i = 0; i < works[t].n_found; i++) {
            PyObject *v = PyLong_FromUnsignedLongLong(works[t].found[i]);
            if (v == NULL || PyList_Append(result, v) < 0) {
                Py_XDECREF(v);
                Py_CLEAR(result);
                break;
            }
            Py_DECREF(v);
        }
done:
    free(works);
    free(planes);
    return result;
}

/* brute_force(odd, even, fed, targets, threads) -> list[int]: every pair of the odd list x the even list
 * (native uint32 arrays) that explains all nonces, as odd << 24 | even. The odd list is split over threads;
 * the GIL is released. */
static PyObject *brute_force(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer odd, even, fed, targets;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*y*y*i", &odd, &even, &fed, &targets, &threads)) return NULL;
    PyObject *result = search(odd, even, fed, targets, NULL, NULL, threads, 0);
    PyBuffer_Release(&odd);
    PyBuffer_Release(&even);
    PyBuffer_Release(&fed);
    PyBuffer_Release(&targets);
    return result;
}

/* brute_force8(odd8, even8, fed8, targets8, fed, targets, threads, bitsliced=True) -> list[int]: the same search over states
 * *after the first byte B* (odd8 x even8): each pair is checked first against bytes 1..3 of the nonces of B
 * (fed8, targets8: uid ^ {nT} and a bits, every {nT} starting with B), then rolled back over B to the initial
 * state, which must explain every nonce of fed; the initial states found are returned as odd << 24 | even.
 * Bitsliced (256 states a vector) unless ``bitsliced`` is false or the even list is short. */
static PyObject *brute_force8(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer odd, even, fed8, targets8, fed, targets;
    int threads, bitsliced = 1;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*i|p", &odd, &even, &fed8, &targets8, &fed, &targets, &threads,
                          &bitsliced))
        return NULL;
    PyObject *result = search(odd, even, fed, targets, &fed8, &targets8, threads, bitsliced);
    PyBuffer_Release(&odd);
    PyBuffer_Release(&even);
    PyBuffer_Release(&fed8);
    PyBuffer_Release(&targets8);
    PyBuffer_Release(&fed);
    PyBuffer_Release(&targets);
    return result;
}

static PyMethodDef methods[] = {
    {"half_sums", half_sums, METH_NOARGS, "Sum-property counts (p of the odd, q of the even half) per 20-bit pattern."},
    {"brute_force", brute_force, METH_VARARGS, "States of odd x even that explain every encrypted nonce."},
    {"brute_force8", brute_force8, METH_VARARGS,
     "Initial states whose state after the first byte B is in odd8 x even8 and that explain every nonce."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "audit._hardnested", "The hardnested attack's hot loops in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hardnested(void) {
    fill_filter_table();
    return PyModule_Create(&module);
}
