"""Shared helpers of the benchmark scripts: machine description, timing, memory, FLOP counting, tables."""
import ctypes
import datetime
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def quiet_warnings():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "lavis", "timm", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def machine():
    """One line describing where a number was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    parts = [f"{os.cpu_count()} x {cpu}", f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name(0))
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        parts.append(f"{mem:.0f} GiB RAM")
    except (ValueError, OSError):
        pass
    return ", ".join(parts)


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line():
    args = [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
    return "python " + " ".join(args)


def now():
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def ranges_overlap(a, b):
    """Whether two (min, max) ranges of timings share a point: then neither model is faster at that noise."""
    return a[0] <= b[1] and b[0] <= a[1]


# -- memory -------------------------------------------------------------------------------------------

class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):
    _libc = None


def heap_in_use():
    """Bytes the C heap has handed out (glibc ``mallinfo2``: arena + mmapped blocks), or None."""
    if _libc is None:
        return None
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Peak memory of a block above its start, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: glibc's bytes in use, sampled every ~0.5 ms by a thread
    (torch's CPU allocator is malloc), so very short peaks can be missed: a lower bound, good for ratios.
    """

    def __init__(self, device):
        self.device = device
        self.peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = heap_in_use()
        self._max = self.base
        self._stop = threading.Event()
        if self.base is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            used = heap_in_use()
            if used > self._max:
                self._max = used
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return False
        if self.base is None:
            return False
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, heap_in_use())
        self.peak = self._max - self.base
        return False


# -- FLOPs --------------------------------------------------------------------------------------------

def flop_counter():
    """torch's FlopCounterMode, also counting the CPU flash-attention kernels (unregistered in torch)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_backward_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn):
    """FLOPs counted by torch's dispatcher while ``fn()`` runs (matmuls, convolutions, attention)."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


# -- tables -------------------------------------------------------------------------------------------

def _cell(value):
    text = str(value).replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n")


def table(headers, rows):
    """A GitHub markdown table (list of lines). Body cells are escaped so that generated text holding "|",
    a backslash or a line break stays in its cell and reads as written (a line break shows as \\n)."""
    cells = [[_cell(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return lines


def fmt(value, digits=1):
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def write_text(path, lines):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)


# -- clocks -------------------------------------------------------------------------------------------

def now_s(kind):
    """Seconds on the chosen clock: "wall" (perf_counter) or "cpu" (this process's CPU time, all threads).

    On a shared machine, "cpu" with one torch thread is the measure least disturbed by other jobs (time-slicing
    does not count; with several threads, OpenMP barrier spinning still would). GPU work is never CPU time:
    use "wall" there."""
    return time.process_time() if kind == "cpu" else time.perf_counter()


def setup_threads(threads):
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
