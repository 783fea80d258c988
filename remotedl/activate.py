"""The shell function that enters a project's environment on the box or a Slurm node.

Standard library only: it travels in the agent (``remotedl.agent.envsync`` and ``remotedl.slurm``
build their job scripts with it) and the laptop's ``doctor`` sends it to check what jobs will use.
"""

# Defines _rdl_activate: the project's environment, as jobs, environment syncs and doctor use it:
# the job's .venv or remote_dir's, or a conda environment, then env_setup.
# Reads _rdl_jd (the job's directory, or empty), _rdl_rd (remote_dir), _rdl_conda, _rdl_setup.
ACTIVATE = r"""
_rdl_find_conda() {
  _rdl_cb=
  for _rdl_b in "${CONDA_EXE:+${CONDA_EXE%/bin/conda}}" \
      "$(command -v conda 2>/dev/null | sed -e 's,/bin/conda$,,' -e 's,/condabin/conda$,,')" \
      "$HOME/miniforge3" "$HOME/miniconda3" "$HOME/anaconda3" "$HOME/mambaforge" /opt/conda; do
    if [ -n "$_rdl_b" ] && [ -f "$_rdl_b/etc/profile.d/conda.sh" ]; then _rdl_cb=$_rdl_b; break; fi
  done
  if [ -z "$_rdl_cb" ]; then
    echo "remotedl: conda is not installed on this machine (looked at \$CONDA_EXE, conda on PATH," \
      "~/miniforge3, ~/miniconda3, ~/anaconda3, ~/mambaforge, /opt/conda)" >&2
    return 1
  fi
}
_rdl_activate() {
  if [ -n "$_rdl_conda" ]; then
    _rdl_find_conda || return 1
    . "$_rdl_cb/etc/profile.d/conda.sh" || return 1
    conda activate "$_rdl_conda" || {
      echo "remotedl: could not activate the conda environment '$_rdl_conda'" >&2; return 1; }
  else
    for _rdl_v in "${_rdl_jd:+$_rdl_jd/.venv}" "${_rdl_rd:+$_rdl_rd/.venv}"; do
      if [ -n "$_rdl_v" ] && [ -x "$_rdl_v/bin/python" ]; then
        VIRTUAL_ENV=$_rdl_v; PATH="$_rdl_v/bin:$PATH"; export VIRTUAL_ENV PATH; unset PYTHONHOME
        break
      fi
    done
  fi
  if [ -n "$_rdl_setup" ]; then
    eval "$_rdl_setup" || { echo "remotedl: env_setup failed: $_rdl_setup" >&2; return 1; }
  fi
  return 0
}
"""
