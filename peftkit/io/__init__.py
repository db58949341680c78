"""Files in and out: filesystem safety (`fs`), adapter folders (`adapters`), model loading (`models`), the GGUF
conversion (`gguf`) and safetensors checkpoints read and written tensor by tensor (`checkpoint`)."""
