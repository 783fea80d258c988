"""AWS EC2 through boto3 (the optional extra ``remotedl[aws]``).

Credentials, region defaults and endpoints come from boto3's own chain: ``AWS_PROFILE``,
``~/.aws/credentials`` and ``config``, SSO, instance roles, and ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_EC2``. remotedl stores none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from remotedl.cloud.base import (
    CloudAuthError,
    CloudError,
    CloudVM,
    MissingExtra,
    Provider,
    VMState,
    VMStatus,
)

STATES: dict[str, VMState] = {
    "pending": "starting",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopped",
    "shutting-down": "terminated",
    "terminated": "terminated",
}
# The variables boto3 reads that remotedl passes on from its environment (tests and users
# run it with an injected one).
_PASSED = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


class AwsProvider(Provider):
    def __init__(self, vm: CloudVM, environ: Mapping[str, str]) -> None:
        super().__init__(vm)
        self.environ = environ
        self._client: Any = None

    @property
    def instance_id(self) -> str:
        return self.vm.ids["instance_id"]

    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError as e:
                raise MissingExtra(
                    f"host {self.vm.host} is an AWS VM and boto3 is not installed",
                    hint="pip install 'remotedl[aws]'",
                ) from e
            env = self.environ
            session = boto3.session.Session(
                aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
                profile_name=None if env.get("AWS_ACCESS_KEY_ID") else env.get("AWS_PROFILE") or None,
                region_name=self.vm.ids["region"],
            )
            endpoint = env.get("AWS_ENDPOINT_URL_EC2") or env.get("AWS_ENDPOINT_URL") or None
            self._client = session.client("ec2", endpoint_url=endpoint)
        return self._client

    def _call(self, what: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self.client(), what)(**kwargs)
        except NoCredentialsError as e:
            raise CloudAuthError(
                f"no AWS credentials for host {self.vm.host}",
                hint="run `aws configure` or `aws sso login`, or set AWS_PROFILE",
            ) from e
        except ClientError as e:
            err = e.response.get("Error", {})
            code, message = err.get("Code", "?"), err.get("Message", str(e))
            if code in ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "ExpiredToken"):
                raise CloudAuthError(
                    f"AWS refused {what} for {self.vm.name}: {code}: {message}",
                    hint="check the credentials (`aws sts get-caller-identity`) and their "
                    "ec2:DescribeInstances/StartInstances/StopInstances permissions",
                ) from e
            raise CloudError(f"AWS {what} failed for {self.vm.name}: {code}: {message}") from e
        except BotoCoreError as e:
            raise CloudError(f"AWS {what} failed for {self.vm.name}: {e}") from e

    def status(self) -> VMStatus:
        answer = self._call("describe_instances", InstanceIds=[self.instance_id])
        found = [i for r in answer.get("Reservations", []) for i in r.get("Instances", [])]
        if not found:
            raise CloudError(f"{self.vm.name} does not exist", hint="check instance_id and region")
        inst = found[0]
        word = str(inst.get("State", {}).get("Name", "unknown"))
        state = STATES.get(word, "unknown")
        launched = inst.get("LaunchTime")  # the last start, for an instance that was stopped
        return VMStatus(
            state=state,
            detail=word,
            public_ip=inst.get("PublicIpAddress"),
            private_ip=inst.get("PrivateIpAddress"),
            started_at=launched if state in ("running", "stopping") else None,
            spot=inst.get("InstanceLifecycle") == "spot",
            price_per_hour=self.vm.price_per_hour,
        )

    def start(self) -> None:
        self._call("start_instances", InstanceIds=[self.instance_id])

    def stop(self) -> None:
        self._call("stop_instances", InstanceIds=[self.instance_id])
