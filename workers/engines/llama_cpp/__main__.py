import sys

from workers.engines.llama_cpp.engine import self_check

if sys.argv[1:] != ["--self-check"]:
    sys.exit("usage: python -m workers.engines.llama_cpp --self-check")
self_check()
