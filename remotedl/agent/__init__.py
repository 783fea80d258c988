"""The code that runs on the box: job records, the GPU lock, the tmux runner, events.

Shipped by the client (this package and the stdlib-only modules it names), unpacked under
``~/.remotedl/agent/<digest>/`` and byte-compiled once, then run with the box's python3.
Standard library only. tmux is called through one small chokepoint (``runtimes.tmux._tmux``, argv only,
exact ``=name`` targets) rather than libtmux: importing libtmux costs ~75 ms on the box's
interpreter (its package loads the whole object model), paid by every request.
"""
