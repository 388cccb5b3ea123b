"""The process a run lives in: seeds and random-number states, the device and its precision, the
CPU memory allocator, the child processes it starts.

A bottom-layer helper: it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "seed_everything", "resolve_device", "capture_rng_state", "restore_rng_state",
    "ALLOCATORS", "tune_cpu_allocator", "release_free_memory", "AMP_MODES", "BF16_SWITCH", "cpu_has_native_bf16",
    "cpu_bf16_instructions", "cpu_model",
    "describe_hardware", "precision_name", "resolve_amp", "amp_dtype", "autocast", "to_device", "usable_cpus",
    "default_loader_workers", "run_tied_child", "stopped_by_signal",
]


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_loader_workers(limit: int = 8) -> int:
    """DataLoader worker processes: one per usable core, at most ``limit``."""
    return min(limit, usable_cpus())


def scoring_parallelism(device: torch.device | str, cores: int | None = None) -> tuple[int, int]:
    """(image-decoding worker processes, model threads) for scoring on ``device`` with ``cores`` CPU
    cores (default: the usable ones), so that decoding overlaps the model without oversubscribing: on a
    CPU about a quarter of the cores decode (a 1024x683 JPEG decodes in about a quarter of the time the
    model takes for it) and the rest run the model; on a GPU every core decodes."""
    cores = usable_cpus() if cores is None else max(1, cores)
    if getattr(device, "type", device) != "cpu":  # a torch.device, or "cpu" for an ONNX model
        return min(8, cores), 1
    workers = max(1, round(cores / 4)) if cores > 1 else 0
    return workers, max(1, cores - workers) if cores > 2 else cores


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy's global RNG and torch (CPU and all CUDA devices)."""
    import torch

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N' -> torch.device."""
    import torch

    choice = str(name).strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", choice)
    if not m:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asks for CUDA, but CUDA is not available here; use --device cpu")
    if m.group(1) is not None:
        index, count = int(m.group(1)), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device {name!r}: there are only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    return torch.device("cuda")


AMP_MODES = ("auto", "none", "bf16", "fp16")


# TANET_CPU_BF16=1 makes the project act as on a CPU with bfloat16 instructions (emulated where there
# are none: slow, but the same choices and roundings); =0 as on one without. Unset: the CPU decides.
BF16_SWITCH = "TANET_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), or as ``TANET_CPU_BF16`` says.
    Elsewhere PyTorch emulates bfloat16, and a TANet step in bf16 is about 10x slower than in float32."""
    forced = os.environ.get(BF16_SWITCH, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{BF16_SWITCH} must be 0 or 1 (or unset), got {forced!r}")
    return cpu_bf16_instructions()


def cpu_bf16_instructions() -> bool:
    """True when this CPU has bfloat16 instructions (AVX512-BF16 or AMX), whatever ``TANET_CPU_BF16`` says."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_model() -> str:
    """The CPU's model name as the system reports it (``/proc/cpuinfo``; else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith("flags"))
    except OSError:
        fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def describe_hardware(device: torch.device) -> dict[str, Any]:
    """What computed a run, for its records: the device's model, the CPU's, and bfloat16 support."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_bf16_instructions": cpu_bf16_instructions(),
                            "cpu_cores": usable_cpus(), "torch": torch.__version__}
    if os.environ.get(BF16_SWITCH, "").strip():
        info[BF16_SWITCH] = os.environ[BF16_SWITCH].strip()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def precision_name(amp: str) -> str:
    """The precision of a resolved ``--amp`` as results, logs and messages name it (float32, bf16, fp16)."""
    return "float32" if amp == "none" else amp


def resolve_amp(amp: str, device: torch.device) -> str:
    """``--amp auto`` made concrete: bf16 where it is fast (a CUDA device that has it, a CPU with
    bfloat16 instructions), else none (float32); any other value as it is."""
    import torch

    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "none"


_AMP_DTYPES = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}


def amp_dtype(amp: str) -> torch.dtype:
    """The compute dtype of ``--amp`` (``none``: float32, ``bf16``, ``fp16``)."""
    import torch

    return getattr(torch, _AMP_DTYPES[amp])


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``--amp`` (``none``, ``bf16`` or ``fp16``)."""
    import torch

    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    return torch.autocast(device.type, dtype=amp_dtype(amp))


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``images`` on ``device``, in the channels-last memory format when ``channels_last``."""
    import torch

    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


ALLOCATORS = ("tuned", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for the next step (glibc: no mmap for large blocks, no trimming).

    By default glibc hands every block over 32 MB (a 40-image activation map is 64-128 MB) to a fresh
    ``mmap`` and unmaps it when freed, so every step page-faults (and zeroes) gigabytes anew: on the
    CPU that system time costs the float32 model half of its speed. True when applied (Linux, glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def release_free_memory() -> bool:
    """Give the memory freed in this process back to the system (glibc's ``malloc_trim``, which
    ``tune_cpu_allocator`` keeps from happening by itself), e.g. after decoding a large image; True when
    done (Linux, glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and CUDA when available) RNG states, loadable with weights_only=True."""
    import torch

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what capture_rng_state() returned (CUDA states only if CUDA is available)."""
    import torch

    try:
        py, npy, cpu = state["python"], state["numpy"], state["torch"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"]))
        keys = npy["keys"]
        keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((str(npy["name"]), keys.astype(np.uint32), int(npy["pos"]),
                             int(npy["has_gauss"]), float(npy["cached_gaussian"])))
        torch.set_rng_state(cpu.cpu().to(torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"invalid RNG state in checkpoint: {type(exc).__name__}: {exc}") from None
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda_states) != count:
            warnings.warn(f"checkpoint has RNG states for {len(cuda_states)} CUDA devices, this machine has "
                          f"{count}; restoring the first {min(count, len(cuda_states))}", RuntimeWarning,
                          stacklevel=2)
        for i, s in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), device=i)


# --------------------------------------------------------------------------- child processes

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _ends_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when ``parent`` ends, however it ends
    (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def run_tied_child(command: Sequence[str], *, grace_s: float = 60.0, **popen: Any) -> int:
    """Run ``command`` (``popen``: subprocess.Popen's keywords) and return its exit status (negative: the
    signal that ended it). The child ends with this process: when this one ends, even by SIGKILL, the
    child gets SIGTERM (Linux); a SIGTERM to this process is passed on to the child, waited for, and
    raised here as KeyboardInterrupt, as Ctrl-C is after the child (which gets Ctrl-C too) has stopped,
    or has been killed after ``grace_s`` seconds."""
    proc = subprocess.Popen(list(command), preexec_fn=_ends_with(os.getpid()), **popen)
    terminated: list[int] = []

    def pass_on(signum: int, _frame: Any) -> None:
        terminated.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, pass_on)
    except ValueError:  # not the main thread: no handler (the child still ends with this process)
        previous = None
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
                proc.wait()
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if terminated:
        raise KeyboardInterrupt
    return code


def stopped_by_signal(code: int) -> bool:
    """Whether a child's exit status says it was stopped (Ctrl-C, SIGTERM, a signal) rather than failed:
    run again, it continues."""
    return code < 0 or code in (128 + signal.SIGINT, 128 + signal.SIGTERM)
