"""How a run uses the hardware: precision (`auto`: bf16 autocast where the GPU or CPU has fast bf16), speed
(attention kernel, compiled decoder layers, whether prompt prefixes are shared), and sharding (FSDP2 / DeepSpeed
through accelerate, the gathered whole state for saving)."""
