"""Probe: each decoder layer torch.compiled (`fast.compile.compile_layers`) vs eager, SmolLM2 training steps on CPU.

Forward + backward of 8 real length-sorted batches of the bench split (bf16, LoRA r = 32, the grouped
attention kernel), compiled and eager alternated on each batch, 2 repeats, wall time, 2 threads; prints
the first three compiled steps (the compile) and the ratio. Run twice from the repo root, the first time
with an empty cache: TORCHINDUCTOR_CACHE_DIR=/tmp/ind .venv/bin/python -m bench.regional_compile_probe
"""
import time

from bench.probe_setup import forward_backward, training_model_and_batches  # noqa: E402
from oloraplus.fast.compile import compile_layers, decoder_layers  # noqa: E402

model, batches = training_model_and_batches()
t0 = time.perf_counter()
compile_layers(model, "cpu")
layers = decoder_layers(model)
def step(b):
    t = time.perf_counter()
    loss = forward_backward(model, b)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t, loss
w = []
for b in batches[:3]:
    w.append(step(b))
print("compiled first 3 steps", [round(x[0], 1) for x in w], "total since compile call", round(time.perf_counter() - t0, 1), flush=True)
# alternate compiled vs eager: toggle via _compiled_call_impl
compiled_impls = [layer._compiled_call_impl for layer in layers]


def set_mode(compiled: bool) -> None:
    for layer, impl in zip(layers, compiled_impls):
        layer._compiled_call_impl = impl if compiled else None


sec = {"eager": 0.0, "compiled": 0.0}; losses = {}
for rep in range(2):
    for b in batches:
        for mode in ("eager", "compiled"):
            set_mode(mode == "compiled")
            s, l = step(b); sec[mode] += s; losses.setdefault(mode, []).append(l)
    print(rep, sec, flush=True)
print("ratio eager/compiled", sec["eager"] / sec["compiled"])
print("loss diff max", max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])))
