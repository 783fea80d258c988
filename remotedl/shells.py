"""Facts about the login shells boxes have, for advice the user can act on."""

from __future__ import annotations

# login shell -> (the start-up file that runs for `ssh host command`, how to keep it quiet)
_ADVICE: dict[str, tuple[str, str]] = {
    "bash": (
        "~/.bashrc (or /etc/bash.bashrc)",
        "put `case $- in *i*) ;; *) return;; esac` at its top, above anything that prints",
    ),
    "zsh": (
        "~/.zshenv (or /etc/zsh/zshenv)",
        "move what prints to ~/.zshrc, or guard it with `[[ -o interactive ]] &&`",
    ),
    "fish": (
        "~/.config/fish/config.fish (or conf.d/*.fish)",
        "wrap what prints in `if status is-interactive ... end`",
    ),
    "tcsh": ("~/.tcshrc or ~/.cshrc", "wrap what prints in `if ($?prompt) then ... endif`"),
    "csh": ("~/.cshrc", "wrap what prints in `if ($?prompt) then ... endif`"),
    "ksh": ("the file named by $ENV", "guard what prints with `[[ $- == *i* ]] &&`"),
}


def noise_advice(login_shell: str) -> tuple[str, str]:
    """(which start-up file prints, how to guard it) for a box whose login shell is given."""
    return _ADVICE.get(
        login_shell,
        (
            f"the start-up files of {login_shell or 'the login shell'}",
            "print only when the shell is interactive",
        ),
    )
