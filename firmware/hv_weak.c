/* hv_weak.c - default hypervisor hook; firmware/svm*.c overrides it. */
#include "lab.h"

__attribute__((weak)) void hv_main(const struct bootinfo *bi)
{
    (void)bi;
    rec_info_str("hv", "none");
}
