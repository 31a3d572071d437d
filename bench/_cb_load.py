"""The closed-loop request load the continuous-batching benches send (shared by their engine processes)."""

import random
import time


def workload(seed: int, n: int) -> list:
    """n seeded requests: (prompt ids of 17-129 tokens, max new tokens 32-64)."""
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, 259) for _ in range(rng.randint(16, 128))], rng.randint(32, 64))
            for _ in range(n)]


def serve(mgr, work: list, conc: int) -> tuple:
    """Closed loop: at most `conc` requests in flight (0: all at once), the next sent when one finishes.
    Returns (generated tokens, seconds)."""
    t0 = time.perf_counter()
    first = len(work) if conc <= 0 else min(conc, len(work))
    for p, m in work[:first]:
        mgr.add_request(p, max_new_tokens=m)
    sent, tokens, done = first, 0, 0
    while done < len(work):
        r = mgr.get_result(timeout=120)
        if r is None:
            raise RuntimeError("the engine stopped answering")
        if r.is_finished():
            done += 1
            tokens += len(r.generated_tokens)
            if sent < len(work):
                mgr.add_request(work[sent][0], max_new_tokens=work[sent][1])
                sent += 1
    return tokens, time.perf_counter() - t0
