/* bootinfo.c - multiboot v1 info -> struct bootinfo, kernel cmdline parsing.
 * QEMU (like GRUB) passes "<image path> <args>"; the first word is the image. */
#include "lab.h"

#define MB_INFO_MAGIC 0x2BADB002
struct bootinfo bootinfo;
static char cmdline_raw[1024];     /* args only, as passed with -append */
static char cmdline_tok[1024];     /* same, spaces -> NUL, for cmdline_get */
static char image_name[256];
static char mod_strings[8][128];

const char *boot_image_name(void) { return image_name; }

void bootinfo_init(u32 magic, u32 mbi_addr)
{
    bootinfo.cmdline = cmdline_raw;
    bootinfo.nmods = 0;
    if (magic != MB_INFO_MAGIC || !mbi_addr)
        return;
    const u32 *mbi = (const u32 *)(u64)mbi_addr;
    u32 flags = mbi[0];
    if (flags & (1u << 2)) {
        const char *s = (const char *)(u64)mbi[4];
        size_t i = 0, j = 0;
        while (s[i] == ' ')
            i++;
        while (s[i] && s[i] != ' ' && j < sizeof(image_name) - 1)
            image_name[j++] = s[i++];
        image_name[j] = 0;
        while (s[i] == ' ')
            i++;
        j = 0;
        while (s[i] && j < sizeof(cmdline_raw) - 1)
            cmdline_raw[j++] = s[i++];
        cmdline_raw[j] = 0;
    }
    if (flags & (1u << 3)) {
        u32 n = mbi[5];
        const u32 *m = (const u32 *)(u64)mbi[6];
        for (u32 k = 0; k < n && k < 8; k++, m += 4) {
            bootinfo.mods[k].start = m[0];
            bootinfo.mods[k].end = m[1];
            const char *s = m[2] ? (const char *)(u64)m[2] : "";
            size_t j = 0;
            while (s[j] && j < sizeof(mod_strings[k]) - 1) {
                mod_strings[k][j] = s[j];
                j++;
            }
            mod_strings[k][j] = 0;
            bootinfo.mods[k].string = mod_strings[k];
            bootinfo.nmods = k + 1;
        }
    }
    /* Only the used part: every CPL0 instruction costs ~1 us under kvm_pvm. */
    for (size_t i = 0; cmdline_raw[i]; i++)
        cmdline_tok[i] = cmdline_raw[i] == ' ' ? 0 : cmdline_raw[i];
}

const char *cmdline_get(const char *key)
{
    size_t n = strlen(key), len = strlen(cmdline_raw);
    const char *found = NULL;
    for (size_t i = 0; i < len;) {
        const char *t = cmdline_tok + i;
        size_t tl = strlen(t);
        if (tl && !strncmp(t, key, n) && (t[n] == '=' || t[n] == 0))
            found = t[n] == '=' ? t + n + 1 : t + n;   /* last one wins */
        i += tl + 1;
    }
    return found;
}

int cmdline_has(const char *key)
{
    return cmdline_get(key) != NULL;
}

int cmdline_list_has(const char *key, const char *name)
{
    const char *v = cmdline_get(key);
    size_t n = strlen(name);
    while (v && *v) {
        const char *e = v;
        while (*e && *e != ',')
            e++;
        if ((size_t)(e - v) == n && !strncmp(v, name, n))
            return 1;
        v = *e ? e + 1 : e;
    }
    return 0;
}
