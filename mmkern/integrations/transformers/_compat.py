"""What the installed transformers offers mmkern, and the name mmkern registers under.

    AttentionInterface   transformers >= 4.48: the pluggable attention function (ALL_ATTENTION_FUNCTIONS);
                         None before (then the integration cannot register)
    masking              transformers.masking_utils, >= 4.53: the mask functions and AttentionMaskInterface;
                         None before (models build their own 4D masks)
"""
from __future__ import annotations

import transformers  # noqa: F401  (ImportError here when transformers is missing: the integration needs it)

try:
    from transformers import AttentionInterface
except ImportError:  # transformers < 4.48: no pluggable attention
    AttentionInterface = None
try:
    from transformers import masking_utils as masking
except ImportError:  # transformers < 4.53: models build their own 4D masks
    masking = None

NAME = "mmkern"
