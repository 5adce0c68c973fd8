"""What to tell the user when loading a model variant ran out of memory (MODEL_LOAD_FAILED):
what it needs (``Variant.memory_mb``), what is available, and a smaller variant that fits."""

from __future__ import annotations

from lofid import variants


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
    v = variants.VARIANTS.get(variant)
    need = v.memory_mb if v is not None else None
    avail = available_mb(limit_mb)
    text = f"out of memory while loading the {variant} model{f' ({why})' if why else ''}"
    if need is None:
        return text
    text += f": it needs about {_gb(need)} of memory"
    if avail is not None:
        text += f", about {_gb(avail)} is available" + (" (worker_memory_mb)" if avail == limit_mb else "")
    candidates = [c for c in variants.VARIANTS.values()
                  if c.memory_mb is not None and (device in ("cpu", "auto") or not c.cpu_only)]
    smaller = sorted((c for c in candidates if c.memory_mb < need), key=lambda c: c.memory_mb, reverse=True)
    fits = [c for c in smaller if avail is None or c.memory_mb <= avail]
    if fits:
        c = fits[0]
        return text + (f"; the {c.name} variant needs about {_gb(c.memory_mb)} and would fit: "
                       f'set variant = "{c.name}" in config.toml, or --variant {c.name}')
    if smaller:
        c = smaller[-1]
        return text + (f"; even the smallest variant, {c.name}, needs about {_gb(c.memory_mb)}: "
                       "free some memory (or raise worker_memory_mb)")
    return text + "; free some memory (or raise worker_memory_mb)"
