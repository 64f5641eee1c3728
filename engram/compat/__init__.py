"""Compatibility with other Engram implementations: ``deepseek`` (DeepSeek's official demo weights) and
``qwen4exp`` (Qwen4-Exp's PLE hashing)."""
