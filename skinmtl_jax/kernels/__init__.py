"""The CPU kernels of the convolutions: one optional backend, compiled C++ called through XLA FFI.

The rest of the package knows it through one function: `KernelConvolution(fallback, amx)`, a
`lax.conv_general_dilated` that computes the U-Net's convolutions and their gradients with the
kernels and everything else with `fallback`. `skinmtl_jax.models.conv.select` hands one to a
model when it is created on a CPU where the kernels loaded (`model.conv_impl='auto'`); GPUs,
`model.conv_impl='xla'` and installs without the kernels get XLA's convolution, and never
trace a call of them.

- `ffi.py`: loading the compiled library (`_conv2d`, from conv2d.cc, built by setup.py where
  a C++ compiler is present), checking it against the installed jaxlib's XLA FFI API, and the
  calls of each kernel. `available()` says whether the kernels loaded, `status()` why not,
  `amx_available()` whether the bfloat16 AMX kernels run on this CPU, `threads()` how many
  threads a call may use (SKINMTL_KERNEL_THREADS, else the CPUs this process may use, capped
  by its cgroup's CPU quota).
- `routing.py`: which kernel computes which part of which convolution (`routes`), and
  `KernelConvolution`.

Their results do not depend on the number of threads, on any OpenBLAS core type.
"""

from skinmtl_jax.kernels.ffi import (CONV, CONV_BF16, CONV_BF16_F32, CONV_BF16_WEIGHT_GRAD,
                                     CONV_BF16_WF32, INPUT_GRAD, WEIGHT_GRAD, WINOGRAD,
                                     WINOGRAD_WEIGHT_GRAD, amx_available, available,
                                     conv2d, conv2d_bf16, conv2d_bf16_weight_grad,
                                     conv2d_input_grad, conv2d_weight_grad, status, threads,
                                     winograd_conv3x3, winograd_conv3x3_weight_grad)
from skinmtl_jax.kernels.routing import KernelConvolution, routes

__all__ = ['CONV', 'CONV_BF16', 'CONV_BF16_F32', 'CONV_BF16_WEIGHT_GRAD', 'CONV_BF16_WF32',
           'INPUT_GRAD', 'KernelConvolution', 'WEIGHT_GRAD', 'WINOGRAD',
           'WINOGRAD_WEIGHT_GRAD', 'amx_available', 'available', 'conv2d', 'conv2d_bf16',
           'conv2d_bf16_weight_grad', 'conv2d_input_grad', 'conv2d_weight_grad', 'routes',
           'status', 'threads', 'winograd_conv3x3', 'winograd_conv3x3_weight_grad']
