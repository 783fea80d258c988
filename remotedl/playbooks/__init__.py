"""Playbooks: YAML lists of named steps that make a box so, run over SSH (the channel).

A step::

    - name: tmux is installed          # required, unique in the playbook
      when: command -v apt-get         # optional: shell; the step is skipped unless it exits 0
      check: command -v tmux           # optional: shell; exit 0 means "already so": nothing to do
      run: apt-get install -y tmux     # optional: shell; makes it so (not run with --check)
      sudo: true                       # optional: check/run/commit/rollback through `sudo -n`
      report: true                     # optional: show the check's output (facts, versions)
      prove_login: "{{ test_port }}"   # optional: after run, log in again on this box port
      commit: ...                      #   ... with the same key and host key, to a server whose
      rollback: ...                    #   ... Banner shows "remotedl-proof {{ login_nonce }}";
                                       #   then commit, or (also if run failed) rollback and fail

A step with ``run`` is ``changed`` when its check failed and run made the check pass (re-checked),
``ok`` when the check passed, ``skipped`` when ``when`` failed, ``failed`` otherwise; a failed
step stops the playbook. A step with only ``check`` is a test: ok or failed. Variables
(``{{ name }}``) come from the playbook's ``vars``, then ``[playbook_vars]`` in the project
config, then ``--var NAME=VALUE``. They are data: a script gets them as shell variables from
its positional parameters, and ``{{ name }}`` is a quoted reference to one (``template``).

The package: ``book`` (load, find, origin), ``template`` (variables as data), ``execute``
(``run_playbook``, the box's built-in variables), ``login`` (the login proof). Every name is
importable from ``remotedl.playbooks``. The shipped YAML playbooks live in the top-level
``playbooks/`` folder of the source tree and install as ``remotedl/playbooks/shipped/``.
"""

from __future__ import annotations

from remotedl.playbooks.book import (
    STEP_KEYS,
    TOP_KEYS,
    Origin,
    Playbook,
    Step,
    find,
    load,
    origin,
    risky_project_playbooks,
    shipped_dir,
)
from remotedl.playbooks.execute import (
    _READ,
    BoxFacts,
    PlaybookResult,
    Prove,
    StepEvent,
    StepResult,
    box_facts,
    run_playbook,
)
from remotedl.playbooks.login import login_prover
from remotedl.playbooks.template import Script, check_vars, pack, substitute, template

__all__ = [
    "STEP_KEYS",
    "TOP_KEYS",
    "_READ",
    "BoxFacts",
    "Origin",
    "Playbook",
    "PlaybookResult",
    "Prove",
    "Script",
    "Step",
    "StepEvent",
    "StepResult",
    "box_facts",
    "check_vars",
    "find",
    "load",
    "login_prover",
    "origin",
    "pack",
    "risky_project_playbooks",
    "run_playbook",
    "shipped_dir",
    "substitute",
    "template",
]
