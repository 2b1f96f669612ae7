"""Check identifiers, shared by the judge and the GDB witness.

`<scope>.<probe>[.<param>...]`, params in record order: numbers carry a short prefix
(cpl=3 -> cpl3, tsd=1 -> tsd1, from_cpl=3 -> from3, leaf=0 -> leaf0), words stand alone
(via=iretq -> iretq, insn=hlt -> hlt). E.g. host.rdtsc.tsd1.cpl3, host.cpl-return.from3.ud2.
"""

from __future__ import annotations

_PREFIX = {"from_cpl": "from"}


def param_word(key: str, value: str) -> str:
    if value.lstrip("-").isdigit() or value.startswith("0x"):
        return f"{_PREFIX.get(key, key)}{value}"
    return value


def check_id(scope: str, probe: str, params: dict[str, str]) -> str:
    return ".".join([scope, probe, *(param_word(k, str(v)) for k, v in params.items())])
