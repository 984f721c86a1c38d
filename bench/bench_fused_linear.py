"""Fused-linear skew KL / skew reverse KL: time and peak memory, forward + backward, against eager.

Run: pytest bench/bench_fused_linear.py -q -s      (writes bench/results/fused_linear-<device>.json)

Providers (mode "full" = forward + backward; the fused op computes its gradients in the forward, so a
separate backward timing would only show the final scaling):
  eager            DistiLLM-style PyTorch: full [N, V] logits for both models, materialised softmaxes and
                   mixture, autograd (the baseline every ratio is taken against, measured in the same run)
  fused-<backend>  distillkit.fused_linear_skew_kl / _reverse_kl with the row primitive on <backend>
                   (every backend available here except the Triton interpreter, which is a test vehicle)
  compiled         the eager loss through torch.compile (GPU and the tiny profile; bench/_util.compiled)
  liger-jsd        Liger-Kernel's LigerFusedLinearJSD when `liger_kernel` imports (a different divergence,
                   same shape of work: for scale only)
Shapes (bench/shapes.py): CPU N=4096, H=512, V=32000 fp32; GPU (and the anchor profile) N=8192, H=4096,
V=128256 bf16; the tiny profile a toy size on either.
Roofline: the 8NHV FLOPs of the four GEMMs (student + teacher logits 2 x 2NHV, grad_hidden 2NHV,
grad_weight 2NHV; i.e. 6NHV for the student head fwd+bwd, 2NHV for the teacher head fwd) divided by the
dense matmul rate measured in the same run: the fraction of time a GEMM-bound op could not do better than.
CPU goals (issue 3): peak extra memory <= 10% of eager's, time <= 1.0x eager. GPU goal: <= 60 ms, <= 4 GB.
"""
from __future__ import annotations

import gc
import os

import torch

import _util
import distillkit
import shapes
from distillkit._backend import backends

ALPHA = 0.1


def _make(n, h, v, dtype, dev, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # a student and teacher that disagree moderately (logit std ~2), as early in distillation
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(dev)
    sh = rnd(n, h).requires_grad_(True)
    sw = rnd(v, h, scale=2.0 / h ** 0.5).requires_grad_(True)
    th = rnd(n, h)
    tw = rnd(v, h, scale=2.0 / h ** 0.5)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    labels[::16] = -100  # some padding
    return sh, sw, th, tw, labels


def eager_loss(sh, sw, th, tw, labels, reverse, alpha=ALPHA):
    """The hand-written DistiLLM-style loss: everything [N, V] materialised, autograd for the backward."""
    z_s = (sh @ sw.T).float()
    with torch.no_grad():
        p = torch.softmax((th @ tw.T).float(), dim=-1)
    q = torch.softmax(z_s, dim=-1)
    if reverse:
        mix = (1 - alpha) * p + alpha * q
        per_token = (q * (torch.log(q + 1e-30) - torch.log(mix + 1e-30))).sum(-1)
    else:
        mix = alpha * p + (1 - alpha) * q
        per_token = (p * (torch.log(p + 1e-30) - torch.log(mix + 1e-30))).sum(-1)
    keep = labels != -100
    return (per_token * keep).sum() / keep.sum().clamp(min=1)


def _providers(dev):
    out, skipped = {}, {}
    for name, (ok, why) in backends().items():
        if not ok:
            skipped[f"fused-{name}"] = why
        elif name == "triton" and dev.type == "cpu":
            skipped["fused-triton"] = "CPU tensors run Triton only in the interpreter (a test vehicle)"
        elif name == "reference" and dev.type == "cpu" and not os.environ.get("DISTILLKIT_BENCH_ALL"):
            skipped["fused-reference"] = ("the eager formula over full [N, V] logits (the eager provider's cost); "
                                          "DISTILLKIT_BENCH_ALL=1 times it too")
        elif (name == "cuda") != (dev.type == "cuda") and name not in ("triton", "reference"):
            skipped[f"fused-{name}"] = f"needs {name} tensors"
        else:
            out[f"fused-{name}"] = name
    return out, skipped


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as exc:  # noqa: BLE001 - optional provider, reason printed
        return None, f"liger_kernel does not import ({exc.__class__.__name__}: {exc})"
    return LigerFusedLinearJSD, "liger_kernel"


def _step(fn, tensors):
    sh, sw = tensors[0], tensors[1]

    def run():
        sh.grad = None
        sw.grad = None
        loss = fn()
        loss.backward()
        return loss.detach()
    return run


def test_fused_linear_full():
    dev = _util.device()
    _, (n, h, v) = shapes.loss_shape(dev.type == "cuda", "fused-linear-cpu")
    if dev.type == "cuda":
        dtype, repeats, slow_repeats = torch.bfloat16, 10, 3
    else:
        dtype, repeats, slow_repeats = torch.float32, 3, 1
    if shapes.profile() == "tiny":
        repeats = slow_repeats = 1
    with_compiled = dev.type == "cuda" or shapes.profile() == "tiny"
    tensors = _make(n, h, v, dtype, dev)
    sh, sw, th, tw, labels = tensors
    rate = _util.matmul_flops(dtype, n=2048 if dev.type == "cpu" else 8192, dev=dev)
    flops = 8 * n * h * v
    fused, skipped = _providers(dev)
    liger_cls, liger_why = _liger()
    if liger_cls is None:
        skipped["liger-jsd"] = liger_why
    rows, losses = [], {}
    print(f"\nN={n} H={h} V={v} {dtype}; matmul rate {rate / 1e12:.2f} TFLOP/s; 8NHV = {flops / 1e12:.2f} TFLOP")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for case, reverse in (("skl", False), ("srkl", True)):
        eager_run = _step(lambda: eager_loss(sh, sw, th, tw, labels, reverse), tensors)
        candidates = [("eager", "eager", eager_run, slow_repeats)]
        if with_compiled:
            compiled_loss = _util.compiled(eager_loss)
            candidates.append(("compiled", "torch.compile", _step(
                lambda: compiled_loss(sh, sw, th, tw, labels, reverse), tensors), slow_repeats))
        op = distillkit.fused_linear_skew_reverse_kl if reverse else distillkit.fused_linear_skew_kl
        for prov, backend in fused.items():
            run = _step(lambda backend=backend: op(sh, sw, th, tw, labels, alpha=ALPHA, backend=backend), tensors)
            candidates.append((prov, backend, run, slow_repeats if backend == "reference" else repeats))
        if liger_cls is not None and not reverse:
            jsd = liger_cls(jsd_beta=ALPHA, ignore_index=-100)
            candidates.append(("liger-jsd", "liger", _step(lambda: jsd(sh, sw, th, tw, labels), tensors), repeats))
        eager_time = None
        for prov, backend, run, reps in candidates:
            gc.collect()
            peak, loss = _util.peak_extra_bytes(run, dev)  # also the warm-up
            losses[(case, prov)] = float(loss)
            t = _util.median_time_s(run, dev, warmup=0, repeats=reps)
            if prov == "eager":
                eager_time, eager_peak = t, peak
            row = _util.Row("fused_linear", f"{case} N{n} H{h} V{v} {str(dtype)[6:]}", prov, backend, t, peak,
                            roofline_fraction=(flops / rate) / t, ratio_to_eager=t / eager_time,
                            extra={"peak_vs_eager": peak / max(eager_peak, 1), "loss": float(loss)})
            rows.append(row)
            print(row.line() + f"  peak/eager {peak / max(eager_peak, 1):6.1%}")
        sh.grad = sw.grad = None
    _util.report(rows, "fused_linear")
    # the providers compute the same loss (sanity, not a benchmark goal)
    for (case, prov), value in losses.items():
        if prov.startswith("fused-"):
            assert abs(value - losses[(case, "eager")]) <= 1e-3 * max(1.0, abs(losses[(case, "eager")])), (case, prov)
