"""The code that runs on the box: job records, the GPU lock, the tmux runner.

Shipped by the client (this package, ``remotedl.gpus`` and libtmux), unpacked under
``~/.remotedl/agent/<digest>/`` and byte-compiled once, then run with the box's python3.
Standard library plus libtmux only; libtmux is imported only by the operations that need tmux.
"""
