"""The container images on a box (``remotedl images``): what its engine (docker or podman, as
jobs in an image find it) holds, one script over the box's ssh connection."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from remotedl.errors import RemoteError, UsageError
from remotedl.ssh import Box
from remotedl.ssh.channel import parse_marks

# The engine a job in an image finds when none is asked for (``agent.runtimes.container.find_engine``,
# the same rule in sh): docker where it reaches its daemon as this user (DOCKER_HOST or a docker
# context set, or the default socket open to the user), else podman, else docker.
PICK_ENGINE = r"""
pick_engine() {
  command -v docker >/dev/null 2>&1 || { command -v podman >/dev/null 2>&1 && echo podman; return; }
  if [ -n "${DOCKER_HOST-}" ] || [ -d "$HOME/.docker/contexts" ] || ! command -v podman >/dev/null 2>&1 ||
     { [ -r /var/run/docker.sock ] && [ -w /var/run/docker.sock ]; }; then
    echo docker
  else
    echo podman
  fi
}
"""

# "$1": the engine asked for (or ""). The engine's own JSON lines, one per image.
_LIST = PICK_ENGINE + r"""
E=$1
[ -n "$E" ] || E=$(pick_engine)
if [ -z "$E" ] || ! command -v "$E" >/dev/null 2>&1; then echo "@@engine none"; exit 0; fi
echo "@@engine $E"
# One JSON object a line from both engines (podman's '{{json .}}' is one array over lines).
f='{"Repository":{{json .Repository}},"Tag":{{json .Tag}},"ID":{{json .ID}},"Size":{{json .Size}}'
if ! out=$("$E" images --format "$f"',"CreatedSince":{{json .CreatedSince}}}' 2>&1); then
  echo "@@error $(printf '%s\n' "$out" | tail -n 1)"; exit 0
fi
echo "@@images"
printf '%s\n' "$out"
"""


@dataclass
class Image:
    name: str  # repository:tag, or <none>
    id: str
    size: str  # as the engine says it (1.2GB)
    created: str  # as the engine says it (2 weeks ago)


@dataclass
class BoxImages:
    engine: str
    images: list[Image] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _image(row: dict[str, Any]) -> Image:
    repo, tag = str(row.get("Repository") or "<none>"), str(row.get("Tag") or "<none>")
    return Image(
        name=f"{repo}:{tag}",
        id=str(row.get("ID") or "")[:19],
        size=str(row.get("Size") or ""),
        created=str(row.get("CreatedSince") or ""),
    )


def same_image(wanted: str, name: str) -> bool:
    """Whether ``name`` as the engine lists it is the image a user wrote as ``wanted``
    (``ubuntu:22.04`` is docker.io/library/ubuntu:22.04 to Podman, an image made on the box
    localhost/NAME)."""

    def short(n: str) -> str:
        for prefix in ("docker.io/library/", "docker.io/", "localhost/"):
            if n.startswith(prefix):
                return n[len(prefix) :]
        return n

    return short(wanted) == short(name)


def list_images(box: Box, engine: str | None = None) -> BoxImages:
    """The images the box's engine holds; raises when there is none or it does not answer."""
    out = box.run(_LIST, engine or "", check=False).stdout
    marks = parse_marks(out)
    found = marks.get("engine", "").strip()
    if not found or found == "none":
        raise UsageError(
            f"{engine or 'docker or podman'} is not installed on {box.spec.alias}",
            hint="`remotedl setup docker` installs one",
        )
    if "error" in marks:
        raise RemoteError(
            f"{found.rsplit('/', 1)[-1]} on {box.spec.alias} does not answer: {marks['error'].strip()}",
            hint="`remotedl doctor` checks the engine (the docker group, a stopped daemon)",
        )
    images = []
    rows = out.split("@@images\n", 1)[1] if "@@images\n" in out else ""
    for line in rows.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            images.append(_image(row))
    return BoxImages(found, images)
