"""Probe: frozen bf16 weights pre-packed for oneDNN vs PyTorch's plain matmul, SmolLM2 layer shapes.

The forward (x W^T) and the input gradient (dY W) of the seven projections of one layer, at the token
counts of the bench's batches of 8; plain `F.linear` / `@` against `torch.ops.mkldnn._linear_pointwise`
with weights reordered once by `torch.ops.mkldnn._reorder_linear_weight` (W and W^T, as inductor's
freezing does on CPU). Alternated, median of 25. (bench/NOTES.md, 2026-11-29.)
Run from the repo root: .venv/bin/python -m bench.packed_weight_probe
"""
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(2)
bf = torch.bfloat16
linear_packed = torch.ops.mkldnn._linear_pointwise
shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
weights = [torch.randn(o, i, dtype=bf) for o, i in shapes]
packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
packed_t = [torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous()) for w in weights]
total = {"plain": 0.0, "packed": 0.0}
for m in (424, 648, 904, 1200, 1648):
    xs = {i: torch.randn(m, i, dtype=bf) for i in (576, 1536)}
    grads = {o: torch.randn(m, o, dtype=bf) for o in (192, 576, 1536)}
    w0 = weights[4]
    assert torch.equal(torch.nn.functional.linear(xs[576], w0), linear_packed(xs[576], packed[4], None, "none", [], ""))

    def plain():
        for (o, i), w in zip(shapes, weights):
            torch.nn.functional.linear(xs[i], w)
            grads[o] @ w

    def with_packed():
        for (o, i), p, pt in zip(shapes, packed, packed_t):
            linear_packed(xs[i], p, None, "none", [], "")
            linear_packed(grads[o], pt, None, "none", [], "")

    times = {"plain": [], "packed": []}
    for _ in range(25):
        for name, fn in (("plain", plain), ("packed", with_packed)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k in total:
        total[k] += med[k]
    print(m, "tokens:", {k: f"{v * 1e3:.2f} ms" for k, v in med.items()}, f"plain/packed {med['plain'] / med['packed']:.3f}",
          flush=True)
print(f"all token counts: plain/packed {total['plain'] / total['packed']:.3f}")
