"""Weight interchange with diffusers / transformers (PyTorch and safetensors)."""
