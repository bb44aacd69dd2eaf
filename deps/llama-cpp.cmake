# llama.cpp's build flags, in one place: the project's llama-cpp-python build (the Makefile
# passes this file in CMAKE_ARGS as `-C deps/llama-cpp.cmake`) and the bench's own
# llama-server build (bench/llama_server.py: `cmake -C deps/llama-cpp.cmake`) both read it.
#
# No AMX: llama.cpp builds for the CPU it is built on (-march=native), and on CPUs with AMX its
# AMX matmul faults in this sandbox on the first decode (the kernel grants the tile state, the
# instructions fault: SIGILL or SIGSEGV). GCC honours -mno-amx-* over -march=native, whatever
# their order.
set(CMAKE_C_FLAGS "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CACHE STRING "tokenwire: no AMX")
set(CMAKE_CXX_FLAGS "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CACHE STRING "tokenwire: no AMX")
# Text features only: llama-cpp-python's multimodal library (llava/mtmd) is not used, and
# skipping it halves the build (11 min -> 6 min on 2 cores). llama-server ignores this option.
set(LLAVA_BUILD OFF CACHE BOOL "tokenwire: no multimodal library")
