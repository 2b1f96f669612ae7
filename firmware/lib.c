/* lib.c - the few libc functions the kernel (and gcc) need. */
#include "lab.h"

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    if (p < q) {
        while (n--)
            *p++ = *q++;
    } else {
        while (n--)
            p[n] = q[n];
    }
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (size_t i = 0; i < n; i++)
        if (p[i] != q[i])
            return p[i] - q[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (u8)*a - (u8)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

/* ---- MSRs that may not exist: guarded by .extable (lab.h) ---- */
int rdmsr_safe(u32 msr, u64 *val)
{
    u32 lo = 0, hi = 0;
    try_reset();
    __asm__ volatile("1: rdmsr\n2:\n" LAB_EXTABLE(1b, 2b)
                     : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
    *val = (u64)hi << 32 | lo;
    return try_state.faulted ? -1 : 0;
}

int wrmsr_safe(u32 msr, u64 val)
{
    try_reset();
    __asm__ volatile("1: wrmsr\n2:\n" LAB_EXTABLE(1b, 2b)
                     :: "c"(msr), "a"((u32)val), "d"((u32)(val >> 32)) : "memory");
    return try_state.faulted ? -1 : 0;
}
