"""Solver threads under load: float64/float32 eigh and a thin SVD on torch's default threads and on 1,
with the machine as it is and with this script's own busy process on one core (issue 24).

    python bench/solver_threads.py          # idle (as the machine is)
    python bench/solver_threads.py busy     # a `while True: pass` process started first
"""
import time, sys, subprocess, os, torch
def t(f, n=2):
    best = []
    for _ in range(n):
        s = time.perf_counter(); f(); best.append(time.perf_counter() - s)
    return min(best)
g = torch.Generator().manual_seed(0)
a = torch.randn(1536, 1536, dtype=torch.float64, generator=g); a = a @ a.T
b = torch.randn(1536, 576, dtype=torch.float64, generator=g)
c = torch.randn(768, 768, dtype=torch.float64, generator=g); c = c @ c.T
busy = None
if len(sys.argv) > 1 and sys.argv[1] == "busy":
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(1)
try:
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        print(f"threads={threads} busy={busy is not None} load={os.getloadavg()[0]:.2f}",
              f"eigh1536 f64 {t(lambda: torch.linalg.eigh(a)):.2f}s",
              f"eigh1536 f32 {t(lambda: torch.linalg.eigh(a.float())):.2f}s",
              f"svd1536x576 f64 {t(lambda: torch.linalg.svd(b, full_matrices=False)):.2f}s",
              f"eigh768 f64 {t(lambda: torch.linalg.eigh(c)):.2f}s",
              f"eigh768 f32 {t(lambda: torch.linalg.eigh(c.float())):.2f}s", flush=True)
finally:
    if busy: busy.kill()
