/* Crypto-1 state recovery and the mfkey key searches in C: the hot loops of audit.crypto1_recovery and
 * audit.mfkey (one recovery is ~10^7 filter evaluations, which NumPy does in ~0.7 s and this in ~0.05 s).
 *
 * The state and its operations are those of cardsim/crypto1.py (two 24-bit halves, the odd- and even-indexed
 * LFSR bits; the filter reads the 20 low bits of the odd half); the recovery is the one documented in
 * audit/crypto1_recovery.py: both halves are grown bit by bit from every 20-bit filter input that gives the
 * first keystream bit, each half from its own keystream bits, recording the two bits every step contributes
 * to the feedback of the other half; the halves are then joined where those records agree.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "crypto1_core.h"

#define SORT_BITS 11 /* the 22-bit feedback records are sorted in two passes of 11 bits */

/* The filter of x (bit 0) and of x|1 (bit 1), for an even x. */
static inline uint32_t filter_pair(uint32_t x) { return (filter_table[(x & 0xFFFFF) >> 3] >> (x & 6)) & 3; }

/* Clock 32 times, feeding a word in cipher order (its keystream is not wanted). */
static void feed_word(State *s, uint32_t in, int encrypted) {
    for (int i = 0; i < 32; i++) clock_bit(s, bebit(in, i), encrypted);
}

/* Whether the next 32 clocks give the keystream ks; stops at the first bit that differs (a wrong state is
 * refused after two bits on average, not 32). */
static int gives_keystream(State *s, uint32_t ks) {
    for (int i = 0; i < 32; i++)
        if (clock_bit(s, 0, 0) != bebit(ks, i)) return 0;
    return 1;
}

/* Undo one clock; returns the keystream bit of that clock. */
static inline uint32_t rollback_bit(State *s, uint32_t in, int encrypted) {
    uint32_t odd = s->odd & MASK24;
    s->odd = s->even;
    s->even = odd >> 1;
    uint32_t ks = filter(s->odd);
    uint32_t out = (odd & 1) ^ in ^ parity((LF_POLY_EVEN & s->even) ^ (LF_POLY_ODD & s->odd));
    if (encrypted) out ^= ks;
    s->even |= out << 23;
    return ks;
}

static void rollback_word(State *s, uint32_t in, int encrypted) {
    for (int i = 31; i >= 0; i--) rollback_bit(s, bebit(in, i), encrypted);
}

/* The 48-bit LFSR content in key order. */
static uint64_t lfsr48(const State *s) {
    uint64_t out = 0;
    for (int i = 23; i >= 0; i--) {
        out = out << 1 | ((s->odd >> (i ^ 3)) & 1);
        out = out << 1 | ((s->even >> (i ^ 3)) & 1);
    }
    return out;
}

/* --- recovery ------------------------------------------------------------------------------------------ */

typedef struct {
    uint32_t value, record; /* a half state and its feedback contributions so far (2 bits a step) */
} Half;

/* A list of half states, and a spare buffer that each step writes into and then swaps with (the buffers are
 * reused: fresh multi-megabyte ones would cost a page fault per 4 KiB at every step). */
typedef struct {
    Half *items, *spare;
    size_t len, cap, spare_cap;
} List;

/* Make the spare buffer hold at least need items. Returns 0, or -1 when out of memory. */
static int reserve_spare(List *list, size_t need) {
    if (list->spare_cap >= need) return 0;
    Half *grown = realloc(list->spare, sizeof(Half) * need);
    if (grown == NULL) return -1;
    list->spare = grown;
    list->spare_cap = need;
    return 0;
}

static void swap_spare(List *list, size_t len) {
    Half *items = list->items;
    size_t cap = list->cap;
    list->items = list->spare;
    list->cap = list->spare_cap;
    list->spare = items;
    list->spare_cap = cap;
    list->len = len;
}

/* Every 20-bit filter input whose output is bit. Returns 0, or -1 when out of memory. */
static int first_bits(List *list, uint32_t bit) {
    if (reserve_spare(list, (size_t)1 << 20)) return -1;
    size_t n = 0;
    for (uint32_t x = 0; x < (1u << 20); x++)
        if (filter(x) == bit) list->spare[n++] = (Half){x, 0};
    swap_spare(list, n);
    return 0;
}

/* Append one state bit to every value, keeping the values whose filter output can be the keystream bit (one
 * or both choices of the new bit); with tracked, the two feedback bits the longer value contributes (the
 * parities under mask1 and mask2, XOR what was fed) are appended to its record and the value is cut to 24
 * bits. Returns 0, or -1 when out of memory. */
static inline Half child(uint32_t v, uint32_t record, int tracked, uint32_t mask1, uint32_t mask2, uint32_t fed) {
    if (!tracked) return (Half){v, 0};
    return (Half){v & MASK24, record << 2 | (((parity(v & mask1) << 1) | parity(v & mask2)) ^ fed)};
}

static int extend(List *list, uint32_t bit, int tracked, uint32_t mask1, uint32_t mask2, uint32_t fed) {
    if (reserve_spare(list, 2 * list->len + 1)) return -1; /* at most two children each */
    Half *out = list->spare;
    size_t n = 0;
    for (size_t i = 0; i < list->len; i++) {
        uint32_t shifted = list->items[i].value << 1, record = list->items[i].record;
        uint32_t f = filter_pair(shifted), f0 = f & 1;
        if (f0 != f >> 1)
            out[n++] = child(shifted | (f0 ^ bit), record, tracked, mask1, mask2, fed);
        else if (f0 == bit) {
            out[n++] = child(shifted, record, tracked, mask1, mask2, fed);
            out[n++] = child(shifted | 1, record, tracked, mask1, mask2, fed);
        }
    }
    swap_spare(list, n);
    return 0;
}

/* Sort by record (22 bits): two stable counting passes. Returns 0, or -1 when out of memory. */
static int sort_by_record(List *list) {
    size_t *counts = malloc(sizeof(size_t) << SORT_BITS);
    if (counts == NULL || reserve_spare(list, list->len + 1)) {
        free(counts);
        return -1;
    }
    Half *from = list->items, *to = list->spare;
    for (int shift = 0; shift < 2 * SORT_BITS; shift += SORT_BITS) {
        memset(counts, 0, sizeof(size_t) << SORT_BITS);
        for (size_t i = 0; i < list->len; i++) counts[(from[i].record >> shift) & ((1u << SORT_BITS) - 1)]++;
        size_t at = 0;
        for (size_t b = 0; b < (1u << SORT_BITS); b++) {
            size_t c = counts[b];
            counts[b] = at;
            at += c;
        }
        for (size_t i = 0; i < list->len; i++) to[counts[(from[i].record >> shift) & ((1u << SORT_BITS) - 1)]++] = from[i];
        Half *swap = from;
        from = to;
        to = swap;
    }
    /* an even number of passes: the sorted items are back in list->items */
    free(counts);
    return 0;
}

/* Every cipher state that produces the 32 keystream bits ks2 while being fed in, positioned after those
 * clocks: *states (malloc'ed, freed by the caller) and *count. Returns 0, or -1 when out of memory. */
static int recover(uint32_t ks2, uint32_t in, State **states, size_t *count) {
    uint32_t oks = 0, eks = 0;
    for (int i = 31; i >= 0; i -= 2) oks = oks << 1 | bebit(ks2, i);
    for (int i = 30; i >= 0; i -= 2) eks = eks << 1 | bebit(ks2, i);
    List odd = {NULL, NULL, 0, 0, 0}, even = {NULL, NULL, 0, 0, 0};
    int failed = first_bits(&odd, oks & 1) || first_bits(&even, eks & 1);
    for (int step = 0; step < 4 && !failed; step++) {
        oks >>= 1;
        eks >>= 1;
        failed = extend(&odd, oks & 1, 0, 0, 0, 0) || extend(&even, eks & 1, 0, 0, 0, 0);
    }
    in = (((in >> 16) & 0xFF) | (in << 16) | (in & 0xFF00)) << 1;
    for (int step = 0; step < 11 && !failed; step++) {
        oks >>= 1;
        eks >>= 1;
        in >>= 2;
        failed = extend(&odd, oks & 1, 1, LF_POLY_EVEN << 1 | 1, LF_POLY_ODD << 1, 0) ||
                 extend(&even, eks & 1, 1, LF_POLY_ODD, LF_POLY_EVEN << 1 | 1, in & 3);
    }
    failed = failed || sort_by_record(&odd) || sort_by_record(&even);
    /* join the halves whose records agree: count the pairs, then make them */
    size_t n = 0;
    for (int pass = 0; pass < 2 && !failed; pass++) {
        size_t i = 0, j = 0, made = 0;
        while (i < odd.len && j < even.len) {
            uint32_t r = odd.items[i].record;
            if (r < even.items[j].record) {
                i++;
                continue;
            }
            if (r > even.items[j].record) {
                j++;
                continue;
            }
            size_t i_end = i, j_end = j;
            while (i_end < odd.len && odd.items[i_end].record == r) i_end++;
            while (j_end < even.len && even.items[j_end].record == r) j_end++;
            if (pass == 0)
                made += (i_end - i) * (j_end - j);
            else
                for (size_t a = i; a < i_end; a++)
                    for (size_t b = j; b < j_end; b++) {
                        uint32_t o = odd.items[a].value, e = even.items[b].value;
                        e = (e << 1) ^ parity(e & LF_POLY_EVEN) ^ ((in & 4) ? 1 : 0);
                        (*states)[made++] = (State){e ^ parity(o & LF_POLY_ODD), o};
                    }
            i = i_end;
            j = j_end;
        }
        if (pass == 0) {
            n = made;
            *states = malloc(sizeof(State) * (n + 1));
            failed = *states == NULL;
        }
    }
    free(odd.items);
    free(odd.spare);
    free(even.items);
    free(even.spare);
    *count = n;
    return failed ? -1 : 0;
}

/* --- darkside: the common-prefix search ------------------------------------------------------------------ */

/* Darkside (Courtois 2009) leaks, for one tag nonce and one {nR} whose first 29 bits stay the same on air, the
 * keystream of the 4-bit NAK (clocks 64-67) and the 8 parity bits the card accepted, for each of the 8 values c
 * of {nR}'s last 3 bits. The variants share the state P after 29 clocks of {nR}; they differ only in the 3
 * plaintext bits fed next, and from there on the cipher is fed nothing, so the state at clock 67 of variant c
 * is that of variant 0 XOR ahead[d], d being the difference of those plaintext bits (linear in d). Which d goes
 * with which c depends on whether the keystream bits of clocks 30 and 31 (which read the freshly fed bits)
 * change with them: 16 cases (a relation d(c), see darkside_search), each tried. Within one, every variant's
 * NAK bits constrain 21 bits of one half of the state at clock 67: the odd half gives clocks 65 and 67, the
 * even half clocks 64 and 66 (2^21 / 4^8 = 32 survivors a half); the survivors are joined (with the 3 top
 * bits of each half, which no NAK bit reads) and checked against every parity bit before rolling back to the
 * key. */
typedef struct {
    uint32_t fed, nr, ar;   /* uid^nT; {nR} with its last 3 bits 0; {aR} */
    uint8_t nak[8], par[8]; /* by variant: NAK keystream (bit i: clock 64+i); parity bits sent (bit j: byte j) */
} Leaks;

static State ahead[8];

static void fill_ahead(void) {
    for (uint32_t d = 0; d < 8; d++) {
        State s = {0, 0};
        for (int i = 0; i < 3; i++) clock_bit(&s, (d >> i) & 1, 0);
        for (int i = 0; i < 35; i++) clock_bit(&s, 0, 0);
        ahead[d] = s;
    }
}

static inline uint32_t odd_parity8(uint32_t byte) { return 1 ^ parity(byte & 0xFF); }

#define RELATIONS 16

/* A growable list of half states. */
typedef struct {
    uint32_t *items;
    size_t len, cap;
} Words;

static int push_word(Words *w, uint32_t x) {
    if (w->len == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 64;
        uint32_t *grown = realloc(w->items, sizeof(uint32_t) * cap);
        if (grown == NULL) return -1;
        w->items = grown;
        w->cap = cap;
    }
    w->items[w->len++] = x;
    return 0;
}

/* For every relation d, the low 21 bits of one half of variant 0's state at clock 67 that give every variant's
 * two NAK bits read from that half, in one pass over the 2^21 values: variant 0 (d = 0 in every relation) sorts
 * out 3 in 4 with two filter lookups, the rest get the two bits of all 8 differences once and are matched against
 * each relation. Returns 0, or -1 when out of memory. */
static int half_candidates(const Leaks *l, const uint8_t d[RELATIONS][8], int odd, Words out[RELATIONS]) {
    int low = odd ? 1 : 0;
    uint32_t want[8], offset[8];
    for (int c = 0; c < 8; c++) {
        want[c] = ((l->nak[c] >> low) & 1u) << 1 | ((l->nak[c] >> (low + 2)) & 1u);
        offset[c] = odd ? ahead[c].odd : ahead[c].even;
    }
    for (uint32_t x = 0; x < (1u << 21); x++) {
        if ((filter(x >> 1) << 1 | filter(x)) != want[0]) continue;
        uint32_t got[8];
        for (int diff = 1; diff < 8; diff++) {
            uint32_t y = x ^ offset[diff];
            got[diff] = filter(y >> 1) << 1 | filter(y);
        }
        for (int r = 0; r < RELATIONS; r++) {
            int c = 1;
            while (c < 8 && got[d[r][c]] == want[c]) c++;
            if (c == 8 && push_word(&out[r], x)) return -1;
        }
    }
    return 0;
}

/* Whether a candidate state at clock 67 of variant 0 explains every leak (each variant run forward from the
 * common state P: its NAK bits and its 8 parity bits); then *key is the key it rolls back to. */
static int explains_leaks(const Leaks *l, State x0, uint64_t *key) {
    State p = x0;
    for (int i = 0; i < 35; i++) rollback_bit(&p, 0, 0);
    for (int i = 31; i >= 29; i--) rollback_bit(&p, bebit(l->nr, i), 1);
    uint32_t tail[8]; /* by variant: keystream of clocks 29-31 (bits 0-2) and 32 (bit 3) */
    for (int c = 0; c < 8; c++) {
        uint32_t nr = l->nr | (uint32_t)c << 5, ks = 0, ar_ks = 0, nak = 0;
        State s = p;
        for (int i = 29; i < 32; i++) ks |= clock_bit(&s, bebit(nr, i), 1) << (i - 29);
        for (int i = 0; i < 32; i++) ar_ks |= clock_bit(&s, 0, 0) << (i ^ 24);
        for (int i = 0; i < 4; i++) nak |= clock_bit(&s, 0, 0) << i;
        if (nak != l->nak[c]) return 0;
        uint32_t ar = l->ar ^ ar_ks;
        for (int j = 0; j < 4; j++) {
            uint32_t next = j < 3 ? bebit(ar_ks, 8 * j + 8) : (nak & 1);
            if ((odd_parity8(ar >> (24 - 8 * j)) ^ next) != ((l->par[c] >> (4 + j)) & 1u)) return 0;
        }
        tail[c] = ks | bebit(ar_ks, 0) << 3;
    }
    uint32_t head = 0; /* keystream of {nR}'s first 29 clocks, rolling back to the state after uid^nT */
    for (int i = 28; i >= 0; i--) head |= rollback_bit(&p, bebit(l->nr, i), 1) << (i ^ 24);
    for (int c = 0; c < 8; c++) {
        uint32_t ks = head;
        for (int i = 0; i < 3; i++) ks |= ((tail[c] >> i) & 1u) << ((29 + i) ^ 24);
        uint32_t nr = (l->nr | (uint32_t)c << 5) ^ ks;
        for (int j = 0; j < 4; j++) {
            uint32_t next = j < 3 ? bebit(ks, 8 * j + 8) : (tail[c] >> 3) & 1u;
            if ((odd_parity8(nr >> (24 - 8 * j)) ^ next) != ((l->par[c] >> j) & 1u)) return 0;
        }
    }
    rollback_word(&p, l->fed, 0);
    *key = lfsr48(&p);
    return 1;
}

/* A quick test before explains_leaks, for the rest of the candidates' 64 top bits: the parity bit of {aR}'s last
 * byte in each variant, from its state at clock 67 rolled back 11 clocks (a wrong candidate fails it within two
 * variants on average, where explains_leaks costs some 80 clocks). */
static int last_parities_check(const Leaks *l, const uint8_t *d, State x0) {
    for (int c = 0; c < 8; c++) {
        State s = {x0.odd ^ ahead[d[c]].odd, x0.even ^ ahead[d[c]].even};
        for (int i = 0; i < 3; i++) rollback_bit(&s, 0, 0);
        uint32_t ks = 0;
        for (int i = 7; i >= 0; i--) ks |= rollback_bit(&s, 0, 0) << i;
        if ((odd_parity8(l->ar ^ ks) ^ (l->nak[c] & 1u)) != ((l->par[c] >> 7) & 1u)) return 0;
    }
    return 1;
}

/* Every key that explains the leaks: *keys (malloc'ed, freed by the caller; may repeat) and *found. Returns 0,
 * or -1 when out of memory. */
static int darkside_search(const Leaks *l, uint64_t **keys, size_t *found) {
    /* d(c): bit 0 is c's bit 0 (clock 29); bit 1 flips with bit 0 when clock 30's keystream reads it (a);
     * bit 2 flips by a function g of bits 0-1 (clock 31's keystream reads both; g(0) = 0, g(1..3) from g3) */
    uint8_t d[RELATIONS][8];
    for (int r = 0; r < RELATIONS; r++)
        for (int c = 0; c < 8; c++) {
            uint32_t a = (uint32_t)r >> 3, g3 = (uint32_t)r & 7;
            uint32_t d0 = c & 1, d1 = ((c >> 1) & 1) ^ (a & d0), low = d0 | d1 << 1;
            uint32_t d2 = ((c >> 2) & 1) ^ (low ? (g3 >> (low - 1)) & 1 : 0);
            d[r][c] = (uint8_t)(low | d2 << 2);
        }
    Words odd[RELATIONS] = {{0}}, even[RELATIONS] = {{0}};
    size_t cap = 16, n = 0;
    uint64_t *out = malloc(sizeof(uint64_t) * cap);
    int failed = out == NULL || half_candidates(l, d, 1, odd) || half_candidates(l, d, 0, even);
    for (int r = 0; r < RELATIONS && !failed; r++)
        for (size_t i = 0; i < odd[r].len && !failed; i++)
            for (size_t j = 0; j < even[r].len && !failed; j++)
                for (uint32_t top = 0; top < 64 && !failed; top++) {
                    State x0 = {odd[r].items[i] | (top & 7) << 21, even[r].items[j] | (top >> 3) << 21};
                    uint64_t key;
                    if (!last_parities_check(l, d[r], x0) || !explains_leaks(l, x0, &key)) continue;
                    if (n == cap) {
                        uint64_t *grown = realloc(out, sizeof(uint64_t) * cap * 2);
                        failed = grown == NULL;
                        if (failed) break;
                        out = grown;
                        cap *= 2;
                    }
                    out[n++] = key;
                }
    for (int r = 0; r < RELATIONS; r++) {
        free(odd[r].items);
        free(even[r].items);
    }
    *keys = out;
    *found = n;
    return failed ? -1 : 0;
}

/* --- Python interface ----------------------------------------------------------------------------------- */

/* An int of 0..2^32-1 (O& converter): a larger or negative one is a ValueError, not silently cut. */
static int word_arg(PyObject *obj, void *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "a 32-bit word must be 0..2**32-1");
        }
        return 0;
    }
    if (v > 0xFFFFFFFFull) {
        PyErr_SetString(PyExc_ValueError, "a 32-bit word must be 0..2**32-1");
        return 0;
    }
    *(uint32_t *)out = (uint32_t)v;
    return 1;
}

static PyObject *py_recover_states(PyObject *self, PyObject *args) {
    uint32_t ks2, in;
    if (!PyArg_ParseTuple(args, "O&O&:recover_states", word_arg, &ks2, word_arg, &in)) return NULL;
    State *states = NULL;
    size_t n = 0;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = recover(ks2, in, &states, &n);
    Py_END_ALLOW_THREADS
    if (failed) {
        free(states);
        return PyErr_NoMemory();
    }
    PyObject *odd = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * sizeof(uint32_t)));
    PyObject *even = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * sizeof(uint32_t)));
    if (odd != NULL && even != NULL) {
        uint32_t *o = (uint32_t *)PyBytes_AS_STRING(odd), *e = (uint32_t *)PyBytes_AS_STRING(even);
        for (size_t i = 0; i < n; i++) {
            o[i] = states[i].odd;
            e[i] = states[i].even;
        }
    }
    free(states);
    if (odd == NULL || even == NULL) {
        Py_XDECREF(odd);
        Py_XDECREF(even);
        return NULL;
    }
    return Py_BuildValue("(NN)", odd, even);
}

static int compare_keys(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The distinct keys of keys[0..n) as a Python list (sorted; n is small: the few candidates left), or a
 * MemoryError when the search that made them failed; frees keys either way. */
static PyObject *key_list(uint64_t *keys, size_t n, int failed) {
    if (failed) {
        free(keys);
        return PyErr_NoMemory();
    }
    qsort(keys, n, sizeof(uint64_t), compare_keys);
    PyObject *list = PyList_New(0);
    for (size_t i = 0; list != NULL && i < n; i++) {
        if (i > 0 && keys[i] == keys[i - 1]) continue;
        PyObject *key = PyLong_FromUnsignedLongLong(keys[i]);
        if (key == NULL || PyList_Append(list, key) < 0) Py_CLEAR(list);
        Py_XDECREF(key);
    }
    free(keys);
    return list;
}

/* The state positioned after {aR}, rolled back through {aR}'s clocks, {nR} (encrypted) and uid^nT: at the key. */
static State rolled_back(State s, uint32_t nr_enc, uint32_t fed) {
    rollback_word(&s, 0, 0);
    rollback_word(&s, nr_enc, 1);
    rollback_word(&s, fed, 0);
    return s;
}

/* Whether a candidate (its state after {aR}, and the same rolled back to the key) explains the other trace. */
typedef int (*Explains)(const State *after_ar, const State *at_key, const uint32_t *other);

/* mfkey32's second attempt: fed uid^nT1 and {nR1} from the key, the cipher gives the keystream of {aR1}. */
static int explains_second_attempt(const State *after_ar, const State *at_key, const uint32_t *other) {
    (void)after_ar;
    State t = *at_key;
    feed_word(&t, other[0], 0);
    feed_word(&t, other[1], 1);
    return gives_keystream(&t, other[2]);
}

/* mfkey64's tag answer: after {aR}, the cipher gives the keystream of {aT}. */
static int explains_tag_answer(const State *after_ar, const State *at_key, const uint32_t *other) {
    (void)at_key;
    State t = *after_ar;
    return gives_keystream(&t, other[0]);
}

/* The distinct keys of the states giving ks2 (the keystream of {aR}) that explain `other` too, as a sorted list. */
static PyObject *key_search(uint32_t ks2, uint32_t nr_enc, uint32_t fed, Explains explains, const uint32_t *other) {
    State *states = NULL;
    size_t n = 0, found = 0;
    uint64_t *keys = NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = recover(ks2, 0, &states, &n);
    if (!failed) {
        keys = malloc(sizeof(uint64_t) * (n + 1));
        failed = keys == NULL;
    }
    for (size_t i = 0; i < n && !failed; i++) {
        State at_key = rolled_back(states[i], nr_enc, fed);
        if (explains(&states[i], &at_key, other)) keys[found++] = lfsr48(&at_key);
    }
    Py_END_ALLOW_THREADS
    free(states);
    return key_list(keys, found, failed);
}

static PyObject *py_mfkey32_keys(PyObject *self, PyObject *args) {
    uint32_t ks2_0, nr0_enc, fed0, other[3];
    if (!PyArg_ParseTuple(args, "O&O&O&O&O&O&:mfkey32_keys", word_arg, &fed0, word_arg, &nr0_enc, word_arg, &ks2_0,
                          word_arg, &other[0], word_arg, &other[1], word_arg, &other[2]))
        return NULL;
    return key_search(ks2_0, nr0_enc, fed0, explains_second_attempt, other);
}

static PyObject *py_mfkey64_keys(PyObject *self, PyObject *args) {
    uint32_t fed, nr_enc, ks2, ks3;
    if (!PyArg_ParseTuple(args, "O&O&O&O&:mfkey64_keys", word_arg, &fed, word_arg, &nr_enc, word_arg, &ks2, word_arg,
                          &ks3))
        return NULL;
    return key_search(ks2, nr_enc, fed, explains_tag_answer, &ks3);
}

static PyObject *py_darkside_keys(PyObject *self, PyObject *args) {
    Leaks l;
    const char *nak, *par;
    Py_ssize_t nak_len, par_len;
    if (!PyArg_ParseTuple(args, "O&O&O&y#y#:darkside_keys", word_arg, &l.fed, word_arg, &l.nr, word_arg, &l.ar, &nak,
                          &nak_len, &par, &par_len))
        return NULL;
    if (nak_len != 8 || par_len != 8) {
        PyErr_SetString(PyExc_ValueError, "darkside needs the NAK keystream and the parity bits of 8 variants");
        return NULL;
    }
    for (int c = 0; c < 8; c++) {
        if ((uint8_t)nak[c] > 0xF) {
            PyErr_SetString(PyExc_ValueError, "a NAK keystream is 4 bits");
            return NULL;
        }
        l.nak[c] = (uint8_t)nak[c];
        l.par[c] = (uint8_t)par[c];
    }
    l.nr &= ~0xE0u; /* the variant sets the last 3 bits */
    uint64_t *keys = NULL;
    size_t found = 0;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = darkside_search(&l, &keys, &found);
    Py_END_ALLOW_THREADS
    return key_list(keys, found, failed);
}

static PyMethodDef methods[] = {
    {"recover_states", py_recover_states, METH_VARARGS,
     "recover_states(ks2, fed) -> (odd, even): every Crypto-1 state that gives the 32 keystream bits ks2 while fed "
     "the word fed, positioned after those clocks; the halves as native uint32 arrays in bytes."},
    {"mfkey32_keys", py_mfkey32_keys, METH_VARARGS,
     "mfkey32_keys(fed0, nr0_enc, ks2_0, fed1, nr1_enc, ks2_1) -> list of keys: those that, fed uid^nT and {nR} "
     "of each of two authentications, give the keystream ks2 of its {aR} (sorted, distinct)."},
    {"mfkey64_keys", py_mfkey64_keys, METH_VARARGS,
     "mfkey64_keys(fed, nr_enc, ks2, ks3) -> list of keys: those that, fed uid^nT and {nR}, give the keystreams "
     "ks2 of {aR} and ks3 of {aT} (sorted, distinct)."},
    {"darkside_keys", py_darkside_keys, METH_VARARGS,
     "darkside_keys(fed, nr_enc, ar_enc, naks, parities) -> list of keys: those that, fed uid^nT, explain the "
     "8 leaks of a darkside collection (sorted, distinct)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "audit._crypto1", "Crypto-1 state recovery and mfkey key searches in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__crypto1(void) {
    fill_filter_table();
    fill_ahead();
    return PyModule_Create(&module);
}
