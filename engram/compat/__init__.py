"""Compatibility with other Engram implementations' files: ``deepseek`` (DeepSeek's official demo)."""
