"""ftjax: FlowTracer token-level credit assignment for RL of language models, in JAX."""

__version__ = "0.1.0"
