"""Checks of the GPU kernels: compiling the Triton kernels for sm_80/sm_90 without a GPU
(``python -m tools.gpu.triton_compile_check``), running the CUDA kernels under a host emulation
(``python tools/gpu/cuda_emu/check.py``), and the one-command check on a GPU machine
(``bash tools/gpu/gpu_check.sh``). The GPU timings themselves are a benchmark: bench/gpu_bench.py.
"""
