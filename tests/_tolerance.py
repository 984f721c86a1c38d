"""The suite's one tolerance rule (STYLE habit 6): a result's error against a float64 truth may be at most
``factor`` (2) times the error plain PyTorch makes in the same dtype on the same inputs, plus a floor of a
few ulps of the output dtype. Nothing here is a constant tuned on one CPU: the budget is measured in the
same run, on the same machine, from the eager computation the caller passes in.

Errors are measured elementwise and made relative to the magnitude of the truth: by default the largest
|truth| of the element's row (last dim), so elements near zero inside a row are judged on the row's scale
(a logit gradient of 1e-12 next to one of 0.3 is not asked for 12 correct digits). ``scale="element"`` is
for results whose every element is an independent positive quantity (per-token weights, perplexities);
``scale="tensor"`` takes one scale for the whole tensor. Where the truth is exactly 0 by cancellation
(identical distributions give KL 0), pass the magnitude of the cancelling terms as ``scale`` (a number or a
tensor that broadcasts to the result).

Import it from any test file as ``from _tolerance import assert_eager_budget``: tests/ has no __init__.py, so
pytest's default (prepend) import mode puts tests/ on sys.path when it loads tests/conftest.py.
"""
from __future__ import annotations

import torch

__all__ = ["assert_eager_budget", "relative_error", "ulp"]


def ulp(dtype: torch.dtype) -> float:
    """Spacing of ``dtype`` at 1.0 (torch.finfo(dtype).eps)."""
    return torch.finfo(dtype).eps


def _scale(truth: torch.Tensor, scale) -> torch.Tensor:
    mag = truth.abs().nan_to_num(0.0, posinf=0.0)
    if isinstance(scale, (torch.Tensor, float, int)):  # the caller's magnitude (e.g. of terms that cancel to 0)
        s = torch.as_tensor(scale, dtype=torch.float64, device=truth.device).expand_as(mag)
    elif scale == "element" or truth.dim() == 0:
        s = mag
    elif scale == "row":
        s = mag.amax(dim=-1, keepdim=True).expand_as(mag)
    elif scale == "tensor":
        s = mag.max().expand_as(mag)
    else:
        raise ValueError(f"scale must be 'element', 'row' or 'tensor', got {scale!r}")
    # an all-zero row: absolute error on the smallest normal float64, i.e. any nonzero result counts as wrong
    return s.clamp_min(torch.finfo(torch.float64).tiny)


def relative_error(got: torch.Tensor, truth: torch.Tensor, scale="row") -> float:
    """max over elements of |got - truth| / scale (see the module docstring), over elements where the
    truth is finite; non-finite truths must be matched exactly (checked by assert_eager_budget)."""
    truth = truth.double()
    finite = torch.isfinite(truth)
    if not finite.any():
        return 0.0
    err = (got.double() - truth).abs() / _scale(truth, scale)
    return err[finite].max().item()


def assert_eager_budget(got: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, *, factor: float = 2.0,
                        ulps: float = 4.0, out_dtype: torch.dtype | None = None, scale="row",
                        what: str = "result") -> None:
    """Asserts err(got) <= factor * err(eager) + ulps * ulp(out_dtype), errors as in relative_error.

    got: the result under test (any floating dtype, the shape of truth). eager: plain PyTorch's result for
    the same quantity, computed in the same dtype from the same (already rounded) inputs. truth: the same
    quantity in float64 from those inputs. out_dtype: the dtype whose roundings set the floor (default:
    got.dtype). Non-finite truth elements (inf from masked logits, say) must be equal in got.
    """
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != truth {tuple(truth.shape)}"
    assert eager.shape == truth.shape, f"{what}: eager shape {tuple(eager.shape)} != truth {tuple(truth.shape)}"
    truth = truth.detach().double()
    got, eager = got.detach(), eager.detach()
    finite = torch.isfinite(truth)
    if not finite.all():
        same = got.double()[~finite] == truth[~finite]
        assert bool(same.all()), f"{what}: non-finite truth not reproduced ({int((~same).sum())} elements)"
    assert bool(torch.isfinite(got.double()[finite]).all()), f"{what}: non-finite result where the truth is finite"
    err = relative_error(got, truth, scale)
    err_eager = relative_error(eager, truth, scale)
    floor = ulps * ulp(out_dtype if out_dtype is not None else got.dtype)
    assert err <= factor * err_eager + floor, (
        f"{what}: relative error {err:.3e} > {factor:g} x plain PyTorch's {err_eager:.3e} + {ulps:g} ulp ({floor:.1e})")
