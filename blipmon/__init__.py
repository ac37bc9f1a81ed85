"""blipmon: a memory profiler for loading and fine-tuning vision-language models."""

__version__ = "0.1.0"
