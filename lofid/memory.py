"""How much memory each model variant needs, and what to tell the user when loading one ran
out of it (MODEL_LOAD_FAILED): the need, what is available, and a smaller variant that fits."""

from __future__ import annotations

# The worker's peak resident memory for a 30 s track on the CPU, rounded up from bench/RESULTS.md.
NEEDED_MB = {"int4": 1100, "int8": 1300, "fp32": 3300, "fp16": 4500}
CPU_ONLY = ("int4",)


def available_mb(limit_mb: int | None = None) -> int | None:
    """Memory available now (Linux MemAvailable), capped by ``limit_mb`` (worker_memory_mb);
    None where it cannot be told."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) // 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if limit_mb is not None:
        avail = limit_mb if avail is None else min(avail, limit_mb)
    return avail


def _gb(mb: int) -> str:
    return f"{mb / 1000:.1f} GB"


def out_of_memory_at_load(variant: str, device: str = "cpu", limit_mb: int | None = None, why: str = "") -> str:
    """The MODEL_LOAD_FAILED message for ``variant`` running out of memory while it loads."""
    need = NEEDED_MB.get(variant)
    avail = available_mb(limit_mb)
    text = f"out of memory while loading the {variant} model{f' ({why})' if why else ''}"
    if need is None:
        return text
    text += f": it needs about {_gb(need)} of memory"
    if avail is not None:
        text += f", about {_gb(avail)} is available" + (" (worker_memory_mb)" if avail == limit_mb else "")
    candidates = [v for v in NEEDED_MB if device in ("cpu", "auto") or v not in CPU_ONLY]
    smaller = sorted((v for v in candidates if NEEDED_MB[v] < need), key=NEEDED_MB.__getitem__, reverse=True)
    fits = [v for v in smaller if avail is None or NEEDED_MB[v] <= avail]
    if fits:
        v = fits[0]
        return text + (f"; the {v} variant needs about {_gb(NEEDED_MB[v])} and would fit: "
                       f'set variant = "{v}" in config.toml, or --variant {v}')
    if smaller:
        v = smaller[-1]
        return text + (f"; even the smallest variant, {v}, needs about {_gb(NEEDED_MB[v])}: "
                       "free some memory (or raise worker_memory_mb)")
    return text + "; free some memory (or raise worker_memory_mb)"
