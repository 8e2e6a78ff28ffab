"""Token corpora (Megatron indexed format), packed sampling, blending, loaders."""
