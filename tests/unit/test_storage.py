"""URL resolution and the few file operations, on local disk (S3 only constructed, never contacted)."""

from __future__ import annotations

import os
import pickle

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
    storage.S3_MAX_ATTEMPTS_VAR,
    storage.S3_CONNECT_TIMEOUT_VAR,
    storage.S3_REQUEST_TIMEOUT_VAR,
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


# -- retries and timeouts (an S3 endpoint away for ~30 s must not fail the job) ---------------------------


def test_s3_options_default_to_retries_covering_a_30s_outage():
    opts = storage.s3_options_from_env({})
    assert opts == {"max_attempts": 10, "connect_timeout": 10.0, "request_timeout": 60.0}
    # Standard strategy: before retry n a random 0-1 s x 2**n, capped at 20 s. The expected total wait
    # of the retries must cover 30 s with room to spare (pyarrow's default of 3 attempts: 1.5 s).
    expected_wait = sum(_expected_standard_delay_s(n) for n in range(opts["max_attempts"] - 1))
    assert expected_wait > 60


def _expected_standard_delay_s(n: int, cap: float = 20.0) -> float:
    top = 2.0**n  # delay ~ U(0, top), capped: E = top/2 below the cap, else cap - cap**2 / (2 top)
    return top / 2 if top <= cap else cap - cap * cap / (2 * top)


def test_s3_options_from_env_overrides():
    env = {
        storage.S3_MAX_ATTEMPTS_VAR: " 4 ",
        storage.S3_CONNECT_TIMEOUT_VAR: "2.5",
        storage.S3_REQUEST_TIMEOUT_VAR: "30",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    opts = storage.s3_options_from_env(env)
    assert (opts["max_attempts"], opts["connect_timeout"], opts["request_timeout"]) == (4, 2.5, 30.0)
    assert isinstance(opts["max_attempts"], int)
    assert opts["endpoint_override"] == "127.0.0.1:9" and opts["region"] == "us-east-1"
    assert storage.s3_options_from_env({storage.S3_MAX_ATTEMPTS_VAR: ""})["max_attempts"] == 10  # empty = unset


@pytest.mark.parametrize(
    ("var", "value"),
    [
        (storage.S3_MAX_ATTEMPTS_VAR, "0"),
        (storage.S3_MAX_ATTEMPTS_VAR, "-3"),
        (storage.S3_MAX_ATTEMPTS_VAR, "2.5"),
        (storage.S3_MAX_ATTEMPTS_VAR, "ten"),
        (storage.S3_CONNECT_TIMEOUT_VAR, "0"),
        (storage.S3_CONNECT_TIMEOUT_VAR, "-1"),
        (storage.S3_CONNECT_TIMEOUT_VAR, "nan"),
        (storage.S3_REQUEST_TIMEOUT_VAR, "inf"),
        (storage.S3_REQUEST_TIMEOUT_VAR, "10s"),
    ],
)
def test_s3_options_bad_env_value_is_one_line_naming_the_variable(var, value):
    with pytest.raises(UserError) as err:
        storage.s3_options_from_env({var: value})
    msg = str(err.value)
    assert msg.startswith(f"{var}={value!r}: expected") and "\n" not in msg


def test_s3_filesystem_has_the_retries_and_timeouts(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_aws_env.setenv(storage.S3_MAX_ATTEMPTS_VAR, "7")
    fs = storage.resolve("s3://bucket/prefix").fs
    assert isinstance(fs, pafs.S3FileSystem) and fs.max_attempts == 7
    kwargs = fs.__reduce__()[1][0]
    assert (kwargs["connect_timeout"], kwargs["request_timeout"]) == (10.0, 60.0)


def test_s3_filesystem_keeps_its_retries_when_pickled(clean_aws_env):
    # Ray ships the filesystem to workers pickled; pyarrow's own __reduce__ leaves the retry strategy out
    # (a worker's copy would retry 3 times), the project's keeps it.
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_aws_env.setenv(storage.S3_MAX_ATTEMPTS_VAR, "12")
    clean_aws_env.setenv(storage.S3_CONNECT_TIMEOUT_VAR, "3")
    fs = storage.s3_filesystem_from_env()
    copy = pickle.loads(pickle.dumps(fs))
    assert isinstance(copy, storage.RetryingS3FileSystem) and copy.max_attempts == 12
    assert copy == fs and copy.__reduce__() == fs.__reduce__()
    kwargs = copy.__reduce__()[1][0]
    assert (kwargs["connect_timeout"], kwargs["request_timeout"], kwargs["endpoint_override"]) == (
        3.0,
        60.0,
        "127.0.0.1:9",
    )
    clean_aws_env.setenv(storage.S3_MAX_ATTEMPTS_VAR, "not read by a copy")  # a worker's env does not matter
    assert pickle.loads(pickle.dumps(fs)).max_attempts == 12


def test_s3_url_with_credentials_is_refused_without_showing_them(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(UserError) as err:
        storage.resolve("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/prefix")
    assert "wJalrXUtnFEMI" not in str(err.value) and "credentials in the URL" in str(err.value)
    assert str(err.value).startswith("s3://AKIAEXAMPLE:***@bucket/prefix: ")


def test_describe_masks_a_url_password_before_cutting_the_text():
    url = "https://user:hunter2@example.com/x"
    text = "x" * 283 + f" {url} failed"  # the 300-character cut falls inside the password: "https://user:hun"
    msg = storage.describe_os_error("s3://bucket/x", OSError(text))
    assert "hun" not in msg and msg.endswith("https://user:***")
