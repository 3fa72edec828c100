"""What the exact base fingerprint of sparse files costs: seconds per GB of weights.

    python benchmarks/sparse_fingerprint.py                 # 100M float32 entries (400 MB), 10% trained
    python benchmarks/sparse_fingerprint.py --numel 20000000

``load_sparse`` recomputes, for every parameter, a SHA-256 of its bytes with the
trained positions zeroed (``sara_edu.sara.sparse_file._fingerprint``); this
times it on one large weight against the first format's fingerprint (``sum |w|``
plus 64 sampled values, which missed sign flips and one-ulp changes), and checks
that both changes are now caught. Times are process CPU seconds (best of
``--repeats``; wall time is also recorded, but on a shared box it mostly measures
the other jobs). Target: the exact fingerprint costs no more than the old one
(it is one streaming pass; the old one built a boolean-masked copy). Results: a table and ``benchmarks/results/sparse_fingerprint_<device>.csv``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd
import torch

from sara_edu.sara.sparse_file import _fingerprint, _legacy_fingerprint

RESULTS = Path(__file__).resolve().parent / "results"


def _best_of(fn, repeats: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the fastest of ``repeats`` runs; CPU time is what a shared box can measure."""
    times = []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        times.append((time.process_time() - cpu, time.perf_counter() - wall))
    return min(times)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--trained", type=float, default=0.1, help="fraction of entries that trained")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(args.numel, generator=g) * 0.02).to(args.device, dtype)
        trained = torch.randperm(args.numel, generator=g)[: int(args.numel * args.trained)].sort().values
        trained = trained.to(args.device)
        gb = w.numel() * w.element_size() / 1e9
        exact = _best_of(lambda w=w, trained=trained: _fingerprint(w, trained), args.repeats)
        legacy = _best_of(lambda w=w, trained=trained: _legacy_fingerprint(w, trained), args.repeats)
        # the changes the first format let through, at an untouched position it does not sample (its second)
        untouched = int(torch.nonzero(torch.ones(1000, dtype=torch.bool).index_fill(0, trained[trained < 1000].cpu(),
                                                                                       False))[1])
        caught = {}
        base_exact, base_legacy = _fingerprint(w, trained), _legacy_fingerprint(w, trained)
        for change in ("sign flip", "one ulp"):
            v = w.clone()
            old = v[untouched].item()
            if change == "sign flip":
                v[untouched] = -old
            else:  # the next representable value: add one to the bit pattern
                v.view(torch.int32 if dtype == torch.float32 else torch.int16)[untouched] += 1
            assert v[untouched].item() != old
            legacy_v = _legacy_fingerprint(v, trained)  # judged by the first format's own acceptance rule
            legacy_same = legacy_v[1] == base_legacy[1] and math.isclose(legacy_v[0], base_legacy[0], rel_tol=1e-9,
                                                                          abs_tol=1e-12)
            caught[change] = (_fingerprint(v, trained) != base_exact, not legacy_same)
        rows.append({"device": args.device, "dtype": str(dtype).removeprefix("torch."), "numel": args.numel,
                     "GB": round(gb, 3), "exact_s": round(exact[0], 3), "exact_GB_per_s": round(gb / exact[0], 2),
                     "legacy_s": round(legacy[0], 3), "exact_wall_s": round(exact[1], 3),
                     "legacy_wall_s": round(legacy[1], 3),
                     "exact_catches_sign_flip": caught["sign flip"][0], "legacy_catches_sign_flip": caught["sign flip"][1],
                     "exact_catches_one_ulp": caught["one ulp"][0], "legacy_catches_one_ulp": caught["one ulp"][1]})
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    for r in rows:
        ok = r["exact_s"] <= r["legacy_s"] and r["exact_catches_sign_flip"] and r["exact_catches_one_ulp"]
        print(f"{'PASS' if ok else 'FAIL'} {r['dtype']}: exact fingerprint {r['exact_s']} s <= first format's "
              f"{r['legacy_s']} s and catches a sign flip and a one-ulp change")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"sparse_fingerprint_{args.device}.csv"
    df.to_csv(out, index=False)
    print(f"saved {out}")
    return df


if __name__ == "__main__":
    main()
