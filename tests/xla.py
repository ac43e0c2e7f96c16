"""The XLA:CPU flags the tests and their training subprocesses compile under.

Most tests spend their time compiling. Less LLVM optimisation cuts their time by about a third
(the sharded-step, checkpoint and model tests: 324 s -> 231 s with -n 2), and the CPU backend's
elemental fusion emitters instead of its MLIR ones compile the tiny sharded train step in 23-26 s
instead of 35-48 s (test_sharded_step: 218 -> 180 s). Neither changes what the tests compare:
every comparison is between runs under the same flags, or against PyTorch within float32
tolerances. The demo test runs without them, as users do.
"""

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
