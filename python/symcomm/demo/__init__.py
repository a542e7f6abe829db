"""A tensor-parallel Llama demo (python -m symcomm.demo) and the single-driver RPC runner it uses."""
