"""The login proof: after a step changes how the box lets people in, log in again (paramiko,
through ``ssh -W`` over the master) with the same key and host key before committing it."""

from __future__ import annotations

from pathlib import Path

from remotedl.playbooks.execute import Prove
from remotedl.ssh import Box


class _ProcSocket:
    """A socket-like end of ``ssh -W host:port`` (through the master connection), for
    paramiko: reads time out the way paramiko's transport expects of a socket."""

    def __init__(self, argv: list[str]) -> None:
        import subprocess

        from remotedl import proc

        self.process = proc.popen(argv, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, text=False)
        self.timeout: float | None = None
        self._closed = False  # paramiko reads this name, as on its own ProxyCommand

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, data: bytes) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()
        return len(data)

    def recv(self, size: int) -> bytes:
        import os
        import select

        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError()
        return os.read(fd, size)

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.process.kill()
            self.process.wait()


def login_prover(box: Box) -> Prove:
    """Prove that a fresh login works on ``port`` of the box: a second SSH login (fabric over
    paramiko, in this process), carried by ``ssh -W`` over the open connection to 127.0.0.1:port, with the
    same user and key, and the box's recorded host key required. The server there must show
    ``remotedl-proof NONCE`` in its Banner: only the test server the step started knows it,
    so a login that reached another server (the old sshd, on a port the test server could
    not take) proves nothing and fails."""

    def prove(port: int, nonce: str) -> str | None:
        import base64

        import paramiko
        from fabric import Config, Connection

        from remotedl.ssh.hostkeys import known_keys
        from remotedl.ssh.openssh import openssh_options

        spec = box.spec
        sock = _ProcSocket(["ssh", *openssh_options(spec), "-W", f"127.0.0.1:{port}", "--", spec.alias])
        key_files = [p for p in spec.identity_files if Path(p).is_file()]
        # fabric's Connection over our socket: no ssh config of its own (ours is resolved),
        # and its silent AutoAddPolicy replaced: only the box's recorded key is accepted.
        conn = Connection(
            host=spec.hostname,
            user=spec.user,
            port=spec.port,
            config=Config(ssh_config=paramiko.SSHConfig()),
            connect_timeout=spec.connect_timeout,
            connect_kwargs={
                "key_filename": key_files,
                "look_for_keys": False,
                "allow_agent": not spec.identities_only,
                "sock": sock,
                "banner_timeout": spec.connect_timeout,
                "auth_timeout": spec.connect_timeout,
            },
        )
        client: paramiko.SSHClient = conn.client
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        lookup = spec.hostname if spec.port == 22 else f"[{spec.hostname}]:{spec.port}"
        for k in known_keys(spec):
            try:
                key = paramiko.PKey.from_type_string(k.key_type, base64.b64decode(k.blob))
            except Exception:  # noqa: S112 - a key type paramiko lacks: try the others
                continue
            client.get_host_keys().add(lookup, k.key_type, key)
        try:
            conn.open()
            transport = client.get_transport()
            banner = (transport.get_banner() if transport is not None else None) or b""
            if f"remotedl-proof {nonce}".encode() not in banner:
                return (
                    f"the server on 127.0.0.1:{port} is not the test server this step started: "
                    "its banner lacks this run's nonce"
                )
            r = conn.run(
                "echo remotedl-login-ok", hide=True, warn=True, in_stream=False, timeout=spec.connect_timeout
            )
            if r.stdout.strip() != "remotedl-login-ok":
                return "the login did not run a command"
            return None
        except paramiko.BadHostKeyException:
            return "the server on that port offered another host key"
        except paramiko.AuthenticationException:
            return "the key was refused"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        finally:
            conn.close()
            sock.close()

    return prove
