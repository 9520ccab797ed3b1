"""xds-jax's own CPU kernels, XLA FFI handlers in C++ built on first use (``build``): where
XLA:CPU's generated code leaves speed behind (``cpu_matmul``: few-row bfloat16 matmuls)."""
