"""ring-lab: x86 privilege experiments under QEMU, judged against the architecture."""

__version__ = "0.1.0"
