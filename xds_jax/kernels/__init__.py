"""xds-jax's own CPU kernels, XLA FFI handlers in C++ built on first use (``build``): where
XLA:CPU's generated code leaves speed behind. ``cpu_matmul``: few-row bfloat16, float32 and
int8 matmuls (AVX-512, AVX2, AMX tiles); ``cpu_attention``: decode and prefill attention over
the paged KV cache; ``cpu_swiglu``: SwiGLU's activation of the fused gate/up projection;
``materialize``: an operand computed once into memory rather than fused into each consumer
(RoPE's cos/sin). Each lowers to XLA's own computation where it does not apply."""
