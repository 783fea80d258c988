"""The code that runs on the box: job records, the GPU lock, the tmux runner.

Shipped by the client as one zip (this package, ``remotedl.gpus`` and libtmux), stored
under ``~/.remotedl/agent/<hash>.pyz`` and run with the box's python3. Standard library
plus libtmux only; libtmux is imported only by the operations that need tmux.
"""
