"""Random layers for benchmarks, built from random codes (no encoder run)."""

from __future__ import annotations

import torch

from exl2 import QMatrix, QParams
from exl2.reference import pack

#: Mixes near the three bitrates the issue names (stored bits/weight including overhead).
MIXES = {
    2.5: QParams({3: 32, 2: 32}, [3, 2], [0.3, 0.7]),
    4.0: QParams({5: 64, 4: 64, 3: 64}, [5, 4, 3], [0.2, 0.6, 0.2]),
    6.0: QParams({8: 32, 6: 32, 5: 32}, [8, 6, 5], [0.1, 0.6, 0.3]),
}


def random_layer(in_features: int, out_features: int, bpw: float, device: str = "cpu", seed: int = 0) -> QMatrix:
    qp = MIXES[bpw]
    g = torch.Generator().manual_seed(seed)
    plan = qp.plan(in_features).groups
    codes = torch.cat([torch.randint(0, 1 << b, (n, out_features), generator=g) for b, _, n in plan])
    qm = pack(codes, plan, torch.randint(1, 17, (len(plan), out_features), generator=g),
              torch.rand(len(plan), generator=g) * 0.1 + 0.01, torch.randperm(in_features, generator=g), out_features)
    return qm.to(device)
