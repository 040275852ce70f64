"""The training image, infra/docker/Dockerfile, checked without docker (no image can be built here).

The Dockerfile is parsed as text: its base tag must carry the Ray and Python that pyproject.toml pins, it
must install the package from the copied source (pyproject.toml stays the one list of versions), fail the
build when the crop decoder did not build, and copy only what exists and what .dockerignore lets into the
build context. The slow test runs the Dockerfile's own install step (taken from the file, not retyped) in a
fresh venv on the files the image would get.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RAY_IMAGE = "rayproject/ray"
# rayproject/ray:{Ray version}-{pyXY}-{platform}; platform: cpu, cuXYZ, or the -gpu alias.
TAG = re.compile(r"(?P<repo>[\w./-]+):(?P<ray>\d+\.\d+\.\d+)-(?P<py>py\d+)-(?P<platform>cpu|gpu|cu\d+)")


# --- the Dockerfile as instructions -----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined; comment lines dropped (inside continuations too, as Docker)."""
    instructions: list[Instruction] = []
    buf, start = "", 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = lineno
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buf = ""
    assert not buf, "the Dockerfile ends inside a line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(value: str, env: dict[str, str]) -> str:
    """Docker's ${VAR}/$VAR substitution; an undefined variable is an error here, not an empty string."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in env, f"${name} is used before an ARG defines it"
        return env[name]

    return _VAR.sub(sub, value)


def base_image(instructions: list[Instruction], **build_args: str) -> str:
    """The FROM image after the global ARGs' defaults (or `--build-arg`s) are substituted."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, eq, default = ins.args.partition("=")
            if name in build_args:
                env[name] = build_args[name]
            elif eq:
                env[name] = expand(default.strip('"'), env)
        elif ins.keyword == "FROM":
            return expand(ins.args.split()[0], env)
    raise AssertionError("no FROM")


def global_args(instructions: list[Instruction]) -> set[str]:
    names = set()
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            names.add(ins.args.partition("=")[0])
    return names


def runs(instructions: list[Instruction]) -> list[tuple[int, str]]:
    return [(i, ins.args) for i, ins in enumerate(instructions) if ins.keyword == "RUN"]


def install_step(instructions: list[Instruction]) -> tuple[int, str]:
    """The one RUN that pip-installs: (its index among the instructions, its shell command)."""
    steps = [(i, cmd) for i, cmd in runs(instructions) if re.search(r"\bpip\b.*\binstall\b", cmd)]
    assert len(steps) == 1, f"expected one pip install step, found {[cmd for _, cmd in steps]}"
    return steps[0]


def pip_install_args(command: str) -> list[str]:
    """The arguments after `pip install` in the `&&`/`;` chain of a RUN command."""
    for part in re.split(r"&&|;|\|\|", command):
        tokens = shlex.split(part)
        if "pip" in tokens and "install" in tokens:
            return tokens[tokens.index("install") + 1 :]
    raise AssertionError(f"no pip install in {command!r}")


# --- pyproject.toml's pins ----------------------------------------------------------------------------


def pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", dep.strip())
        assert m, f"unpinned dependency {dep!r}"
        out[m.group(1).lower()] = m.group(3)
    return out


def python_tag() -> str:
    """requires-python '>=3.11,<3.12' → 'py311' (it must name one minor version, as an image does)."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"].replace(" ", "")
    m = re.fullmatch(r">=(\d+)\.(\d+),<(\d+)\.(\d+)", spec)
    assert m, f"requires-python {spec!r} is not '>=X.Y,<X.Y+1'"
    major, minor, major2, minor2 = map(int, m.groups())
    assert (major2, minor2) == (major, minor + 1), f"requires-python {spec!r} spans more than one Python"
    return f"py{major}{minor}"


# --- the build context: .dockerignore and COPY ---------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """One .dockerignore pattern as a regex, after Docker's patternmatcher (`**` spans directories)."""
    pattern = posixpath.normpath(pattern).lstrip("/")
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out)


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(line.lstrip("!"))))
    return rules


def excluded(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `rel` out of the context: the last rule matching it or a parent decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negated
    return result


def copies(instructions: list[Instruction], stop: int | None = None) -> list[tuple[list[str], str]]:
    """(sources, absolute destination) of each COPY before instruction `stop`, WORKDIRs applied.

    A destination ending in '/' (or '.') is a directory, as in Docker; it keeps its trailing '/'.
    """
    workdir, out = "/", []
    for ins in instructions[:stop]:
        if ins.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, ins.args)
        elif ins.keyword == "COPY":
            *sources, dest = [t for t in shlex.split(ins.args) if not t.startswith("--")]
            is_dir = dest.endswith("/") or posixpath.basename(dest) in {".", ""}
            out.append((sources, posixpath.normpath(posixpath.join(workdir, dest)) + ("/" if is_dir else "")))
    return out


def landed(sources: list[str], dest: str) -> set[str]:
    """Where each COPY source ends up in the image (a directory's contents go into the destination)."""
    out = set()
    for src in sources:
        into_dir = dest.endswith("/") and not (REPO / src).is_dir()
        out.add(posixpath.join(dest, posixpath.basename(src)) if into_dir else posixpath.normpath(dest))
    return out


def workdir_at(instructions: list[Instruction], stop: int) -> str:
    workdir = "/"
    for ins in instructions[:stop]:
        if ins.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, ins.args)
    return workdir


def lay_out(instructions: list[Instruction], stop: int, image_root: Path) -> None:
    """Copy what the COPYs before `stop` put into the image (honouring .dockerignore) under image_root."""
    rules = dockerignore()
    for sources, dest in copies(instructions, stop):
        target = image_root / dest.lstrip("/")
        for src in sources:
            path = REPO / src
            if path.is_dir():  # Docker copies a directory's contents into the destination
                files = [p for p in path.rglob("*") if p.is_file()]
                pairs = [(p, target / p.relative_to(path)) for p in files]
            else:
                pairs = [(path, target / path.name if dest.endswith("/") else target)]
            for file, to in pairs:
                if not excluded(file.relative_to(REPO).as_posix(), rules):
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, to)


# --- the base image --------------------------------------------------------------------------------


def test_the_gpu_base_is_the_official_ray_image_of_the_pinned_ray_and_python(instructions):
    assert [ins.keyword for ins in instructions].count("FROM") == 1, "one stage: the image is the Ray image + this"
    m = TAG.fullmatch(base_image(instructions))
    assert m, f"base {base_image(instructions)!r} is not {RAY_IMAGE}:X.Y.Z-pyXY-platform"
    assert m["repo"] == RAY_IMAGE
    assert m["ray"] == pins()["ray"], "the base image's Ray differs from pyproject.toml's ray pin"
    assert m["py"] == python_tag(), "the base image's Python differs from pyproject.toml's requires-python"
    # An explicit CUDA version: the -gpu alias moves with Ray's default (CUDA 12.1 today), not with torch.
    assert m["platform"].startswith("cu"), f"default variant {m['platform']!r} is not a CUDA image"


def test_the_cpu_variant_is_a_build_arg_with_the_same_ray_and_python(instructions):
    assert {"VARIANT", "BASE_IMAGE"} <= global_args(instructions), "VARIANT / BASE_IMAGE must be build args"
    m = TAG.fullmatch(base_image(instructions, VARIANT="cpu"))
    assert m, base_image(instructions, VARIANT="cpu")
    assert (m["repo"], m["ray"], m["py"], m["platform"]) == (RAY_IMAGE, pins()["ray"], python_tag(), "cpu")
    # BASE_IMAGE replaces the whole reference (a mirror, a digest) and wins over VARIANT.
    assert base_image(instructions, BASE_IMAGE="registry.example/ray@sha256:00", VARIANT="cpu").endswith("@sha256:00")
    documented = DOCKERFILE.read_text() + (REPO / "infra" / "docker" / "README.md").read_text()
    assert "--build-arg VARIANT=cpu" in documented


def test_the_gpu_base_has_the_cuda_of_the_pinned_torch(instructions):
    """Ray tags CUDA X.Y as cuXY (cu13.0.0-cudnn → -cu130): it must be the CUDA torch's wheel was built for."""
    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed")
    if dist.version.split("+")[0] != pins()["torch"]:
        pytest.skip(f"installed torch {dist.version} is not the pinned {pins()['torch']}")
    version_py = Path(str(dist.locate_file("torch/version.py"))).read_text()
    m = re.search(r"^cuda\b.*=\s*'(\d+)\.(\d+)'", version_py, re.MULTILINE)
    if not m:
        pytest.skip("the installed torch is not a CUDA build (the PyPI wheel for this platform is)")
    tag = TAG.fullmatch(base_image(instructions))
    assert tag
    platform = tag["platform"]
    assert platform == f"cu{m[1]}{m[2]}", f"base image {platform} but torch {pins()['torch']} is CUDA {m[1]}.{m[2]}"


# --- the install -----------------------------------------------------------------------------------


def test_the_install_step_installs_the_package_from_the_copied_source(instructions):
    index, command = install_step(instructions)
    args = pip_install_args(command)
    targets = [a for a in args if not a.startswith("-")]
    assert targets == ["."], f"pip install must install the copied source '.', not {targets}"
    assert not {"-r", "--requirement", "-c", "--constraint", "-e", "--editable"} & set(args), args
    # One source of truth: not a single version is written in the Dockerfile's instructions.
    for ins in instructions:
        assert "==" not in ins.args, f"line {ins.line}: versions belong in pyproject.toml, not {ins.args!r}"
    assert not set(pins()) & {a.split("[")[0].lower() for a in args}, "dependencies named in the install"
    # The install runs where pyproject.toml, setup.py and the package were copied (the WORKDIR).
    workdir = workdir_at(instructions, index)
    copied = set().union(*(landed(srcs, dest) for srcs, dest in copies(instructions, index)))
    for needed in ("pyproject.toml", "setup.py", "README.md", "imagenet_ray"):
        assert posixpath.join(workdir, needed) in copied, f"{needed} is not copied into {workdir} before the install"


def test_the_build_fails_when_the_crop_decoder_did_not_build(instructions):
    index, _ = install_step(instructions)
    checks = [(i, cmd) for i, cmd in runs(instructions) if re.search(r"\bimport\b[^\"']*\bimagenet_ray_jpeg\b", cmd)]
    assert checks, "no RUN imports imagenet_ray_jpeg"
    assert any(i > index for i, _ in checks), "the imagenet_ray_jpeg import check must come after the install"
    for _, cmd in checks:
        assert "python" in cmd and "||" not in cmd, f"the check must fail the build: {cmd!r}"
    # The decoder's build tools: a C compiler and libjpeg(-turbo)'s headers, installed before the install step.
    apt = " ".join(cmd for i, cmd in runs(instructions) if i < index and "apt-get install" in cmd)
    assert "gcc" in apt and "libjpeg" in apt and "libc6-dev" in apt, apt


def test_the_image_runs_as_ray_and_the_jobs_from_the_workdir(instructions, tmp_path):
    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    assert users and users[-1] == "ray", "the image must end as the Ray image's user `ray`, not root"
    workdir = workdir_at(instructions, len(instructions))
    assert workdir.startswith("/home/ray/"), workdir
    lay_out(instructions, len(instructions), tmp_path)
    here = tmp_path / workdir.lstrip("/")
    for entrypoint in ("prepare", "train", "evaluate"):
        assert (here / "jobs" / f"{entrypoint}.py").is_file()
    assert (here / "jobs" / "_bootstrap.py").is_file()
    configs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert configs and all((here / c).is_file() for c in configs), "every config must be in the image"
    assert not list(here.rglob("__pycache__")) and not list(here.rglob("*.so")), "built files in the image"


def test_no_secrets_are_baked_into_the_image(instructions):
    for ins in instructions:
        if ins.keyword in {"ENV", "ARG", "LABEL"}:
            assert not re.search(r"AWS_|SECRET|PASSWORD|TOKEN|MLFLOW_TRACKING_USERNAME", ins.args, re.I), ins
    assert "ADD" not in {ins.keyword for ins in instructions}, "COPY only: ADD fetches URLs and unpacks archives"


# --- the build context -------------------------------------------------------------------------------


def test_every_copied_path_exists_and_is_in_the_build_context(instructions):
    rules = dockerignore()
    all_copies = copies(instructions)
    assert all_copies
    for sources, _ in all_copies:
        for src in sources:
            assert "$" not in src and not src.startswith("/") and ".." not in src, src
            path = REPO / src
            assert path.exists(), f"COPY {src}: not in the repository"
            assert not excluded(path.relative_to(REPO).as_posix(), rules), f"COPY {src}: excluded by .dockerignore"
    assert not any(ins.keyword == "COPY" and "--from" in ins.args for ins in instructions)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".demo/raw/LOC_val_solution.csv",
        ".services/env.sh",
        "imagenet_ray/__pycache__/cli.cpython-311.pyc",
        "tests/unit/__pycache__/test_cli.cpython-311-pytest-9.2.0.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        ".import_linter_cache/x.data.json",
        "build/lib.linux-x86_64-cpython-311/imagenet_ray_jpeg.cpython-311-x86_64-linux-gnu.so",
        "imagenet_ray_jpeg.cpython-311-x86_64-linux-gnu.so",
        "imagenet_ray.egg-info/PKG-INFO",
        ".env",
    ],
)
def test_dockerignore_keeps_environments_state_and_caches_out(path):
    assert excluded(path, dockerignore()), f"{path} would be sent to the docker build"


def test_dockerignore_keeps_what_the_image_needs():
    rules = dockerignore()
    for path in ("pyproject.toml", "setup.py", "README.md", "imagenet_ray/data/_jpeg_crop.c", "jobs/train.py"):
        assert not excluded(path, rules), path
    assert not excluded("imagenet_ray/data/LOC_synset_mapping.txt", rules)  # package data


def test_the_dockerignore_matcher_follows_docker():
    rules = [(False, _pattern("**/__pycache__")), (False, _pattern("build")), (True, _pattern("build/keep"))]
    assert excluded("__pycache__/a.pyc", rules) and excluded("a/b/__pycache__/c.pyc", rules)
    assert excluded("build/x", rules) and not excluded("build/keep", rules) and not excluded("src/build", rules)
    assert excluded("x.so", [(False, _pattern("**/*.so"))]) and excluded("a/x.so", [(False, _pattern("**/*.so"))])
    assert not excluded("a/.venv/x", [(False, _pattern(".venv"))]) and excluded(
        ".venv/x", [(False, _pattern("/.venv"))]
    )


# --- the install step, for real ------------------------------------------------------------------------
# Minutes of pip (torch's CUDA wheels: ~7 GB written) and none of our CPU-heavy work: it starts in a thread as
# soon as the suite is collected (conftest.py) and its test is moved to the end, so it overlaps the suite.

INSTALL_TEST = "test_the_dockerfiles_install_step_succeeds_in_a_fresh_venv"


@dataclass
class InstallOutcome:
    root: Path  # image/ (the files the image gets) and venv/
    workdir: Path
    env: dict[str, str]
    failure: str = ""  # the failing RUN and its output; "" when every RUN succeeded
    seconds: float = 0.0


class BackgroundInstall:
    """The install RUN and every RUN after it, verbatim, in a fresh venv on the files the image gets.

    The apt step before it is the machine's (this suite already needs gcc and libjpeg's headers); the
    image's `python` is the venv's here (first on PATH), with this machine's pip configuration."""

    def __init__(self) -> None:
        self.outcome: InstallOutcome | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dockerfile-install", daemon=True)

    def _run(self) -> None:
        try:
            instructions = parse_dockerfile(DOCKERFILE.read_text())
            index, _ = install_step(instructions)
            root = Path(tempfile.mkdtemp(prefix="irray-docker-install-"))
            atexit.register(shutil.rmtree, root, True)  # ~7 GB: gone even if the session is interrupted
            lay_out(instructions, index, root / "image")
            workdir = root / "image" / workdir_at(instructions, index).lstrip("/")
            venv = root / "venv"
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
            env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv))
            self.outcome = outcome = InstallOutcome(root, workdir, env)
            started = time.monotonic()
            for i, command in runs(instructions):
                if i < index:
                    continue
                proc = subprocess.run(
                    ["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=1500
                )
                if proc.returncode != 0:
                    outcome.failure = (
                        f"RUN {command}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
                    )
                    break
            outcome.seconds = time.monotonic() - started
        except BaseException as exc:  # reported by the test
            self.error = exc


_BACKGROUND: BackgroundInstall | None = None


def start_install_in_background() -> None:
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = BackgroundInstall()
        _BACKGROUND.thread.start()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_the_dockerfiles_install_step_succeeds_in_a_fresh_venv():
    start_install_in_background()  # already running unless this test was collected on its own terms
    assert _BACKGROUND is not None
    _BACKGROUND.thread.join(timeout=1700)
    assert not _BACKGROUND.thread.is_alive(), "the install step did not finish"
    outcome = _BACKGROUND.outcome
    try:
        assert _BACKGROUND.error is None, repr(_BACKGROUND.error)
        assert outcome is not None and not outcome.failure, outcome and outcome.failure
        print(f"the Dockerfile's install step took {outcome.seconds:.0f} s")
        workdir, env, venv = outcome.workdir, outcome.env, outcome.root / "venv"
        assert not (workdir / "build").exists(), "the install step leaves build/ behind"
        python = venv / "bin" / "python"
        proc = subprocess.run(
            [
                str(python),
                "-c",
                "import imagenet_ray_jpeg, imagenet_ray.cli, imagenet_ray; print(imagenet_ray.__file__)",
            ],
            cwd=outcome.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert str(venv) in proc.stdout, f"imported from {proc.stdout.strip()}, not the venv's install"
        cli = subprocess.run([str(venv / "bin" / "imagenet-ray"), "--help"], env=env, capture_output=True, text=True)
        assert cli.returncode == 0 and "train" in cli.stdout, cli.stderr
    finally:  # the venv is ~7 GB (torch's CUDA wheels): not left behind
        if outcome is not None:
            shutil.rmtree(outcome.root, ignore_errors=True)
