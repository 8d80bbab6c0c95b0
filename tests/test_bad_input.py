"""The bad-input table of the public functions: name -> (call, exception, message pattern naming the argument).

The test that runs it (with more rows, on every usable backend, and once in a child process to prove
nothing crashes) is tests/test_errors_table.py."""
import torch

import mmkern
from conftest import randn

f32 = dict(dtype=torch.float32)


def qkv(B=2, Lq=5, Lk=5, H=4, H_kv=2, D=16, dtype=torch.float32):
    return randn(B, Lq, H, D, dtype=dtype), randn(B, Lk, H_kv, D, dtype=dtype), randn(B, Lk, H_kv, D, dtype=dtype)


def packed(lens, H=2, D=8):
    return randn(sum(lens), H, D, **f32)


def cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


ac = torch.linspace(0.99, 0.01, 10)
x4 = randn(2, 4, **f32)
q, k, v = qkv()
CASES = {
    # flash_attn_func
    "int q": (lambda: mmkern.flash_attn_func(q.long(), k, v), TypeError, r"q must have dtype .*got torch.int64"),
    "mixed dtypes": (lambda: mmkern.flash_attn_func(q, k.half(), v), TypeError, r"q, k, v must share one dtype"),
    "devices": (lambda: mmkern.flash_attn_func(q, k.to("meta"), v), ValueError, r"one device; got q on cpu, k on meta"),
    "rank": (lambda: mmkern.flash_attn_func(q[0], k, v), ValueError, r"q must be 4-D \(batch, seqlen, heads, head_dim\)"),
    "batch": (lambda: mmkern.flash_attn_func(q, k[:1], v[:1]), ValueError, r"k.shape\[0\] \(batch, as q\) must be 2"),
    "head_dim": (lambda: mmkern.flash_attn_func(q, k[..., :8], v), ValueError, r"k.shape\[-1\] \(head_dim, as q\)"),
    "v seqlen": (lambda: mmkern.flash_attn_func(q, k, v[:, :3]), ValueError, r"v.shape\[1\] \(seqlen, as k\)"),
    "heads divide": (lambda: mmkern.flash_attn_func(*qkv(H=4, H_kv=3)), ValueError, r"key/value heads \(3\) must divide"),
    "head dim max": (lambda: mmkern.flash_attn_func(*qkv(D=257)), ValueError, r"head_dim .* must be in 1..256, got 257"),
    "window": (lambda: mmkern.flash_attn_func(q, k, v, window_size=(-2, 0)), ValueError, r"window_size values must be >= -1"),
    "window type": (lambda: mmkern.flash_attn_func(q, k, v, window_size=3), ValueError, r"window_size must be a pair"),
    "dropout high": (lambda: mmkern.flash_attn_func(q, k, v, dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\), got 1.0"),
    "dropout low": (lambda: mmkern.flash_attn_func(q, k, v, dropout_p=-0.1), ValueError, r"dropout_p .* got -0.1"),
    "softcap": (lambda: mmkern.flash_attn_func(q, k, v, softcap=-1.0), ValueError, r"softcap must be a float >= 0"),
    "scale type": (lambda: mmkern.flash_attn_func(q, k, v, softmax_scale="1"), TypeError, r"softmax_scale must be a float"),
    "alibi shape": (lambda: mmkern.flash_attn_func(q, k, v, alibi_slopes=torch.rand(3)), ValueError,
                    r"alibi_slopes must have shape \(heads,\) = \(4,\) or \(batch, heads\) = \(2, 4\); got \(3,\)"),
    "alibi dtype": (lambda: mmkern.flash_attn_func(q, k, v, alibi_slopes=torch.rand(4).double()), TypeError,
                    r"alibi_slopes must have dtype float32"),
    "not a tensor": (lambda: mmkern.flash_attn_func([1.0], k, v), TypeError, r"q must be a torch.Tensor, got list"),
    # varlen
    "cu decreasing": (lambda: mmkern.flash_attn_varlen_func(packed([3, 2]), packed([3, 2]), packed([3, 2]),
                                                            cu(0, 3, 2), cu(0, 3, 5), 3, 3),
                      ValueError, r"cu_seqlens_q must start at 0 and never decrease; got \[0, 3, 2\]"),
    "cu total": (lambda: mmkern.flash_attn_varlen_func(packed([3, 2]), packed([3, 2]), packed([3, 2]),
                                                       cu(0, 3, 4), cu(0, 3, 5), 3, 3),
                 ValueError, r"cu_seqlens_q\[-1\] must equal the packed length 5"),
    "cu lengths": (lambda: mmkern.flash_attn_varlen_func(packed([3, 2]), packed([3, 2]), packed([3, 2]),
                                                         cu(0, 3, 5), cu(0, 5), 3, 3),
                   ValueError, r"cu_seqlens_q and cu_seqlens_k must have the same length"),
    "cu dtype": (lambda: mmkern.flash_attn_varlen_func(packed([3]), packed([3]), packed([3]),
                                                       cu(0, 3).float(), cu(0, 3), 3, 3),
                 TypeError, r"cu_seqlens_q must have dtype int32, int64"),
    "max_seqlen": (lambda: mmkern.flash_attn_varlen_func(packed([3, 2]), packed([3, 2]), packed([3, 2]),
                                                         cu(0, 3, 5), cu(0, 3, 5), 2, 3),
                   ValueError, r"max_seqlen_q \(2\) is smaller than the longest sequence"),
    "varlen rank": (lambda: mmkern.flash_attn_varlen_func(q, k, v, cu(0, 2), cu(0, 2), 2, 2), ValueError,
                    r"q must be 3-D \(total, heads, head_dim\)"),
    # kvcache
    "cache overflow": (lambda: mmkern.flash_attn_with_kvcache(q[:, :1], randn(2, 6, 2, 16, **f32), randn(2, 6, 2, 16, **f32),
                                                              randn(2, 2, 2, 16, **f32), randn(2, 2, 2, 16, **f32),
                                                              cache_seqlens=5),
                       ValueError, r"cache_seqlens \+ k.shape\[1\] must be <= the cache length 6; the largest is 7"),
    "k without v": (lambda: mmkern.flash_attn_with_kvcache(q, k, v, k=k), ValueError, r"pass both k and v"),
    "append needs seqlens": (lambda: mmkern.flash_attn_with_kvcache(q, k, v, k=k, v=v), ValueError,
                             r"cache_seqlens is needed"),
    "new k shape": (lambda: mmkern.flash_attn_with_kvcache(q, k, v, k=k[..., :8], v=v, cache_seqlens=0), ValueError,
                    r"k must have shape \(batch, new_len, kv_heads, head_dim\)"),
    # sdpa
    "sdpa gqa": (lambda: mmkern.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
                 ValueError, r"different head counts need enable_gqa=True"),
    "sdpa mask shape": (lambda: mmkern.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv(H_kv=4)),
                                                                    attn_mask=torch.ones(3, 5, dtype=torch.bool)),
                        ValueError, r"attn_mask of shape \(3, 5\) does not broadcast to"),
    "sdpa mask dtype": (lambda: mmkern.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv(H_kv=4)),
                                                                    attn_mask=torch.zeros(5, 5, dtype=torch.float64)),
                        TypeError, r"float attn_mask must have the dtype of query"),
    "sdpa mask and causal": (lambda: mmkern.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in qkv(H_kv=4)), attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True),
        ValueError, r"attn_mask or is_causal=True, not both"),
    "sdpa rank": (lambda: mmkern.scaled_dot_product_attention(q[0], k[0], v[0]), ValueError, r"query must have 4 dimensions"),
    # norms
    "norm dtype": (lambda: mmkern.layer_norm_residual(x4.long()), TypeError, r"x must have dtype"),
    "norm residual shape": (lambda: mmkern.layer_norm_residual(x4, x4[:, :2]), ValueError,
                            r"residual must have the shape of x \(2, 4\), got \(2, 2\)"),
    "norm weight shape": (lambda: mmkern.rms_norm_residual(x4, weight=torch.ones(3)), ValueError,
                          r"weight.shape\[0\] \(the normalized size, x.shape\[-1\]\) must be 4"),
    "norm weight dtype": (lambda: mmkern.layer_norm_residual(x4.half(), weight=torch.ones(4, dtype=torch.bfloat16)),
                          TypeError, r"weight must have the dtype of x \(torch.float16\) or float32"),
    "norm eps": (lambda: mmkern.layer_norm_residual(x4, eps=0.0), ValueError, r"eps must be a float > 0, got 0.0"),
    "norm dropout": (lambda: mmkern.rms_norm_residual(x4, dropout_p=2), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "norm devices": (lambda: mmkern.layer_norm_residual(x4, weight=torch.ones(4, device="meta")), ValueError,
                     r"one device; got x on cpu, weight on meta"),
    "norm scalar": (lambda: mmkern.layer_norm_residual(torch.tensor(1.0)), ValueError, r"at least 1 dimension"),
    "norm modulation pair": (lambda: mmkern.layer_norm_residual(x4, modulation=torch.zeros(2, 4)), ValueError,
                             r"modulation must be a pair \(shift, scale\) of \(batch, hidden\) tensors, got Tensor"),
    "norm modulation shape": (lambda: mmkern.rms_norm_residual(x4, modulation=(torch.zeros(2, 4), torch.zeros(1, 4))),
                              ValueError, r"modulation scale must have shape \(batch, hidden\) = \(2, 4\) for x of "
                                          r"shape \(2, 4\); got \(1, 4\)"),
    "norm modulation dtype": (lambda: mmkern.layer_norm_residual(x4.half(), modulation=(torch.zeros(2, 4).double(),
                                                                                        None)),
                              TypeError, r"shift must have the dtype of x \(torch.float16\) or float32; got torch.float64"),
    "norm modulation 1-D x": (lambda: mmkern.layer_norm_residual(x4[0], modulation=(x4, x4)), ValueError,
                              r"modulation needs x of shape \(batch, ..., hidden\); got shape \(4,\)"),
    "norm op modulation rows": (lambda: torch.ops.mmkern.norm_residual_forward(
        torch.zeros(5, 4), None, None, None, 1e-5, 0.0, None, False, False, torch.zeros(2, 4), None), ValueError,
        r"shift must have shape \(batch, 4\) with batch dividing the 5 rows of x"),
    "norm hidden 0": (lambda: mmkern.layer_norm_residual(torch.zeros(2, 0)), ValueError,
                      r"last \(normalized\) dimension >= 1; got shape \(2, 0\)"),
    "norm bias shape": (lambda: mmkern.layer_norm_residual(x4, bias=torch.ones(5)), ValueError,
                        r"bias.shape\[0\] \(the normalized size, x.shape\[-1\]\) must be 4"),
    "nn normalized shape": (lambda: mmkern.nn.LayerNormResidual(8)(x4), ValueError,
                            r"x must end in normalized_shape \(8,\), got \(2, 4\)"),
    # diffusion
    "timestep range": (lambda: mmkern.diffusion.add_noise(x4, x4, torch.tensor([0, 10]), ac), ValueError,
                       r"timesteps must lie in \[0, 9\] .* got values in \[0, 10\]"),
    "timestep negative": (lambda: mmkern.diffusion.get_velocity(x4, x4, -1, ac), ValueError, r"timesteps must lie in"),
    "timestep dtype": (lambda: mmkern.diffusion.add_noise(x4, x4, torch.tensor([0.5, 1.0]), ac), TypeError,
                       r"timesteps must have dtype int32, int64"),
    "timestep batch": (lambda: mmkern.diffusion.add_noise(x4, x4, torch.tensor([0, 1, 2]), ac), ValueError,
                       r"timesteps must be 0-d or \(batch,\) with batch = original_samples.shape\[0\]"),
    "noise shape": (lambda: mmkern.diffusion.add_noise(x4, x4[:1], 0, ac), ValueError,
                    r"noise must have the shape and dtype of original_samples"),
    "alphas dtype": (lambda: mmkern.diffusion.add_noise(x4, x4, 0, ac.half()), TypeError,
                     r"alphas_cumprod must have dtype float32, float64"),
    "prediction type": (lambda: mmkern.diffusion.training_target(x4, x4, 0, ac, "x0"), ValueError,
                        r"prediction_type must be one of epsilon, v_prediction, sample; got 'x0'"),
    "timestep type": (lambda: mmkern.diffusion.add_noise(x4, x4, 1.5, ac), TypeError,
                      r"timesteps must be an int or an integer tensor, got float"),
    # diffusion loss and sampler steps
    "loss snr_gamma zero": (lambda: mmkern.diffusion.diffusion_loss(x4, x4, x4, 0, ac, snr_gamma=0.0), ValueError,
                            r"snr_gamma must be None or a float > 0, got 0.0"),
    "loss snr_gamma negative": (lambda: mmkern.diffusion.diffusion_loss(x4, x4, x4, 0, ac, snr_gamma=-5), ValueError,
                                r"snr_gamma must be None or a float > 0, got -5"),
    "loss prediction type": (lambda: mmkern.diffusion.diffusion_loss(x4, x4, x4, 0, ac, "x0"), ValueError,
                             r"prediction_type must be one of epsilon, v_prediction, sample; got 'x0'"),
    "loss timestep range": (lambda: mmkern.diffusion.diffusion_loss(x4, x4, x4, torch.tensor([3, 10]), ac),
                            ValueError, r"timesteps must lie in \[0, 9\] .* got values in \[3, 10\]"),
    "loss timestep dtype": (lambda: mmkern.diffusion.diffusion_loss(x4, x4, x4, torch.tensor([1.0, 2.0]), ac),
                            ValueError, r"timesteps must have dtype int32, int64; got torch.float32"),
    "loss batch": (lambda: mmkern.diffusion.diffusion_loss(x4, x4, x4, torch.tensor([1, 2, 3]), ac), ValueError,
                   r"timesteps must be 0-d or \(batch,\) with batch = original_samples.shape\[0\]"),
    "loss model_output shape": (lambda: mmkern.diffusion.diffusion_loss(x4[:, :2], x4, x4, 0, ac), ValueError,
                                r"model_output must have the shape and dtype of original_samples"),
    "loss alphas 2-D": (lambda: mmkern.diffusion.diffusion_loss(x4, x4, x4, 0, ac.view(2, 5)), ValueError,
                        r"alphas_cumprod must have 1 dimensions, got shape \(2, 5\)"),
    "ddpm variance type": (lambda: mmkern.diffusion.ddpm_step(x4, 3, x4, ac, variance_type="fixed"), ValueError,
                           r"variance_type must be one of fixed_small, fixed_small_log, fixed_large, "
                           r"fixed_large_log, learned, learned_range; got 'fixed'"),
    "ddpm learned needs 2C": (lambda: mmkern.diffusion.ddpm_step(x4, 3, x4, ac, variance_type="learned"), ValueError,
                              r"variance_type 'learned' needs model_output of shape \(B, 2C, ...\)"),
    "ddpm prediction type": (lambda: mmkern.diffusion.ddpm_step(x4, 3, x4, ac, prediction_type="eps"), ValueError,
                             r"prediction_type must be one of epsilon, v_prediction, sample; got 'eps'"),
    "ddpm timestep range": (lambda: mmkern.diffusion.ddpm_step(x4, torch.tensor([0, 12]), x4, ac), ValueError,
                            r"timesteps must lie in \[0, 9\]"),
    "ddpm float timestep": (lambda: mmkern.diffusion.ddpm_step(x4, torch.tensor([1.0, 2.0]), x4, ac), ValueError,
                            r"timesteps must have dtype int32, int64; got torch.float32"),
    "ddpm batch": (lambda: mmkern.diffusion.ddpm_step(x4, torch.tensor([1, 2, 3]), x4, ac), ValueError,
                   r"timesteps must be 0-d or \(batch,\) with batch = sample.shape\[0\] = 2"),
    "ddim prev range": (lambda: mmkern.diffusion.ddim_step(x4, 3, x4, ac, 10), ValueError,
                        r"prev_timesteps must lie in <= 9"),
    "ddim eta": (lambda: mmkern.diffusion.ddim_step(x4, 3, x4, ac, 1, eta=-0.5, noise=x4), ValueError,
                 r"eta must be a float in \[0.0, inf\], got -0.5"),
    "ddim eta without noise": (lambda: mmkern.diffusion.ddim_step(x4, 3, x4, ac, 1, eta=0.5), ValueError,
                               r"eta = 0.5 > 0 needs noise"),
    "ddim threshold ratio": (lambda: mmkern.diffusion.ddim_step(x4, 3, x4, ac, 1, thresholding=True,
                                                                dynamic_thresholding_ratio=1.5), ValueError,
                             r"dynamic_thresholding_ratio must be a float in \[0.0, 1.0\], got 1.5"),
    "ddim noise shape": (lambda: mmkern.diffusion.ddim_step(x4, 3, x4, ac, 1, eta=1.0, noise=x4[:1]), ValueError,
                         r"noise must have the shape and dtype of sample"),
    "euler step index": (lambda: mmkern.diffusion.euler_step(x4, 9, x4, torch.linspace(1, 0, 10)), ValueError,
                         r"step_index must lie in \[0, 8\]"),
    "euler prediction type": (lambda: mmkern.diffusion.euler_step(x4, 0, x4, torch.linspace(1, 0, 10),
                                                                  prediction_type="flow"), ValueError,
                              r"prediction_type must be one of epsilon, v_prediction, sample, original_sample"),
    "euler sigmas 2-D": (lambda: mmkern.diffusion.euler_step(x4, 0, x4, torch.ones(2, 5)), ValueError,
                         r"sigmas must have 1 dimensions"),
    "schedule name": (lambda: mmkern.diffusion.NoiseSchedule(beta_schedule="cosine"), ValueError,
                      r"beta_schedule must be one of linear, scaled_linear, squaredcos_cap_v2, sigmoid"),
}
