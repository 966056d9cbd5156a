"""Opt-in acceleration of other merge tools: each module's patch() swaps their merge methods
for fastmerge's kernels and unpatch() restores them (timm: ToMe token merging in ViT blocks).
Nothing is patched on import."""
