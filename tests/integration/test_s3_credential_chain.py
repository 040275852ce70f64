"""S3 through the AWS SDK's default credential chain, on the real S3 server: no AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY in the environment, the keys in a shared credentials file under a named profile
(what an IRSA / workload-identity pod or a mounted credentials file looks like to the process).

The web-identity branch (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN) is the same SDK chain one step
further on, but it needs an STS endpoint to trade the token for keys, which SeaweedFS does not provide;
it is not faked here and so is not tested on this stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PROFILE = "imagenet-ray-credchain"

# Read back through imagenet_ray.storage, in the same chain-only environment as the CLI run.
_READ_BACK = """
import json, sys
from imagenet_ray import storage
root = storage.resolve(sys.argv[1])
files = storage.list_files(root)
paths = sorted(f.path[len(root.path) + 1 :] for f in files)
synsets = storage.read_bytes(root.child("LOC_synset_mapping.txt"))
print(json.dumps({"paths": paths, "sizes": [f.size for f in files], "synsets": synsets.decode()}))
"""


def _credentials_file(path: Path, access_key: str, secret_key: str) -> Path:
    # [default] holds keys the server refuses: success proves AWS_PROFILE picked the named profile.
    text = (
        "[default]\naws_access_key_id = not-a-key\naws_secret_access_key = not-a-secret\n\n"
        f"[{PROFILE}]\naws_access_key_id = {access_key}\naws_secret_access_key = {secret_key}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    assert path.stat().st_mode & 0o777 == 0o600
    return path


def _chain_env(local_stack, tmp_path: Path, credentials: Path) -> dict[str, str]:
    """The endpoint and region from the stack, credentials only from the file: no key variables at all."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")
    }
    stack = local_stack.env()
    config = tmp_path / "aws-config"  # an empty config file: nothing from the user's ~/.aws/config
    config.write_text("")
    env.update(
        {
            "AWS_ENDPOINT_URL": stack["AWS_ENDPOINT_URL"],
            "AWS_ENDPOINT_URL_S3": stack["AWS_ENDPOINT_URL_S3"],
            "AWS_REGION": stack["AWS_REGION"],
            "AWS_CONFIG_FILE": str(config),
            "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_PROFILE": PROFILE,
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probing on a machine that has none
            "RAY_ADDRESS": "",
        }
    )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        assert key not in env
    return env


def _synth(out: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = ["synth", "--out", out, "--classes", "2", "--train-per-class", "2", "--val-per-class", "1"]
    return subprocess.run(
        [sys.executable, "-m", "imagenet_ray", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_s3_with_keys_only_in_a_shared_credentials_file(local_stack, tmp_path):
    from imagenet_ray.services import s3

    creds = _credentials_file(tmp_path / "credentials", local_stack.access_key, local_stack.secret_key)
    env = _chain_env(local_stack, tmp_path, creds)
    out = f"s3://imagenet/credchain-{uuid.uuid4().hex[:8]}"

    done = _synth(out, env)
    assert done.returncode == 0, done.stderr[-3000:]

    read = subprocess.run(
        [sys.executable, "-c", _READ_BACK, out], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert read.returncode == 0, read.stderr[-3000:]
    found = json.loads(read.stdout)
    # 2 classes x 2 train images, 1 val image per class, the val solution CSV and the synset mapping.
    assert len(found["paths"]) == 2 * 2 + 2 + 2, found["paths"]
    assert "LOC_synset_mapping.txt" in found["paths"] and "LOC_val_solution.csv" in found["paths"]
    assert all(size > 0 for size in found["sizes"])
    assert len(found["synsets"].splitlines()) == 2

    # The objects really are on the server: the stack's own client (explicit keys) sees the same keys.
    listed = s3.client(local_stack).list_objects_v2(Bucket="imagenet", Prefix=out.removeprefix("s3://imagenet/") + "/")
    assert len(listed.get("Contents", [])) == len(found["paths"])


def test_wrong_secret_in_the_credentials_file_gives_one_clear_line(local_stack, tmp_path):
    creds = _credentials_file(tmp_path / "credentials", local_stack.access_key, "not-the-secret")
    out = f"s3://imagenet/credchain-denied-{uuid.uuid4().hex[:8]}"

    done = _synth(out, _chain_env(local_stack, tmp_path, creds))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("imagenet-ray: error: ") and out in lines[0], lines[0]
    assert "access denied" in lines[0] and f"profile {PROFILE!r} in AWS_SHARED_CREDENTIALS_FILE" in lines[0]
    assert "Traceback" not in done.stderr and "not-the-secret" not in done.stderr + done.stdout
