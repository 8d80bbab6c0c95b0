"""A tiny text-to-image diffusion model whose every attention and norm runs on mmkern's ops.

    from mmkern.models import TinyText2Image
    model = TinyText2Image(captions=["a red square", "a blue circle"])
    loss = model.loss(images, captions)                 # images (B, 3, 16, 16) in [-1, 1]
    images = model.sample(["a red square"], steps=25)   # DDIM with classifier-free guidance

One concept per file:
    tokenizer.py     WordTokenizer: a word-level vocabulary over the captions (no downloads)
    text_encoder.py  TextEncoder: a small BERT-style (post-norm) transformer over the caption tokens
    denoiser.py      DiTDenoiser: a DiT with adaLN-Zero (mmkern.layer_norm_residual(modulation=...))
                     and cross-attention to the text tokens
    text2image.py    TinyText2Image: both, with mmkern's noise schedule for training (add_noise,
                     diffusion_loss) and DDIM sampling with mmkern.diffusion.ddim_step
Nothing here needs transformers or diffusers. examples/train_tiny_text2image.py trains it.
"""
from mmkern.models.tokenizer import WordTokenizer
from mmkern.models.text_encoder import TextEncoder
from mmkern.models.denoiser import DiTDenoiser
from mmkern.models.text2image import TinyText2Image

__all__ = ["WordTokenizer", "TextEncoder", "DiTDenoiser", "TinyText2Image"]
