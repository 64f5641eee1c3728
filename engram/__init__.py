"""engram: conditional memory (DeepSeek Engram) for PyTorch language models."""
