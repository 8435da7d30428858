"""The ABI version of the compiled modules' bindings (csrc/bindings.h), the one place it is written.

CMakeLists.txt reads this file and compiles the number into zo_kernels._C and zo_kernels._C_cuda
(``ZO_ABI_VERSION``); :func:`zo_kernels.kernels.native.load_extension` refuses a module that reports
another one (a stale build). Bump it whenever an operation's arguments change.
"""

#: Read by CMakeLists.txt with a regular expression: keep it ``ABI_VERSION = <int>`` on one line.
ABI_VERSION = 4
