"""Loading playbooks: the YAML read and checked into ``Playbook``/``Step``, found by name (the
project's ``playbooks/`` first, then remotedl's), and where one comes from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotedl.errors import ConfigError, UsageError
from remotedl.playbooks.template import template

STEP_KEYS = {"name", "when", "check", "run", "sudo", "report", "prove_login", "commit", "rollback"}


TOP_KEYS = {"name", "description", "vars", "steps"}


@dataclass
class Step:
    name: str
    line: int
    when: str | None = None
    check: str | None = None
    run: str | None = None
    sudo: bool = False
    report: bool = False
    prove_login: str | None = None
    commit: str | None = None
    rollback: str | None = None


@dataclass
class Playbook:
    name: str
    path: Path
    description: str
    vars: dict[str, str]
    steps: list[Step]


def _err(path: Path, node: Any, message: str) -> ConfigError:
    line = node.start_mark.line + 1 if node is not None else 1
    return ConfigError(f"{path}:{line}: {message}", hint="see README 'Playbooks' for the format")


def _scalar(path: Path, node: Any, what: str) -> str:
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        raise _err(path, node, f"{what} must be a string")
    return str(node.value)


def _bool(path: Path, node: Any, what: str) -> bool:
    value = _scalar(path, node, what).lower()
    if value not in ("true", "false", "yes", "no"):
        raise _err(path, node, f"{what} must be true or false")
    return value in ("true", "yes")


def load(path: Path) -> Playbook:
    """Parse and validate a playbook; every error names the file and line."""
    import yaml

    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except OSError as e:
        raise ConfigError(f"cannot read playbook {path}: {e.strerror}") from e
    if not isinstance(root, yaml.MappingNode):
        raise _err(path, root, "a playbook is a mapping with 'steps'")
    top = {k.value: (k, v) for k, v in root.value}
    for key, (knode, _) in top.items():
        if key not in TOP_KEYS:
            raise _err(path, knode, f"unknown key '{key}' (known: {', '.join(sorted(TOP_KEYS))})")
    if "steps" not in top:
        raise _err(path, root, "no 'steps'")
    variables: dict[str, str] = {}
    if "vars" in top:
        vnode = top["vars"][1]
        if not isinstance(vnode, yaml.MappingNode):
            raise _err(path, vnode, "'vars' must be a mapping")
        for k, v in vnode.value:
            variables[str(k.value)] = _scalar(path, v, f"var {k.value}")
    snode = top["steps"][1]
    if not isinstance(snode, yaml.SequenceNode) or not snode.value:
        raise _err(path, snode, "'steps' must be a non-empty list")
    steps: list[Step] = []
    names: set[str] = set()
    for item in snode.value:
        if not isinstance(item, yaml.MappingNode):
            raise _err(path, item, "each step is a mapping with at least 'name'")
        fields = {k.value: (k, v) for k, v in item.value}
        for key, (knode, _) in fields.items():
            if key not in STEP_KEYS:
                raise _err(
                    path, knode, f"unknown key '{key}' in a step (known: {', '.join(sorted(STEP_KEYS))})"
                )
        if "name" not in fields:
            raise _err(path, item, "a step needs a 'name'")
        step = Step(_scalar(path, fields["name"][1], "name"), item.start_mark.line + 1)
        if step.name in names:
            raise _err(path, fields["name"][1], f"two steps are called '{step.name}'")
        names.add(step.name)
        for key in ("when", "check", "run", "prove_login", "commit", "rollback"):
            if key in fields:
                vnode = fields[key][1]
                setattr(step, key, _scalar(path, vnode, key))
                if key != "prove_login":  # shell: every {{ name }} must stand where it expands
                    block = 1 if getattr(vnode, "style", None) in ("|", ">") else 0
                    template(getattr(step, key), str(path), vnode.start_mark.line + 1 + block)
        for key in ("sudo", "report"):
            if key in fields:
                setattr(step, key, _bool(path, fields[key][1], key))
        if step.check is None and step.run is None:
            raise _err(path, item, f"step '{step.name}' has neither 'check' nor 'run'")
        if step.prove_login and not (step.run and step.commit and step.rollback):
            raise _err(path, item, f"step '{step.name}': prove_login needs run, commit and rollback")
        steps.append(step)
    name = _scalar(path, top["name"][1], "name") if "name" in top else path.stem
    desc = _scalar(path, top["description"][1], "description") if "description" in top else ""
    return Playbook(name, path, desc, variables, steps)


def shipped_dir() -> Path:
    """The playbooks that come with remotedl (installed package, or the source tree)."""
    here = Path(__file__).resolve().parent  # remotedl/playbooks/
    # Installed: remotedl/playbooks/shipped/ (pyproject maps the top-level playbooks/ there);
    # the source tree: playbooks/ beside the remotedl/ package.
    for candidate in (here / "shipped", here.parent.parent / "playbooks"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return here / "shipped"


def find(name: str, project_root: Path) -> Path:
    """A playbook by file path, or by name: the project's playbooks/ first, then remotedl's."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and (project_root / p).is_file():
        return project_root / p
    if p.is_absolute() and p.is_file():
        return p
    for d in (project_root / "playbooks", shipped_dir()):
        for ext in (".yaml", ".yml"):
            if (d / f"{name}{ext}").is_file():
                return d / f"{name}{ext}"
    known = sorted(
        {q.stem for d in (project_root / "playbooks", shipped_dir()) if d.is_dir() for q in d.glob("*.y*ml")}
    )
    raise UsageError(f"no playbook '{name}'", hint=f"available: {', '.join(known) or 'none'}")


@dataclass(frozen=True)
class Origin:
    """Whose playbook a file is, and why running it needs ``remotedl allow`` ("" when not)."""

    whose: str  # "project", "shipped" or "yours" (a file outside the project the user named)
    needs_allow: str


def origin(book: Playbook, project_root: Path) -> Origin:
    """A project's playbook is the project author's code run on the box as the user: one that
    takes the name of a shipped playbook (``setup base`` would run it instead) or runs steps as
    root needs the user's ``allow``."""
    path = book.path.resolve()
    if path.parent == shipped_dir().resolve():
        return Origin("shipped", "")
    if not path.is_relative_to(project_root.resolve()):
        return Origin("yours", "")
    why = []
    if any((shipped_dir() / f"{path.stem}{ext}").is_file() for ext in (".yaml", ".yml")):
        why.append(f"it replaces the shipped playbook '{path.stem}'")
    if any(step.sudo for step in book.steps):
        why.append("it runs steps as root (sudo: true)")
    return Origin("project", " and ".join(why))


def risky_project_playbooks(project_root: Path) -> list[Path]:
    """The project's playbooks (``playbooks/``) that need ``allow``, sorted; one that does not
    parse runs nothing and is left out."""
    d = project_root / "playbooks"
    out = []
    for path in sorted(d.glob("*.y*ml")) if d.is_dir() else []:
        try:
            book = load(path)
        except ConfigError:
            continue
        if origin(book, project_root).needs_allow:
            out.append(path)
    return out
