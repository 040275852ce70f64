"""URL resolution and the few file operations, on local disk (S3 only constructed, never contacted)."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from imagenet_ray import storage
from imagenet_ray.errors import UserError

_AWS_VARS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


@pytest.fixture
def clean_aws_env(monkeypatch):
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_resolve_plain_path(tmp_path, monkeypatch):
    loc = storage.resolve(str(tmp_path / "a" / "b"))
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    assert loc.path == str(tmp_path / "a" / "b") and loc.url == loc.path
    monkeypatch.chdir(tmp_path)
    rel = storage.resolve("data/x")
    assert rel.path == os.path.join(str(tmp_path), "data", "x") and os.path.isabs(rel.url)


def test_resolve_file_url(tmp_path):
    url = tmp_path.as_uri()
    loc = storage.resolve(url)
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    assert loc.path == str(tmp_path) and loc.url == url
    child = loc.child("sub", "f.bin")
    assert child.url == f"{url}/sub/f.bin" and child.path == str(tmp_path / "sub" / "f.bin")


def test_resolve_s3_with_endpoint_from_env(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    loc = storage.resolve("s3://bucket/prefix/")
    assert isinstance(loc.fs, pafs.S3FileSystem)
    assert loc.path == "bucket/prefix" and loc.url == "s3://bucket/prefix/"
    assert loc.fs.region == "us-east-1"  # a custom endpoint has no region to discover
    assert storage.is_remote(loc.url)
    assert loc.child("x.parquet").path == "bucket/prefix/x.parquet"
    assert loc.child("x.parquet").url == "s3://bucket/prefix/x.parquet"


def test_s3_specific_endpoint_and_region_win(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_aws_env.setenv("AWS_ENDPOINT_URL_S3", "https://127.0.0.1:10")
    clean_aws_env.setenv("AWS_REGION", "eu-west-3")
    fs = storage.s3_filesystem_from_env()
    kwargs = fs.__reduce__()[1][0]  # pyarrow pickles the S3 options as a dict
    assert kwargs["endpoint_override"] == "127.0.0.1:10" and kwargs["scheme"] == "https"
    assert fs.region == "eu-west-3"


def test_s3_without_key_env_uses_the_default_credential_chain(clean_aws_env):
    # No keys in the environment (IRSA, workload identity, a credentials file): no explicit keys and not
    # anonymous, so the AWS SDK's default chain looks the credentials up.
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "")  # set but empty counts as unset
    kwargs = storage.s3_filesystem_from_env().__reduce__()[1][0]
    assert not kwargs["access_key"] and not kwargs["secret_key"] and not kwargs["session_token"]
    assert kwargs["anonymous"] is False and not kwargs["role_arn"]
    assert kwargs["endpoint_override"] == "127.0.0.1:9" and kwargs["scheme"] == "http"


def test_s3_keys_from_env_are_passed(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "key-id")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    clean_aws_env.setenv("AWS_SESSION_TOKEN", "token")
    kwargs = storage.s3_filesystem_from_env().__reduce__()[1][0]
    assert (kwargs["access_key"], kwargs["secret_key"], kwargs["session_token"]) == ("key-id", "secret", "token")
    assert kwargs["anonymous"] is False


def test_resolve_s3_bucket_root(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage.resolve("s3://bucket").path == "bucket"


@pytest.mark.parametrize("url", ["ftp://host/x", "http://example.com/data", "hdfs://nn/x"])
def test_unsupported_scheme(url):
    with pytest.raises(UserError) as info:
        storage.resolve(url)
    assert "unsupported URL scheme" in str(info.value) and url in str(info.value)


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix"])
def test_s3_without_bucket(url, clean_aws_env):
    with pytest.raises(UserError, match="missing bucket"):
        storage.resolve(url)


def test_empty_url():
    with pytest.raises(UserError, match="empty URL"):
        storage.resolve("")


def test_is_remote_and_join():
    assert storage.is_remote("s3://b/p") and storage.is_remote("gs://b/p")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://b/p/", "a", "b") == "s3://b/p/a/b"
    assert storage.join("/", "a") == "/a"


def test_write_atomic_and_read_round_trip(tmp_path):
    loc = storage.resolve(str(tmp_path)).child("deep", "dir", "blob.bin")
    payload = bytes(range(256)) * 100
    storage.write_bytes_atomic(loc, payload)
    assert storage.read_bytes(loc) == payload
    assert storage.exists(loc)
    # overwrite in place
    storage.write_bytes_atomic(loc, b"second")
    assert storage.read_bytes(loc) == b"second"
    leftovers = [p.name for p in (tmp_path / "deep" / "dir").iterdir()]
    assert leftovers == ["blob.bin"], f"temporary files left behind: {leftovers}"


def test_write_atomic_via_file_url(tmp_path):
    loc = storage.resolve(tmp_path.as_uri()).child("x.txt")
    storage.write_bytes_atomic(loc, b"hello")
    assert (tmp_path / "x.txt").read_bytes() == b"hello"


def test_read_missing_local_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "file.bin"
    loc = storage.resolve(str(missing))
    assert not storage.exists(loc)
    with pytest.raises(UserError) as info:
        storage.read_bytes(loc)
    assert str(missing) in str(info.value) and "not found" in str(info.value)


def test_list_files_recursive_and_missing(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "1.bin").write_bytes(b"x")
    (tmp_path / "a" / "2.bin").write_bytes(b"yy")
    infos = storage.list_files(storage.resolve(str(tmp_path)))
    assert sorted((os.path.relpath(i.path, tmp_path), i.size) for i in infos) == [("a/2.bin", 2), ("a/b/1.bin", 1)]
    assert storage.list_files(storage.resolve(str(tmp_path / "missing"))) == []
    single = storage.list_files(storage.resolve(str(tmp_path / "a" / "2.bin")))
    assert [i.size for i in single] == [2]


def test_ensure_dir_creates_local_directories(tmp_path):
    storage.ensure_dir(storage.resolve(str(tmp_path / "x" / "y")))
    assert (tmp_path / "x" / "y").is_dir()


# --- error descriptions ----------------------------------------------------------------------------------------

ACCESS_DENIED = (
    "When reading information for key 'prefix/a.parquet' in bucket 'bucket': AWS Error ACCESS_DENIED "
    "during HeadObject operation: No response body."
)
NO_CONNECT = (
    "When reading information for key 'prefix/{key}' in bucket 'bucket': AWS Error NETWORK_CONNECTION "
    "during HeadObject operation: curlCode: 7, Could not connect to server; Details: Failed to connect to "
    "127.0.0.1 port 9 after 0 ms: Could not connect to server"
)


def test_describe_access_denied():
    msg = storage.describe_os_error("s3://bucket/prefix", OSError(ACCESS_DENIED))
    assert msg.startswith("s3://bucket/prefix: ") and "access denied" in msg.lower()
    assert "\n" not in msg


def test_access_denied_names_where_the_credentials_came_from(clean_aws_env):
    def denied() -> str:
        return storage.describe_os_error("s3://bucket/prefix", OSError(ACCESS_DENIED))

    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "key-id")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "secret-value")
    assert "AWS_SECRET_ACCESS_KEY" in denied() and "secret-value" not in denied()
    clean_aws_env.delenv("AWS_ACCESS_KEY_ID")
    clean_aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    assert "default chain" in denied()
    clean_aws_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token")
    assert "AWS_WEB_IDENTITY_TOKEN_FILE" in denied()
    clean_aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/etc/aws/credentials")
    clean_aws_env.setenv("AWS_PROFILE", "imagenet")
    msg = denied()
    assert "profile 'imagenet' in AWS_SHARED_CREDENTIALS_FILE" in msg
    assert msg.startswith("s3://bucket/prefix: access denied") and "\n" not in msg


WRITE_SIGNATURE_MISMATCH = (
    "When initiating multiple part upload for key 'prefix/x.bin' in bucket 'bucket': AWS Error "
    "SIGNATURE_DOES_NOT_MATCH during CreateMultipartUpload operation: The request signature we calculated does "
    "not match the signature you provided. Check your key and signing method. (Request ID: 18ED44B84F5ED892)"
)


def test_describe_wrong_secret_on_a_write_is_access_denied():
    # What SeaweedFS answers a write signed with a wrong secret (pyarrow 25's text).
    msg = storage.describe_os_error("s3://bucket/prefix/x.bin", OSError(WRITE_SIGNATURE_MISMATCH))
    assert msg.startswith("s3://bucket/prefix/x.bin: access denied by the storage server")


def test_describe_no_such_bucket_and_connection_refused():
    assert "bucket does not exist" in storage.describe_os_error(
        "s3://b", OSError("AWS Error NO_SUCH_BUCKET: NoSuchBucket")
    )
    msg = storage.describe_os_error("s3://bucket/prefix", OSError(NO_CONNECT.format(key="a.parquet")))
    assert "cannot connect" in msg and "access denied" not in msg


def test_describe_other_errors_keep_the_text():
    msg = storage.describe_os_error("/data/x", OSError("something\nodd   happened"))
    assert msg == "/data/x: something odd happened"


@pytest.mark.parametrize("key", ["ILSVRC2012_val_00000403.JPEG", "n01440764_10403.JPEG"])
def test_describe_connection_error_for_key_containing_403(key):
    msg = storage.describe_os_error("s3://bucket/prefix", OSError(NO_CONNECT.format(key=key)))
    assert "cannot connect" in msg
    assert "access denied" not in msg
