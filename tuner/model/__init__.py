"""What a model is: GGUF metadata, synthetic models, the real reference model."""
