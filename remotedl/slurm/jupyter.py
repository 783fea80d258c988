"""Jupyter as a batch job: the job's command (a constant)."""

from __future__ import annotations

# The address Jupyter binds on the node: the one its name resolves to (what the login node
# reaches), else the node's first address; never every interface, which would put Jupyter on
# whatever networks the node is on.
NODE_ADDRESS = r"""
_node=${SLURMD_NODENAME:-$(hostname)}
_addr=$(getent ahostsv4 "$_node" 2>/dev/null | awk 'NR == 1 { print $1 }')
[ -n "$_addr" ] || _addr=$(hostname -I 2>/dev/null | awk '{ print $1 }')
[ -n "$_addr" ] || {
  echo "remotedl: cannot tell the address of node $_node (its name does not resolve)" >&2; exit 1; }
"""

# The job's command (a constant; the token arrives as JUPYTER_TOKEN from the job's env file).
# It binds NODE_ADDRESS, picks a free port there, and writes "ADDRESS PORT APP NODE" to the
# control directory ($_rdl_ctl, set by the batch script) before Jupyter starts.
JUPYTER_COMMAND = (
    NODE_ADDRESS
    + r"""
_j=$(command -v jupyter) || {
  echo "remotedl: jupyter is not installed in the project's environment on $_node" >&2; exit 127; }
_py=$(command -v python3 || command -v python)
_port=$("$_py" -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$_addr") || exit 1
_app=server; "$_j" lab --version >/dev/null 2>&1 && _app=lab
_root=--ServerApp.allow_root=False; [ "$(id -u)" = 0 ] && _root=--allow-root
printf '%s %s %s %s\n' "$_addr" "$_port" "$_app" "$_node" > "$_rdl_ctl/jupyter"
exec "$_j" "$_app" --no-browser --ServerApp.ip="$_addr" --ServerApp.port="$_port" \
  --ServerApp.port_retries=0 --ServerApp.root_dir=. "$_root"
"""
)
