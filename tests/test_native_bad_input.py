"""Every C++ entry point of the norm family checks device, dtype, shape and layout and raises an error
that names the op and the argument (TORCH_CHECK: TypeError for dtypes, ValueError for shapes/values):
never a crash or a silent misread. The Python adapters and the public functions check first; these
tests call the torch.ops.mmkern_C ops directly, as a user of the raw ops would."""
import pytest
import torch

from mmkern.build import ensure_built
from mmkern.native import cpp_op


@pytest.fixture(scope="module", autouse=True)
def extension():
    return ensure_built()


def _forward(x, residual=None, weight=None, bias=None, shift=None, scale=None, eps=1e-5, p=0.0, fp32=False):
    return cpp_op("norm_forward")(x, residual, weight, bias, shift, scale, eps, p, 0, fp32, False)


def _backward(dout, pre, dpre=None, weight=None, scale=None, has_shift=False, batch=1, x_dtype=torch.float32, p=0.0):
    return cpp_op("norm_backward")(dout, dpre, pre, weight, None, scale, 1e-5, p, 0, False, True, has_shift, batch,
                                   x_dtype)


X = torch.randn(4, 8)


@pytest.mark.parametrize("call,error,match", [
    (lambda: _forward(X.double()), TypeError, r"norm_forward: x must have dtype Float, Half, BFloat16; got Double"),
    (lambda: _forward(torch.randn(2, 4, 8)), ValueError, r"norm_forward: x must be 2-D"),
    (lambda: _forward(torch.randn(4, 0)), ValueError, r"x must have 1 to 65536 columns; got 0"),
    (lambda: _forward(torch.randn(1, 65537)), ValueError, r"x must have 1 to 65536 columns; got 65537"),
    (lambda: _forward(torch.randn(8, 4).t()), ValueError, r"x must have a contiguous last dimension"),
    (lambda: _forward(X, residual=torch.randn(4, 9)), ValueError, r"residual must have shape \(4, 8\)"),
    (lambda: _forward(X, residual=X.half()), TypeError, r"residual stream .* must have x's dtype \(Float\) or float32"),
    (lambda: _forward(X.half(), residual=X.bfloat16()), TypeError, r"residual stream"),
    (lambda: _forward(X, weight=torch.randn(7)), ValueError, r"weight must have shape \[8\]"),
    (lambda: _forward(X, weight=torch.randn(8).half()), TypeError, r"weight must have dtype Float; got Half"),
    (lambda: _forward(X, bias=torch.randn(16)[::2]), ValueError, r"bias must be contiguous"),
    (lambda: _forward(X, shift=torch.randn(3, 8)), ValueError, r"3 samples, which must divide the 4 rows"),
    (lambda: _forward(X, shift=torch.randn(2, 8), scale=torch.randn(4, 8)), ValueError, r"shift must have shape"),
    (lambda: _forward(X, eps=0.0), ValueError, r"eps must be > 0"),
    (lambda: _forward(X, p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda: _backward(X.half(), X), TypeError, r"norm_backward: dout must have x's dtype Float; got Half"),
    (lambda: _backward(X, X, dpre=X.half()), TypeError, r"dpre must have pre's dtype Float; got Half"),
    (lambda: _backward(X, X[:, :4].contiguous()), ValueError, r"dout must have shape \(4, 4\)"),
    (lambda: _backward(X, torch.randn(8, 4).t()), ValueError, r"pre must be contiguous"),
    (lambda: _backward(X, X, scale=torch.randn(3, 8), batch=3), ValueError, r"3 modulation samples must divide"),
    (lambda: _backward(X, X, batch=2), ValueError, r"batch must be 1 without modulation"),
    (lambda: _backward(X, X, x_dtype=torch.float64), TypeError, r"x_dtype must be float32, float16 or bfloat16"),
    (lambda: cpp_op("dropout_keep_mask")(X, 1.5, 0), ValueError, r"dropout_p must be in \[0, 1\)"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_device_without_a_kernel_is_an_error_not_a_crash():
    with pytest.raises(NotImplementedError, match="mmkern_C::norm_forward"):
        _forward(torch.empty(4, 8, device="meta"))
