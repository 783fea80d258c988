"""The code: sent as a git pack (or by ``git push``) and checked out in the box's work tree in one
round trip, never over a box edit, never left half-updated; the data listing that comes back
with it; what this machine remembers of the box's tree; one push at a time."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from remotedl import proc
from remotedl.errors import RemotedlError, RemoteError
from remotedl.rsync import ProgressFn
from remotedl.ssh.channel import Box, parse_marks
from remotedl.ssh.openssh import control_dir, openssh_failure, ssh_command_string
from remotedl.ssh.resolve import HostSpec
from remotedl.sync.common import PACK_IN_MEMORY, PUSHED_REF, _stage

# ------------------------------------------------------------------ code: push and check out

# "$1": the work tree, "$2": the commit to check out, "$3": 1 to overwrite box edits, "$4": the
# project's identity (the tree must be this project's), "$5": empty, or a commit the box has, and
# then a pack of "$2"'s objects over it follows on stdin ("$6" objects): one round trip sends and
# checks out (without it, `git push` has sent them).
# A box file is in the way only if its content differs from what the push would write there:
#   conflicts = (DN & DH) | (DN & added) | (DH & deleted)
# DH: tracked files whose box content differs from HEAD (`git status`); DN: files of the new
# commit whose box content differs from it; added/deleted: what the new commit adds to or
# removes from HEAD. When the box is clean and no added path exists there (the usual push),
# there can be none, and DN is not computed. Both diffs reuse the box index's stat cache, so
# only changed files are hashed, and untracked files elsewhere on the box cost nothing. Paths
# are compared as git quotes them.
_CHECKOUT = r"""
set -e
trap '' HUP PIPE  # a dropped connection must not stop a checkout half-way
{ cd -- "$1" && [ -d .git ]; } 2>/dev/null || { echo "@@gone"; exit 0; }
new=$2
have=$(git config --get remotedl.project 2>/dev/null || true)
if [ -n "$4" ] && [ "$have" != "$4" ]; then
  if [ -n "$have" ]; then echo "@@other $have"; else echo "@@gone"; fi; exit 0  # unclaimed: prepare
fi
if command -v flock >/dev/null 2>&1; then exec 9<.git; flock -w 300 9 || true; fi
# Files arrive as the laptop has them (Git LFS content included): no Git LFS filter of the
# box's git rewrites them (one would fetch pointers from a server the box cannot reach).
if [ "$(git config --local --get filter.lfs.required 2>/dev/null)" != false ]; then
  for k in process clean smudge; do git config "filter.lfs.$k" ""; done
  git config filter.lfs.required false
fi
if [ -n "$5" ]; then
  # The new commit's objects follow on stdin, as a pack over "$5", a commit the box has.
  git cat-file -e "$5^{commit}" 2>/dev/null || { echo "@@needpush"; exit 0; }
  # (index-pack has no -q; whatever goes wrong here, `git push` sends the objects instead.)
  if [ "$6" -lt 100 ]; then git unpack-objects -q 2>/dev/null || true
  else git index-pack --stdin --fix-thin >/dev/null 2>&1 || true; fi
  git cat-file -e "$new^{commit}" 2>/dev/null || { echo "@@needpush"; exit 0; }
  git update-ref refs/remotedl/pushed "$new"
  nohup git gc --auto -q </dev/null >/dev/null 2>&1 9<&- &
else
  git cat-file -e "$new^{commit}" 2>/dev/null || { echo "@@needpush"; exit 0; }
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/remotedl-checkout.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
head=$(git rev-parse -q --verify HEAD 2>/dev/null || echo none)
pending=$(git rev-parse -q --verify refs/remotedl/checkout 2>/dev/null || true)
git status --porcelain --untracked-files=no --no-renames >"$tmp/st"
if [ "$head" = "$new" ] && [ -z "$pending" ] && [ ! -s "$tmp/st" ]; then
  echo "@@unchanged"; exit 0
fi
if [ "$3" != 1 ]; then
  { grep -v -e '^.D ' -e '^D  ' "$tmp/st" || true; } | cut -c4- >"$tmp/dh_m"
  if [ "$head" != none ]; then
    git diff --name-only -z --no-renames --diff-filter=A "$head" "$new" -- >"$tmp/add0"
  else
    git ls-tree -r -z --name-only "$new" >"$tmp/add0"
  fi
  in_way=$(xargs -0 sh -c 'for p; do if [ -e "$p" ] || [ -L "$p" ]; then echo y; exit; fi; done' sh \
    <"$tmp/add0")
  if [ -s "$tmp/dh_m" ] || [ -n "$in_way" ]; then
    tab=$(printf '\t')
    if [ "$head" != none ]; then
      git diff --name-status --no-renames "$head" "$new" -- >"$tmp/sw"
    else
      git ls-tree -r --name-only "$new" | sed "s/^/A$tab/" >"$tmp/sw"
    fi
    if [ -f .git/index ]; then cp -p .git/index "$tmp/index"; fi
    GIT_INDEX_FILE=$tmp/index git read-tree -m "$new" 2>/dev/null \
      || GIT_INDEX_FILE=$tmp/index git read-tree "$new"
    GIT_INDEX_FILE=$tmp/index git update-index -q --refresh >/dev/null 2>&1 || true
    GIT_INDEX_FILE=$tmp/index git diff-files --name-status >"$tmp/dn"
    { grep -v '^D' "$tmp/dn" || true; } | cut -f2- >"$tmp/dn_m"
    { grep '^A' "$tmp/sw" || true; } | cut -f2- >"$tmp/add"
    { grep '^D' "$tmp/sw" || true; } | cut -f2- >"$tmp/del"
    {
      grep -Fxf "$tmp/dh_m" "$tmp/dn_m" || true
      grep -Fxf "$tmp/add" "$tmp/dn_m" || true
      grep -Fxf "$tmp/del" "$tmp/dh_m" || true
    } | sort -u >"$tmp/c"
    if [ -n "$pending" ] && [ -s "$tmp/c" ]; then
      # A checkout of ours was cut: the files it was writing are ours, whatever they hold now.
      if [ "$head" != none ]; then git diff --name-only --no-renames "$head" "$pending" --
      else git ls-tree -r --name-only "$pending"; fi >"$tmp/ours"
      { grep -vFxf "$tmp/ours" "$tmp/c" || true; } >"$tmp/c2"
      mv -- "$tmp/c2" "$tmp/c"
    fi
    if [ -s "$tmp/c" ]; then echo "@@dirty"; cat -- "$tmp/c"; exit 0; fi
  fi
fi
git update-ref refs/remotedl/checkout "$new"
if git checkout -q -f --detach "$new" 2>"$tmp/err"; then
  git update-ref -d refs/remotedl/checkout
  echo "@@changed"; exit 0
fi
# Failed half-way (a full disk...): what it added goes, the rest goes back to the old commit.
if [ "$head" != none ]; then
  git diff --name-only -z --no-renames --diff-filter=A "$head" "$new" -- | xargs -0 rm -f --
  git checkout -q -f --detach "$head" 2>/dev/null && git update-ref -d refs/remotedl/checkout \
    && echo "@@rolledback" || true
else
  git ls-tree -r -z --name-only "$new" | xargs -0 rm -f --
  git update-ref -d refs/remotedl/checkout && echo "@@rolledback" || true
fi
echo "@@failed"; head -n 3 -- "$tmp/err"
"""


LISTING_CAP = 8_000_000  # bytes of listing; past it, rsync decides (a huge data tree)

# The same checkout, then (in the same round trip) a listing of the data paths under "$1":
# "$7" is a token naming the listing's start, "$8"...: the data paths relative to "$1". From it
# the laptop decides whether rsync has anything to send (``_unchanged``). GNU find's -printf
# only: elsewhere no listing comes, and rsync decides as before.
_CHECKOUT_AND_LIST = (
    "_rdl_checkout() {\n"
    + _CHECKOUT
    + r"""}
( _rdl_checkout "$@" ) || exit $?
d=$1; tok=$7; shift 7
cd -- "$d" 2>/dev/null || exit 0
find --version >/dev/null 2>&1 || exit 0
printf '\n@@list %s\n' "$tok"
find "$@" -printf '%y %m %s %T@ %p\0%l\0' 2>/dev/null | head -c {cap}
""".replace("{cap}", str(LISTING_CAP))
)


def _split_listing(stdout: bytes, token: str) -> tuple[str, bytes | None]:
    """(the checkout's answer, the listing or None when none came)."""
    marker = f"\n@@list {token}\n".encode()
    at = stdout.find(marker)
    if at < 0:
        return stdout.decode(errors="replace"), None
    return stdout[:at].decode(errors="replace"), stdout[at + len(marker) :]


Entry = tuple[str, str, int, int, str]  # type (find's %y), mode (octal), size, mtime in ns, link


def parse_listing(raw: bytes) -> dict[str, Entry] | None:
    """The box's entries by path, or None if the listing was cut (too big) or unreadable."""
    if len(raw) >= LISTING_CAP or (raw and not raw.endswith(b"\0")):
        return None
    parts = raw.split(b"\0")[:-1]
    if len(parts) % 2:
        return None
    out: dict[str, Entry] = {}
    try:
        for head, link in zip(parts[0::2], parts[1::2], strict=True):
            kind, mode, size, mtime, path = head.split(b" ", 4)
            sec, _, frac = mtime.decode().partition(".")
            ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
            out[os.fsdecode(path)] = (kind.decode(), mode.decode(), int(size), ns, os.fsdecode(link))
    except ValueError:
        return None
    return out


def _entry(st: os.stat_result, path: str) -> Entry | None:
    import stat

    mode = format(stat.S_IMODE(st.st_mode), "o")
    if stat.S_ISREG(st.st_mode):
        return ("f", mode, st.st_size, st.st_mtime_ns, "")
    if stat.S_ISDIR(st.st_mode):
        return ("d", mode, 0, 0, "")
    if stat.S_ISLNK(st.st_mode):
        return ("l", mode, 0, 0, os.readlink(path))
    return None  # a fifo, socket or device: rsync decides


def _same(here: Entry, there: Entry) -> bool:
    kind, mode, size, mtime, link = here
    if kind != there[0]:
        return False
    if kind == "f":
        return (mode, size, mtime) == there[1:4]
    if kind == "d":
        return mode == there[1]
    return link == there[4]


def _unchanged(root: Path, rel: str, box: dict[str, Entry], limit: int = 200_000) -> bool:
    """Whether rsync -a of ``rel`` would find nothing to send: every file here is on the box
    with the same type, mode, size and modification time (to the nanosecond: rsync's quick
    check, stricter), every link with the same target. Any doubt: False (rsync decides)."""
    top = root / rel
    try:
        linked_dir = top.is_symlink() and top.is_dir()  # followed at the top, as push sends it
        first = _entry(top.stat() if linked_dir else top.lstat(), str(top))
        if first is None or not _same(first, box.get(rel, ("", "", 0, 0, ""))):
            return False
        if first[0] != "d":
            return True
        stack = [(str(top), rel)]
        seen = 0
        while stack:
            here, name = stack.pop()
            with os.scandir(here) as it:
                for e in it:
                    seen += 1
                    if seen > limit:
                        return False
                    path = f"{name}/{e.name}"
                    mine = _entry(e.stat(follow_symlinks=False), e.path)
                    if mine is None or not _same(mine, box.get(path, ("", "", 0, 0, ""))):
                        return False
                    if mine[0] == "d":
                        stack.append((e.path, path))
    except OSError:
        return False
    return True


def startup_noise_error(box: Box, tool: str) -> RemoteError:
    """git and rsync speak a protocol over the session: start-up output breaks it."""
    from remotedl.shells import noise_advice

    where, fix = noise_advice(box.login_shell)
    first = box.noise.splitlines()[0][:60] if box.noise else ""
    return RemoteError(
        f"{tool} cannot work with {box.spec.alias}: its shell start-up files print "
        f"({first!r}) for non-interactive logins, which breaks {tool}'s protocol",
        hint=f"make {where} quiet unless the shell is interactive: {fix}",
    )


def unquote_git_path(name: str) -> str:
    """A path as git prints it (C-quoted when it holds odd bytes) back to the path."""
    if not (len(name) >= 2 and name[0] == '"' and name[-1] == '"'):
        return name
    raw = bytearray()
    body = name[1:-1].encode("utf-8", "surrogateescape")
    i = 0
    simple = {
        ord("n"): 10,
        ord("t"): 9,
        ord("r"): 13,
        ord("a"): 7,
        ord("b"): 8,
        ord("f"): 12,
        ord("v"): 11,
        ord("\\"): 92,
        ord('"'): 34,
    }
    while i < len(body):
        c = body[i]
        if c == 92 and i + 1 < len(body):
            n = body[i + 1]
            if n in simple:
                raw.append(simple[n])
                i += 2
                continue
            if 48 <= n <= 55 and i + 3 < len(body):
                raw.append(int(body[i + 1 : i + 4], 8))
                i += 4
                continue
        raw.append(c)
        i += 1
    return raw.decode("utf-8", "replace")


def _git_push(box: Box, root: Path, abs_dir: str, commit: str) -> None:
    spec = box.spec
    env = {**os.environ, "GIT_SSH_COMMAND": ssh_command_string(spec), "GIT_SSH_VARIANT": "ssh"}
    url = f"ssh://{spec.alias}{abs_dir}"
    argv = ["git", "-C", str(root), "push", "-q", "--no-verify", url, f"+{commit}:{PUSHED_REF}"]
    shallow = proc.run(["git", "-C", str(root), "rev-parse", "--is-shallow-repository"], check=False)
    if shallow.stdout.strip() == "true":
        # A shallow clone (`git clone --depth N`): the box takes its history as shallow as it
        # is here, where receive-pack would refuse it ("shallow update not allowed").
        argv[4:4] = ["--receive-pack=git -c receive.shallowUpdate=true receive-pack"]
    for attempt in range(3):
        result = proc.run(argv, env=env, check=False)
        if result.returncode == 0:
            return
        if "Could not read from remote repository" in result.stderr:
            raise openssh_failure(spec, result.stderr)
        # Another laptop's push moved the same ref at this moment: take turns.
        if "lock" in result.stderr and attempt < 2:
            time.sleep(0.2 * (attempt + 1))
            continue
        break
    raise RemotedlError(f"git push to {spec.alias} failed: {result.stderr.strip()}")


def _checkout(
    box: Box,
    abs_dir: str,
    commit: str,
    *,
    force: bool,
    ident: str,
    pack: tuple[str, int, bytes] | None = None,
    listing: Sequence[str] = (),
    listed: dict[str, dict[str, Entry] | None] | None = None,
) -> dict[str, str] | None:
    """Run _CHECKOUT; its marks, or None when the box wants a `git push` first (the tree went
    away, or lacks the pack's base). ``listing``: data paths the same request lists, into
    ``listed`` (left empty where the box gave no listing)."""
    import secrets

    spec = box.spec
    base, count, data = pack if pack is not None else ("", 0, b"")
    args = [abs_dir, commit, "1" if force else "0", ident, base, str(count)]
    if listing:
        token = secrets.token_hex(8)
        out = box.run(_CHECKOUT_AND_LIST, *args, token, *listing, stdin=data)
        stdout, raw = _split_listing(out.stdout_bytes, token)
        if raw is not None and listed is not None:
            entries = parse_listing(raw)
            listed.update(dict.fromkeys(listing, entries))
    else:
        out = box.run(_CHECKOUT, *args, stdin=data)
        stdout = out.stdout
    marks = parse_marks(stdout)
    if "gone" in marks or "needpush" in marks:
        return None
    if "other" in marks:
        raise RemoteError(
            f"{spec.alias}:{abs_dir} belongs to another project (its id {marks['other'][:12]}, this "
            f"project's {ident[:12]}): refusing to replace its files",
            hint="choose another directory with --remote-dir DIR or `remote_dir` in remotedl.toml",
        )
    if "dirty" in marks:
        listed_files = stdout.split("@@dirty", 1)[1].strip().splitlines()
        files = [unquote_git_path(f) for f in listed_files]
        shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        raise RemoteError(
            f"the work tree on {spec.alias} ({abs_dir}) has edits that were not pushed from here: {shown}",
            hint="bring them home with `remotedl pull PATH...`, "
            "or overwrite them with `remotedl push --force`",
        )
    if "failed" in marks:
        why = stdout.split("@@failed", 1)[1].strip().splitlines()
        reason = next((w for w in why if w.strip()), "git checkout failed")
        state = (
            "the box's tree is back at the previous commit"
            if "rolledback" in marks
            else "the next push will finish it"
        )
        raise RemoteError(
            f"checkout on {spec.alias} ({abs_dir}) failed: {reason.removeprefix('error: ')}; {state}",
            hint="free space on the box (`remotedl status` shows its disks) and push again",
        )
    return marks


def push_code(
    box: Box, root: Path, abs_dir: str, commit: str, *, force: bool, ident: str = "",
    progress: ProgressFn | None = None,
) -> bool:  # fmt: skip
    """Send ``commit`` to the box with `git push` and check it out there; True if the box's
    tree changed."""
    if box.noise:
        raise startup_noise_error(box, "git")
    _stage(progress, f"code: sending {commit[:10]}")
    _git_push(box, root, abs_dir, commit)
    _stage(progress, "code: checking the box's files and checking out")
    marks = _checkout(box, abs_dir, commit, force=force, ident=ident)
    if marks is None:
        raise RemoteError(f"{abs_dir} went away on {box.spec.alias} during the push", hint="push again")
    return "changed" in marks


def _pack(root: Path, commit: str, base: str) -> tuple[str, int, bytes] | None:
    """A thin pack of ``commit``'s objects that ``base`` lacks, or None (base not here)."""
    if proc.run(["git", "-C", str(root), "cat-file", "-e", f"{base}^{{commit}}"], check=False).returncode:
        return None
    done = proc.communicate(
        ["git", "-C", str(root), "pack-objects", "--stdout", "--revs", "--thin", "--delta-base-offset", "-q"],
        input=f"{commit}\n^{base}\n".encode(),
        max_stdout=PACK_IN_MEMORY,  # past it, `git push` streams the objects instead
    )
    if done.returncode != 0 or done.truncated or len(done.stdout) < 12:
        return None
    return base, int.from_bytes(done.stdout[8:12], "big"), done.stdout


@dataclass
class _Known:
    """What this machine learnt of a box work tree at the last push: its path, and the commit
    it holds (a base for the next pack). Only a shortcut: the box checks both every time."""

    path: str
    commit: str | None


def _known_file(spec: HostSpec, tidy: str, ident: str, git_dir: Path | None) -> Path | None:
    """Where the memo of one box work tree is kept: in the project's git directory (beside its
    index, so it goes with the project), one per host and directory; none outside git."""
    if git_dir is None:
        return None
    key = f"{spec.user}@{spec.hostname}:{spec.port}:{tidy}:{ident}"
    return git_dir / f"remotedl-push-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _sweep_control_dir() -> None:
    """Remove what older versions left in the control directory for good: a ``push-*.json``
    memo per project and host (now in the project's git directory) and a ``push-*.lock`` each
    (now removed after its push): those no push holds."""
    with contextlib.suppress(OSError):
        for old in control_dir().glob("push-*.json"):
            old.unlink(missing_ok=True)
        for lock in control_dir().glob("push-*.lock"):
            with _held(lock, block=False) as got:
                if got:
                    lock.unlink(missing_ok=True)


def _load_known(path: Path | None) -> _Known | None:
    import json

    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
        p, c = raw["path"], raw.get("commit")
        if isinstance(p, str) and p.startswith("/") and (c is None or isinstance(c, str)):
            return _Known(p, c)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _save_known(path: Path | None, known: _Known | None) -> None:
    import json

    if path is None:
        return
    if known is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(known)))
    tmp.replace(path)


# ------------------------------------------------------------------ one push at a time


@contextlib.contextmanager
def push_lock(spec: HostSpec, abs_or_configured_dir: str) -> Iterator[None]:
    """Pushes from this machine into one box directory take turns (``push --watch`` and ``run``)."""
    key = f"{spec.user}@{spec.hostname}:{spec.port}:{abs_or_configured_dir}"
    path = control_dir() / f"push-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
    with _held(path, block=True):
        try:
            yield
        finally:
            # Gone with the push that held it: a push waiting on it finds it unlinked and
            # takes the next one (``_held``), so no lock file outlives its pushes.
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _held(path: Path, *, block: bool) -> Iterator[bool]:
    """Hold an exclusive lock on the file at ``path`` (made if missing): the lock of the file
    that is at ``path`` once locked, not of one unlinked meanwhile. False when ``block`` is
    False and another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # unlinked by the push that held it: lock the next one
    try:
        yield True
    finally:
        os.close(fd)
