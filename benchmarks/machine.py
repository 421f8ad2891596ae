"""One line describing the machine a benchmark ran on: CPU model, the ISA features bf16 speed depends on, threads,
and the GPU if there is one. Every benchmark prints it above its table."""

import platform
from pathlib import Path

import torch


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return model, flags


def machine_description() -> str:
    from transformers_cheers.cpu_bf16 import cpu_has_native_bf16_kernels

    model, flags = cpu_model_and_flags()
    isa = ", ".join(flag for flag in ISA_FLAGS if flag in flags) or "unknown ISA"
    native = "native bf16" if cpu_has_native_bf16_kernels() else "no native bf16"
    line = f"CPU: {model} ({isa}; {native}), {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name()}"
    return f"{line}; torch {torch.__version__}"
