"""An S3-compatible server for tests: moto's server mode in its own process, with auth on.

moto checks signatures once its "initial no-auth action count" is used up:
the first requests create an IAM user with an allow-all policy and its access
key, and from then on every request must be signed with that key. So wrong
credentials fail the way they fail on AWS (InvalidAccessKeyId,
SignatureDoesNotMatch).

Run as a script it serves and prints its port: ``python tests/servers/s3.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

REGION = "us-east-1"
_BOOTSTRAP_ACTIONS = 3  # create_user, put_user_policy, create_access_key


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION}


class S3Server:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.credentials: Credentials | None = None

    def start(self) -> S3Server:
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_BOOTSTRAP_ACTIONS)}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.host], stdout=subprocess.PIPE,
            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        port = int(self.proc.stdout.readline())
        self.url = f"http://{self.host}:{port}"
        self.credentials = self._bootstrap()
        return self

    def _bootstrap(self) -> Credentials:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.url, region_name=REGION,
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="syncbit-test")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="syncbit-test", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="syncbit-test")["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    def client(self, endpoint_url: str | None = None):
        """A boto3 S3 client with the server's credentials (for setting up test data)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=endpoint_url or self.url, region_name=REGION,
            aws_access_key_id=self.credentials.access_key, aws_secret_access_key=self.credentials.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1", port=0,
                                verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()  # until the parent closes our stdin or kills us


if __name__ == "__main__":
    main()
