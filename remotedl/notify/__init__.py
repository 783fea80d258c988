"""Notifications: Apprise's URL syntax, sent with the standard library.

Standard library only: this module ships inside the agent and runs on the box (python >= 3.10),
where jobs end while the laptop sleeps. The laptop uses it too, to check URLs before a job
starts and to mask them wherever they are shown.

Services (Apprise's URL forms, so a list moves to Apprise unchanged):

- ntfy: ``ntfy://TOPIC`` (ntfy.sh), ``ntfy://[USER:PASS@|TOKEN@]HOST[:PORT]/TOPIC``,
  ``ntfys://...`` (HTTPS), ``https://ntfy.sh/TOPIC``; ``?priority=``, ``?tags=``, ``?token=``.
- Slack incoming webhooks: ``slack://[BOTNAME@]TA/TB/TC[/#CHANNEL]`` or
  ``https://hooks.slack.com/services/TA/TB/TC``.
- Discord webhooks: ``discord://[BOTNAME@]ID/TOKEN`` or ``https://discord.com/api/webhooks/ID/TOKEN``.
- A JSON webhook: ``json://[USER:PASS@]HOST[:PORT][/PATH]`` (``jsons://`` for HTTPS),
  ``?+Header=value`` adds a header. The body is Apprise's (version, title, message, type) plus
  a ``remotedl`` object with the job's fields.
- E-mail over SMTP: ``mailto://USER:PASS@HOST[:PORT][/TO...]?to=&from=&smtp=&name=``,
  ``mailtos://`` for TLS (``?mode=ssl`` or ``starttls``, the default).

Any other scheme goes to the ``apprise`` command when the box has one on PATH (100+ more
services), with the URL in its environment, never in its arguments.

Why not ship Apprise itself: see benchmarks/NOTES-notify.md (its dependency closure, built from the
laptop's environment, does not run on every box python; size and start-up figures there).

Secrets (passwords, tokens, webhook paths, topics, header values) are never printed:
``mask_url`` is what ``config``, ``show``, errors and logs use, and every error text from a send
is scrubbed of the URL's secret parts before anyone sees it.

The package: ``urls`` (parse and mask), ``senders`` (one sender per service, ``send_all``),
``text`` (what a job's notification says). Every name is importable from ``remotedl.notify``.
"""

from __future__ import annotations

from remotedl.notify.senders import MAX_BODY, SEND_TIMEOUT, SENDERS, Outcome, SendError, send, send_all
from remotedl.notify.text import LOG_LINES, Event, duration_words, job_event, log_tail
from remotedl.notify.urls import (
    DISCORD_HOOKS,
    MAIL_PROVIDERS,
    MASK,
    NTFY_CLOUD,
    NTFY_TOPIC,
    SLACK_HOOKS,
    NotifyURLError,
    Target,
    check_urls,
    mask_url,
    parse,
)

__all__ = [
    "DISCORD_HOOKS",
    "LOG_LINES",
    "MAIL_PROVIDERS",
    "MASK",
    "MAX_BODY",
    "NTFY_CLOUD",
    "NTFY_TOPIC",
    "SENDERS",
    "SEND_TIMEOUT",
    "SLACK_HOOKS",
    "Event",
    "NotifyURLError",
    "Outcome",
    "SendError",
    "Target",
    "check_urls",
    "duration_words",
    "job_event",
    "log_tail",
    "mask_url",
    "parse",
    "send",
    "send_all",
]
