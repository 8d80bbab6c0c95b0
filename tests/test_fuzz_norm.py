"""Property-based parity of layer_norm_residual / rms_norm_residual: hypothesis draws the arguments,
every usable backend is compared with the float64 oracle (flash-attn's criterion, see
tests/fuzz_profiles.py for profiles, seed and the printed counts).

Drawn: leading shapes with 0 and 1 (and none: a 1-D x), hidden sizes from 1 to past the Triton
kernels' one-pass limit, residual absent / in x's dtype / float32, weight and bias absent / in x's
dtype / float32, prenorm, residual_in_fp32, adaLN modulation (shift and/or scale), dropout (the
oracle draws the backend's own keep mask), eps, rows with a mean far from zero, strided views.
"""
import pytest
import torch
from hypothesis import given, strategies as st

import mmkern
import fuzz_profiles as fz
from fuzz_profiles import fuzz
from mmkern import verify

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
HIDDEN = [1, 2, 7, 33, 100, 128, 257, 1000, 4096, 8193] if fz.GPU else [1, 2, 7, 33, 100, 128, 257, 1000]
NORM_OPS = ("norm_residual_forward", "norm_residual_backward")
# A plain input of the norm forward (fp32 rows of 64, no residual, weight or dropout), for every_backend_checks
TYPICAL = dict(x=torch.zeros(4, 64, device=fz.DEVICE), residual=None, weight=None, bias=None, eps=1e-5, dropout_p=0.0,
               dropout_seed=None, residual_in_fp32=False, is_rms_norm=False, shift=None, scale=None)


@pytest.fixture(autouse=True, scope="module")
def _summary(pytestconfig):
    fz.register_summary(pytestconfig)


@fz.every_backend_checks(["rms_norm_residual", "layer_norm_residual"], NORM_OPS, TYPICAL)
@fuzz(ci=12, gpu=200)
@given(data=st.data(), dtype=DTYPES, rms=st.booleans())
def test_norm_residual_matches_oracle(data, dtype, rms):
    test = "rms_norm_residual" if rms else "layer_norm_residual"
    with fz.counted(test):
        lead = data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=3), "leading dims")
        N = data.draw(st.sampled_from(HIDDEN), "hidden")
        residual = data.draw(st.sampled_from([None, "x", "fp32"]), "residual")
        weight = data.draw(st.sampled_from([None, "x", "fp32"]), "weight")
        bias = None if rms else data.draw(st.sampled_from([None, "x", "fp32"]), "bias")
        modulation = data.draw(st.sampled_from([None, "both", "shift", "scale"]), "modulation") if lead else None
        prenorm = data.draw(st.booleans(), "prenorm")
        residual_in_fp32 = data.draw(st.booleans(), "residual_in_fp32")
        dropout_p = data.draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]), "dropout_p")
        eps = data.draw(st.sampled_from([1e-5, 1e-6, 1e-2]), "eps")
        offset = data.draw(st.sampled_from([0.0, 0.0, 30.0]), "row mean offset")
        layout = data.draw(st.sampled_from(fz.LAYOUTS), "layout")
        shape = (*lead, N)
        B = lead[0] if lead else 0

        inputs = dict(x=torch.randn(shape, dtype=torch.float64, device=fz.DEVICE) + offset)
        cast, grad = ["x"], ["x"]
        for name, kind, like in (("residual", residual, shape), ("weight", weight, (N,)), ("bias", bias, (N,))):
            if kind is not None:
                inputs[name] = torch.randn(like, dtype=torch.float64, device=fz.DEVICE)
                grad.append(name)
                if kind == "x":
                    cast.append(name)
        if modulation in ("both", "shift"):
            inputs["shift"] = torch.randn(B, N, dtype=torch.float64, device=fz.DEVICE)
        if modulation in ("both", "scale"):
            inputs["scale"] = torch.randn(B, N, dtype=torch.float64, device=fz.DEVICE) * 0.5
        for name in ("shift", "scale"):
            if name in inputs:
                cast.append(name), grad.append(name)
        description = (f"{shape} res {residual} w {weight} b {bias} mod {modulation} prenorm {prenorm} "
                       f"fp32 stream {residual_in_fp32} p {dropout_p} eps {eps} offset {offset} {layout}")

        def run(x, residual=None, weight=None, bias=None, shift=None, scale=None):
            as_fp32 = {"residual": residual, "weight": weight, "bias": bias}
            kinds = {"residual": residual_kind, "weight": weight_kind, "bias": bias_kind}
            args = {n: (t.float() if kinds[n] == "fp32" else t) for n, t in as_fp32.items()}
            x = fz.as_layout(x, layout)
            mod = None if modulation is None else (shift, scale)
            kw = dict(residual=args["residual"], weight=args["weight"], eps=eps, dropout_p=dropout_p,
                      prenorm=prenorm, residual_in_fp32=residual_in_fp32, modulation=mod)
            if rms:
                out = mmkern.rms_norm_residual(x, **kw)
            else:
                out = mmkern.layer_norm_residual(x, bias=args["bias"], **kw)
            return out if prenorm else (out,)

        residual_kind, weight_kind, bias_kind = residual, weight, bias
        case = verify.Case(test, description, lambda: inputs, fz.seeded(run, 4321), cast=tuple(cast), grad=tuple(grad),
                           outputs=("out", "residual"))
        x = inputs["x"].to(dtype).reshape(-1, N)
        reasons_inputs = dict(
            x=x, residual=None if residual is None else x.float() if residual == "fp32" else x,
            weight=None, bias=None, eps=eps, dropout_p=dropout_p, dropout_seed=None, residual_in_fp32=residual_in_fp32,
            is_rms_norm=rms, shift=None, scale=None)
        checked = 0
        for backend in fz.backends():
            if not fz.takes(backend, "norm_residual_forward", x.device, reasons_inputs):
                fz.COUNTS[(test, f"not taken[{backend}]")] += 1
                continue
            if dropout_p > 0 and not fz.has_mask_function(backend, "norm"):
                fz.COUNTS[(test, f"dropout, no mask function[{backend}]")] += 1
                continue
            fz.check(test, case, backend, dtype, family="norm" if dropout_p > 0 else None)
            checked += 1
        assert checked, "no backend checked this example"
