"""Handing adapters and models to other tools (docs/merge.md): a LoRA adapter as a llama.cpp GGUF adapter
(`gguf_adapter`), a model folder as a GGUF model through llama.cpp's converter (`gguf_model`), and which of HF PEFT,
vLLM, llama.cpp and TGI can load an adapter (`portability`, behind `peftkit check`)."""
