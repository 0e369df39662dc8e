/* The Crypto-1 core shared by the C extensions audit/_crypto1.c and audit/_hardnested.c: the filter, its table
 * and one clock of the cipher, as cardsim/crypto1.py has them (two 24-bit halves, the odd- and even-indexed LFSR
 * bits; the filter reads the 20 low bits of the odd half; a clock shifts the even half left by one, puts the
 * feedback bit at bit 0 and swaps the halves).
 *
 * Each extension is its own shared object, so each has its own copy of the table below; its module init calls
 * fill_filter_table() once.
 */

#ifndef YIKATONG_CRYPTO1_CORE_H
#define YIKATONG_CRYPTO1_CORE_H

#include <stdint.h>

#define FA 0xD938u
#define FB 0xF22Cu
#define FC 0xEC57E80Au
#define LF_POLY_ODD 0x29CE5Cu
#define LF_POLY_EVEN 0x870804u
#define MASK24 0xFFFFFFu

/* The non-linear filter over the 20 low bits of the odd half, fc(fb, fa, fb, fb, fa) by nibble (low nibble
 * first), for every input: a bit each (128 KiB: it stays in the cache, one load per clock instead of five nibble
 * look-ups). */
static uint8_t filter_table[1 << 17];

static void fill_filter_table(void) {
    /* fc's input but for the low nibble's fb bit (16), from the 16 high bits; then each byte of the table,
     * eight low nibbles, is one of 2 x 16 */
    uint8_t bytes[16][2] = {{0}};
    for (uint32_t rest = 0; rest < 16; rest++)
        for (uint32_t low = 0; low < 16; low++)
            bytes[rest][low >> 3] |= (uint8_t)(((FC >> (rest | (((FB << 4) >> low) & 16))) & 1) << (low & 7));
    for (uint32_t high = 0; high < (1u << 16); high++) {
        uint32_t rest = (((FA << 3) >> (high & 0xF)) & 8) | (((FB << 2) >> ((high >> 4) & 0xF)) & 4) |
                        (((FB << 1) >> ((high >> 8) & 0xF)) & 2) | ((FA >> ((high >> 12) & 0xF)) & 1);
        filter_table[2 * high] = bytes[rest][0];
        filter_table[2 * high + 1] = bytes[rest][1];
    }
}

/* The filter of x, from the table. */
static inline uint32_t filter(uint32_t x) { return (filter_table[(x & 0xFFFFF) >> 3] >> (x & 7)) & 1; }

static inline uint32_t parity(uint32_t x) { return (uint32_t)__builtin_parity(x); }

/* Bit n of a word in the order the cipher consumes it: bytes first to last, LSB first. */
static inline uint32_t bebit(uint32_t x, int n) { return (x >> (n ^ 24)) & 1; }

typedef struct {
    uint32_t odd, even;
} State;

/* One clock fed the bit in (XORed with the keystream bit when encrypted); returns that keystream bit. */
static inline uint32_t clock_bit(State *s, uint32_t in, int encrypted) {
    uint32_t ks = filter(s->odd);
    uint32_t feed = (encrypted ? ks : 0) ^ in ^ parity((LF_POLY_ODD & s->odd) ^ (LF_POLY_EVEN & s->even));
    uint32_t odd = s->odd;
    s->odd = ((s->even << 1) | feed) & MASK24;
    s->even = odd;
    return ks;
}

#endif
