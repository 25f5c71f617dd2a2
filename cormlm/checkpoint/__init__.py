"""Reading and writing checkpoints: hub ids, config.json, safetensors and GGUF tensors,
tokenizers, the embedded model and the real one (SmolLM2). Models and caches never import
this package; it builds them."""
