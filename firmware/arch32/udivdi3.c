/* udivdi3.c - the 64-bit division gcc calls on i386 (records.c prints u64 in
 * decimal). Debian's gcc ships no 32-bit libgcc without gcc-multilib; this
 * shift-and-subtract version is all the kernel needs. */
typedef unsigned long long u64;

static u64 divmod(u64 n, u64 d, u64 *rem)
{
    u64 q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) {
            r -= d;
            q |= 1ull << i;
        }
    }
    *rem = r;
    return q;
}

u64 __udivdi3(u64 n, u64 d);
u64 __umoddi3(u64 n, u64 d);
u64 __udivdi3(u64 n, u64 d) { u64 r; return divmod(n, d, &r); }
u64 __umoddi3(u64 n, u64 d) { u64 r; divmod(n, d, &r); return r; }
