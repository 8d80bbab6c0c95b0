"""Swap mmkern's ops into models people already have.

    import mmkern.integrations.transformers    # Hugging Face transformers: attention interface, apply_mmkern
    import mmkern.integrations.diffusers       # diffusers: MMKernAttnProcessor

Each module imports its library; nothing here is imported by `import mmkern`.
"""
