"""The XLA:CPU flags the tests and their training subprocesses compile under.

Most tests spend their time compiling: less LLVM optimisation cuts their time by about a third
(the sharded-step, checkpoint and model tests: 324 s -> 231 s with -n 2) and changes nothing the
tests compare (every comparison is between runs under the same flags, or against PyTorch within
float32 tolerances). The demo test runs without these flags, as users do.

(Tried and not kept: `--xla_cpu_use_fusion_emitters=false` compiles the tiny sharded train step
in 23-26 s instead of 35-48 s, but saved only about 2 of 80 CPU-minutes over the whole suite, and
a program and its batched twin then differed in the last bits: test_segment's thresholded mask
flipped 5 of 2394 pixels.)
"""

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
