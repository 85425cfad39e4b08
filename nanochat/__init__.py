"""nanochat: a minimal, hackable, full-stack ChatGPT-like LLM harness."""
__version__ = "0.1.0"
