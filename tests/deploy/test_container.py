"""deploy/Dockerfile, checked statically and its CMD and HEALTHCHECK run without a container engine
(tests/deploy/test_image.py builds and runs the image itself).

No engine runs here, so the image is never built. Instead a small, real parser
(dockerfile_parser.py, self-checked below) reads the Dockerfile: the instructions it uses
(FROM, ENV, RUN, USER, EXPOSE, HEALTHCHECK, CMD, STOPSIGNAL), line continuations, comments and
Docker's variable substitution. The static facts are asserted (slim base, two stages, numeric
non-root USER, base install only, no torch, ports), the filtered build context is shown to build
the wheel with the model inside, and then the image's EXACT `CMD` and `HEALTHCHECK` argv are run
with the final stage's `ENV` applied, in a fresh server-only environment made the way the image
makes it (`pip install --no-index --find-links WHEELHOUSE mnist-edge`, no extras), with the
working directory outside the checkout. What cannot be checked without an engine: the base
image's own contents, the bind mount, file ownership inside the image.

The wheelhouse is MNIST_EDGE_WHEELHOUSE or `<repo>/wheelhouse` (scripts/test builds it), as
for tests/server/test_install.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.full_setup  # needs what scripts/test (not --quick) sets up

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
SETUP = "python -m pip wheel --wheel-dir wheelhouse .   (from the repository root)"


def _load_parser():
    """tests/deploy/dockerfile_parser.py, by path: tests/deploy is not on sys.path."""
    name = "mnist_edge_tests_dockerfile_parser"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("dockerfile_parser.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


_parser = _load_parser()
Instruction, Stage, Healthcheck, DockerfileError = _parser.Instruction, _parser.Stage, _parser.Healthcheck, _parser.DockerfileError
parse_dockerfile, parse_env_args, parse_command = _parser.parse_dockerfile, _parser.parse_env_args, _parser.parse_command
parse_healthcheck, parse_expose, parse_run, substitute = _parser.parse_healthcheck, _parser.parse_expose, _parser.parse_run, _parser.substitute


# -- parser self-checks (what the Dockerfile checks below rely on) -------------------------

def test_parser_reads_what_docker_reads():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG X=1\n"
        "FROM python:3.11-slim AS b\n"
        "RUN echo a \\\n"
        "  # a comment inside a continuation\n"
        "  && echo b\n"
        "FROM python:3.11-slim\n"
        "ENV A=1 B=\"two words\" C='$A' \\\n"
        "    PATH=/v/bin:$PATH\n"
        "ENV A=2 D=$A E=${A:-x} F=${MISSING:-dflt} G=${A:+set}\n"
        "ENV LEGACY value with spaces\n"
        "EXPOSE 50051 9464/udp\n"
        "HEALTHCHECK --interval=5s CMD [\"h\", \"--x\"]\n"
        "CMD echo shell form\n"
    )
    b, final = parse_dockerfile(text)
    assert (b.base, b.name, final.base, final.name) == ("python:3.11-slim", "b", "python:3.11-slim", None)
    assert parse_run(b.all("RUN")[0].args)[1] == [["echo", "a"], ["echo", "b"]]
    env = final.env({"PATH": "/usr/bin"})
    assert env == {"PATH": "/v/bin:/usr/bin", "A": "2", "B": "two words", "C": "$A", "D": "1", "E": "1", "F": "dflt", "G": "set", "LEGACY": "value with spaces"}
    assert parse_expose(final.last("EXPOSE").args, env) == {(50051, "tcp"), (9464, "udp")}
    hc = parse_healthcheck(final.last("HEALTHCHECK").args)
    assert hc.options == {"interval": "5s"} and hc.form == "exec" and hc.argv == ["h", "--x"]
    assert parse_command(final.last("CMD").args) == ("shell", ["/bin/sh", "-c", "echo shell form"])
    with pytest.raises(DockerfileError):
        parse_command('["unterminated"')
    with pytest.raises(DockerfileError):
        parse_dockerfile("RUN true\n")


# -- static facts about deploy/Dockerfile ---------------------------------------------------

@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages) -> Stage:
    return stages[-1]


IMAGE_VENV = "/opt/mnist-edge/venv"
HEALTHCHECK_IN_IMAGE = "/usr/local/bin/mnist-edge-healthcheck"


def _image_env(final: Stage) -> dict[str, str]:
    # The base image's PATH (what `$PATH` in ENV would expand to inside the image).
    return final.env({"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _args(text: str) -> dict[str, str]:
    """The ARG defaults declared before the first FROM (what FROM ${...} expands)."""
    args = {}
    for line in text.split("\nFROM ")[0].splitlines():
        m = re.match(r"^ARG\s+(\w+)(?:=(\S*))?\s*$", line)
        if m:
            args[m.group(1)] = m.group(2) or ""
    return args


def test_base_and_wheels_come_from_build_args(stages, final):
    """`docker build` users get a registry base (python slim, Debian bookworm) and wheels built
    in a builder stage; deploy/build-image.sh passes a local debootstrap base and a host wheelhouse."""
    args = _args(DOCKERFILE.read_text())
    slim = re.compile(r"^(docker\.io/library/)?python:3\.11-slim(-bookworm)?(@sha256:[0-9a-f]{64})?$")
    assert slim.match(args["BASE"]), f"default BASE {args['BASE']!r} is not python:3.11-slim (Debian bookworm)"
    assert final.base == "${BASE}"
    by_name = {st.name: st for st in stages if st.name}
    assert args["WHEELS"] in by_name and by_name["wheels"].base == "${WHEELS}"
    built, host = by_name["built-wheels"], by_name["host-wheels"]
    # Wheels built in the builder must match the final interpreter (cp311, same glibc).
    assert built.base == final.base
    assert any("pip wheel" in r.args and "/wheels/deps" in r.args for r in built.all("RUN"))
    assert host.base == "scratch" and host.last("COPY").args.split() == ["wheelhouse/", "/wheels/"]
    script = (REPO / "deploy" / "build-image.sh").read_text()
    assert "--build-arg WHEELS=host-wheels" in script and '--build-arg BASE="$BASE"' in script
    assert "--format docker" in script, "podman drops HEALTHCHECK from OCI-format images"


def test_final_stage_runs_as_a_fixed_non_root_user(final):
    user = final.last("USER")
    assert user is not None, "the final stage sets USER"
    uid, _, gid = user.args.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, f"USER {user.args!r} is not a numeric non-root UID"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # ...and it exists in the image (a passwd entry), created with that very UID.
    created = [cmd for r in final.all("RUN") for cmd in parse_run(r.args)[1] if cmd and cmd[0] == "useradd"]
    assert created and uid in created[0][created[0].index("--uid") + 1 :][:1], f"no `useradd --uid {uid}` in the final stage"
    # Every RUN (the install) happens before USER: the runtime user cannot write the venv.
    assert all(r.line < user.line for r in final.all("RUN"))


def test_final_stage_installs_only_the_base_install_offline(final):
    text = " ".join(i.args for i in final.instructions).lower()
    for banned in ("torch", "[train", "mnist-edge[", "onnxscript", "requirements"):
        assert banned not in text, f"the final stage mentions {banned!r}"
    copies = [c.args.split() for c in final.all("COPY")]
    assert copies == [["deploy/mnist-edge-healthcheck", HEALTHCHECK_IN_IMAGE]], "code and model come in the wheel; only the health check script is copied"
    assert not final.all("ADD")
    installs = []
    for r in final.all("RUN"):
        flags, commands = parse_run(r.args)
        for cmd in commands:
            if "install" in cmd and any(t.endswith("/pip") for t in cmd):
                installs.append((flags, cmd))
    assert len(installs) == 2, installs  # the dependencies' layer, then the project's
    for flags, cmd in installs:
        assert flags.get("mount", "").startswith("type=bind,from=wheels") and "target=/wheels" in flags["mount"]
        assert "--no-index" in cmd and cmd[0] == f"{IMAGE_VENV}/bin/python"
    deps, project = installs[0][1], installs[1][1]
    assert deps[-1] == "/wheels/deps/*.whl" and "--no-deps" in deps
    assert project[-1] == "/wheels/project/*.whl" and project[project.index("--find-links") + 1] == "/wheels/deps"
    # Each install names the digest of what it installs, so a changed wheel rebuilds its layer.
    runs = [r.args for r in final.all("RUN") if "/wheels/" in r.args]
    assert "${DEPS_SHA256}" in runs[0] and "${PROJECT_SHA256}" in runs[1]
    # The venv is the first entry of the image's PATH.
    assert _image_env(final)["PATH"].split(":")[0] == f"{IMAGE_VENV}/bin"


def test_ports_env_healthcheck_and_cmd_agree(final):
    env = _image_env(final)
    host, port = _host_port(env["MNIST_EDGE_ADDRESS"])
    mhost, mport = _host_port(env["MNIST_EDGE_METRICS_ADDRESS"])
    assert host == "0.0.0.0" and mhost == "0.0.0.0", "in a container the server listens on all interfaces"
    assert parse_expose(final.last("EXPOSE").args, env) == {(port, "tcp"), (mport, "tcp")} == {(50051, "tcp"), (9464, "tcp")}
    assert env["MNIST_EDGE_LOG_FORMAT"] == "json"

    form, argv = parse_command(final.last("CMD").args)
    assert form == "exec" and argv == ["mnist-edge", "serve"], "exec form: the server is PID 1 and gets SIGTERM itself"
    assert final.last("STOPSIGNAL").args == "SIGTERM"
    assert not final.all("ENTRYPOINT")

    hc = parse_healthcheck(final.last("HEALTHCHECK").args)
    # No Python per probe: a bash script that reads MNIST_EDGE_ADDRESS itself (no address baked in).
    assert hc is not None and hc.form == "exec" and hc.argv == [HEALTHCHECK_IN_IMAGE]
    assert (REPO / "deploy" / "mnist-edge-healthcheck").read_text().startswith("#!/bin/bash\n")
    assert "start-period" in hc.options and "timeout" in hc.options
    # docker stop waits 10 s before SIGKILL: drain + grace fit inside it.
    assert float(env.get("MNIST_EDGE_DRAIN_DELAY_S", 0)) + float(env.get("MNIST_EDGE_GRACE_S", 10)) < 10
    labels = " ".join(i.args for i in final.all("LABEL"))
    for key in ("org.opencontainers.image.source", "org.opencontainers.image.revision"):
        assert key in labels


# -- the build context: deploy/Dockerfile.dockerignore ---------------------------------------

def _ignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, line[1:].strip() if negate else line))
    return patterns


def _excluded(rel: str, patterns) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory covers
    everything under it; `**` matches any number of directories."""
    parts = rel.split("/")
    excluded = False
    for negate, pattern in patterns:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        for k in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:k])):
                excluded = not negate
                break
    return excluded


def _context_files(patterns) -> list[str]:
    files = []
    for root, dirs, names in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        dirs[:] = [d for d in dirs if d not in (".git",) and not d.startswith(".venv")]
        for name in names:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if not _excluded(rel, patterns):
                files.append(rel)
    return sorted(files)


def test_dockerignore_matcher():
    pats = [(False, "*"), (False, "x"), (True, "pkg"), (False, "**/__pycache__")]
    assert _excluded("README.md", pats) and _excluded(".venv/bin/python", pats)
    assert not _excluded("pkg/a.py", pats) and _excluded("pkg/__pycache__/a.pyc", pats)


def test_build_context_is_what_the_wheel_needs_and_nothing_else(tmp_path):
    """The filtered context builds the wheel (offline, no build isolation) with the shipped
    model inside, and leaves out environments, wheelhouses, runs and tests."""
    patterns = _ignore_patterns()
    files = _context_files(patterns)
    for outside in (".venv/bin/python", ".git/HEAD", "runs/mnist.pt", "reports/x", "tests/conftest.py", "build/lib/x", "deploy/Dockerfile"):
        assert _excluded(outside, patterns), f"{outside} would be sent to the builder"
    assert "pyproject.toml" in files and "models/manifest.json" in files
    # In on purpose: the final stage's health check, and a host wheelhouse for WHEELS=host-wheels.
    assert not _excluded("deploy/mnist-edge-healthcheck", patterns) and not _excluded("wheelhouse/x.whl", patterns)
    files = [f for f in files if not f.startswith(("wheelhouse/", "deploy/"))]
    context = tmp_path / "context"
    for rel in files:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, context / rel)
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(out), str(context)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )
    assert proc.returncode == 0, f"the wheel does not build from the filtered context:\n{proc.stderr[-3000:]}"
    (wheel,) = out.glob("mnist_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    assert "mnist_edge/models/manifest.json" in names
    for entry in manifest["models"].values():
        assert f"mnist_edge/models/{entry['file']}" in names, entry["file"]
    for module in ("server/cli.py", "client/health_cli.py", "cli.py", "protos/digits/v1/digits_pb2.py"):
        assert f"mnist_edge/{module}" in names, module
    # One import package: nothing but mnist_edge (and the dist-info) at the top of the wheel.
    assert {n.split("/")[0] for n in names} == {"mnist_edge", wheel.name.split("-py3")[0] + ".dist-info"}


# -- the image's CMD and HEALTHCHECK, run for real -----------------------------------------

def wheelhouse() -> Path:
    configured = os.environ.get("MNIST_EDGE_WHEELHOUSE")
    path = Path(configured) if configured else REPO / "wheelhouse"
    if configured and not path.is_dir():
        pytest.fail(f"MNIST_EDGE_WHEELHOUSE={configured} is not a directory; build it with: {SETUP}")
    if path.is_dir() and any(path.glob("mnist_edge-*.whl")):
        return path
    message = f"no wheelhouse with the mnist-edge wheel at {path}; set MNIST_EDGE_WHEELHOUSE or build it with: {SETUP}"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message)
    pytest.skip(message)


def base_python() -> str:
    """The interpreter this test's venv was made from (not the venv's own python)."""
    candidate = getattr(sys, "_base_executable", None)
    if candidate and Path(candidate).exists() and Path(candidate).resolve() != Path(sys.executable).resolve():
        return candidate
    venv_bin = Path(sys.prefix) / "bin"
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != venv_bin)
    found = shutil.which("python3", path=path)
    if not found:
        pytest.fail("no base python3 found to create a fresh virtual environment with")
    return found


def clean_env() -> dict[str, str]:
    """No PYTHONPATH, no active venv, no project or pip configuration leaking in."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PIP_", "MNIST_EDGE_"))}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """What the image's install RUN makes: a venv with `pip install --no-index --find-links
    WHEELHOUSE mnist-edge` (the base install, no extras)."""
    wheels = wheelhouse()
    root = tmp_path_factory.mktemp("image")
    venv = root / "venv"
    env = clean_env()
    proc = subprocess.run([base_python(), "-m", "venv", str(venv)], cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-index", "--find-links", str(wheels), "mnist-edge"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"server-only install failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return venv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_env(final: Stage, venv: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(the process environment, the overrides made) for running the image's commands here."""
    host = clean_env()
    image_env = final.env({"PATH": host["PATH"]})
    env = dict(host)
    for key, value in image_env.items():
        env[key] = value.replace(IMAGE_VENV, str(venv))  # /opt/mnist-edge/venv is here the test's venv
    # The image's PATH is complete; here the host's own follows, for bash and coreutils.
    env["PATH"] = f"{venv / 'bin'}:{host['PATH']}"
    # The image listens on 0.0.0.0 (every interface of the container's own network namespace).
    # Tests only use loopback, and in parallel: here that becomes 127.0.0.1 on free ports.
    overrides = {
        "MNIST_EDGE_ADDRESS": f"127.0.0.1:{free_port()}",
        "MNIST_EDGE_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        # Not in the image (Kubernetes sets it): a drain delay keeps the process alive after
        # SIGTERM, so the test sees the HEALTHCHECK fail while the server still runs, not
        # only once it is gone.
        "MNIST_EDGE_DRAIN_DELAY_S": "1.5",
    }
    env.update(overrides)
    return env, overrides


def test_env_names_are_server_flags(final, installed, tmp_path):
    """A misspelt MNIST_EDGE_* variable is silently ignored: every one the image sets must be
    one the installed server reads (its --help lists `[env MNIST_EDGE_...]` per flag)."""
    env, _ = container_env(final, installed)
    proc = subprocess.run(["mnist-edge", "serve", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    known = set(re.findall(r"\[env\s+(MNIST_EDGE_[A-Z0-9_]+)\]", proc.stdout))
    assert "MNIST_EDGE_ADDRESS" in known, proc.stdout
    image = {k for k in _image_env(final) if k.startswith("MNIST_EDGE_")}
    assert image and image <= known, f"unknown to the server: {sorted(image - known)}"


def test_image_cmd_serves_and_healthcheck_follows_the_lifecycle(final, installed, tmp_path):
    env, overrides = container_env(final, installed)
    _, cmd = parse_command(final.last("CMD").args)
    hc = parse_healthcheck(final.last("HEALTHCHECK").args)
    # The same script the image copies in; it reads MNIST_EDGE_ADDRESS from `env` (the test's port).
    health = [str(REPO / "deploy" / Path(hc.argv[0]).name)]
    found = shutil.which(cmd[0], path=env["PATH"])
    assert found and Path(found).parent == installed / "bin", found

    cwd = tmp_path / "workdir"  # outside the checkout: nothing of the repository is importable
    cwd.mkdir()

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(health, cwd=cwd, env=env, capture_output=True, text=True, timeout=30)

    before = check()
    assert before.returncode != 0, "HEALTHCHECK passes with no server running"

    err_path = tmp_path / "serve.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        codes = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode} before SERVING:\n{err_path.read_text()[-3000:]}")
            result = check()
            codes.append(result.returncode)
            if result.returncode == 0:
                break
            time.sleep(0.2)
        assert codes and codes[-1] == 0, f"HEALTHCHECK never passed within 90s: {codes}\n{err_path.read_text()[-3000:]}"
        assert set(codes[:-1]) <= {1}, codes  # not listening or not ready yet

        # The metrics port (EXPOSE 9464 in the image) answers too.
        with urllib.request.urlopen(f"http://{overrides['MNIST_EDGE_METRICS_ADDRESS']}/metrics", timeout=10) as r:
            assert r.status == 200 and b"# TYPE" in r.read()

        proc.send_signal(signal.SIGTERM)  # what STOPSIGNAL makes `docker stop` send
        draining = None
        while proc.poll() is None:
            result = check()
            if proc.poll() is None and result.returncode != 0:
                draining = result.returncode
                break
        assert draining == 1, "HEALTHCHECK still passed (or the server had already gone) after SIGTERM"
        assert proc.wait(timeout=30) == 0
        assert check().returncode != 0, "HEALTHCHECK passes after the server exited"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    # The image's ENV reached the server: JSON logs (MNIST_EDGE_LOG_FORMAT), the image's grace.
    lines = [line for line in err_path.read_text().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is JSON, or this raises
    serving = [e for e in events if e.get("event") == "serving"]
    assert len(serving) == 1 and serving[0]["msg"] == f"serving on {overrides['MNIST_EDGE_ADDRESS']}"
    stopping = [e for e in events if e.get("event") == "stopping"]
    assert stopping and float(stopping[0]["grace_s"]) == float(_image_env(final)["MNIST_EDGE_GRACE_S"])
    assert events[-1]["event"] == "stopped"
