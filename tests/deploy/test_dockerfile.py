"""deploy/Dockerfile and the .dockerignore, read without Docker: a small parser (instructions,
ARGs, stages) and Docker's .dockerignore matching, then what the image promises — a base
pinned by digest, a numeric non-root user, a HEALTHCHECK through `sampler-service health`,
OCI labels, EXPOSE = the health port, a context that sends what the COPYs need and nothing
like .git or .venv, and both variants (cpu, cuda)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
OCI_LABELS = ("title", "description", "source", "licenses", "version", "revision")


# -- Dockerfile parser -------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str     # upper case: FROM, RUN, ...
    args: str        # the rest of the logical line, continuations joined
    line: int        # where it starts (1-based)


@dataclass
class Stage:
    base: str                      # FROM's image, as written
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def args(self) -> dict[str, str | None]:
        """The stage's ARGs with their defaults (None: no default)."""
        return dict(arg_declaration(i.args) for i in self.all("ARG"))


@dataclass
class Dockerfile:
    directives: dict[str, str]     # parser directives (`# syntax=...`)
    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def logical_lines(text: str) -> tuple[dict[str, str], list[Instruction]]:
    """Parser directives, then instructions with `\\` continuations joined; comment lines are
    dropped, also inside a continued instruction (as Docker does)."""
    directives: dict[str, str] = {}
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    leading = True
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if leading:
            directive = re.match(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$", stripped)
            if directive:
                directives[directive.group(1).lower()] = directive.group(2)
                continue
            leading = False
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, rest = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return directives, instructions


def arg_declaration(text: str) -> tuple[str, str | None]:
    name, sep, default = text.partition("=")
    return name.strip(), (shlex.split(default)[0] if default.strip() else "") if sep else None


def parse(path: Path | None = None) -> Dockerfile:
    directives, instructions = logical_lines((path or DOCKERFILE).read_text())
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG before FROM"
            global_args.update([arg_declaration(instruction.args)])
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(directives, global_args, stages)


def substitute(text: str, values: dict[str, str | None]) -> str:
    """Dockerfile variable substitution: $X, ${X}, ${X:-default}, ${X:+alternative}."""
    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        value = values.get(name) or ""
        if match.group(3) == ":-":
            return value or match.group(4)
        if match.group(3) == ":+":
            return match.group(4) if value else ""
        return value
    return re.sub(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\})",
                  one, text)


def exec_form(text: str) -> list[str]:
    """An exec-form (JSON array) argument list; fails on the shell form."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def label_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        assert sep, f"LABEL {word!r}: expected key=value"
        pairs[key] = value
    return pairs


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value of `flag` in an argument list (`--flag value` or `--flag=value`)."""
    value = None
    for index, word in enumerate(args):
        if word == flag and index + 1 < len(args):
            value = args[index + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """(options, exec-form command) of the stage's HEALTHCHECK."""
    instruction = stage.last("HEALTHCHECK")
    assert instruction is not None, "no HEALTHCHECK in the final stage"
    options_text, sep, command = instruction.args.partition("CMD ")
    assert sep, f"HEALTHCHECK {instruction.args!r}: expected CMD"
    options = dict(o.lstrip("-").split("=", 1) for o in options_text.split())
    return options, exec_form(command)


def seconds(duration: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(ms|s|m|h)", duration))


def entrypoint(stage: Stage) -> list[str]:
    instruction = stage.last("ENTRYPOINT")
    assert instruction is not None
    return exec_form(instruction.args)


def health_port(stage: Stage) -> int:
    port = flag_value(entrypoint(stage), "--health-port")
    assert port is not None, "the ENTRYPOINT passes no --health-port"
    return int(port)


# -- .dockerignore (Docker's patternmatcher) -------------------------------------------------
def _regex(pattern: str) -> re.Pattern:
    """Go filepath.Match plus `**` (any number of directories), as Docker translates it."""
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 1
                if pattern[i + 1:i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 == len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body[:1] in "!^" and body else body) + "]"
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def ignore_patterns(path: Path | None = None) -> list[tuple[bool, re.Pattern]]:
    """(is an exception `!`, regex) per pattern, in order."""
    patterns = []
    for line in (path or DOCKERIGNORE).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        text = os.path.normpath(line[1:].strip() if negated else line).lstrip("/")
        patterns.append((negated, _regex(text)))
    return patterns


def excluded(relative: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the context leaves `relative` (a path from the context root, `/`-separated)
    out: the last pattern matching it or one of its parent directories decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negated, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            result = not negated
    return result


def copy_sources(dockerfile: Dockerfile) -> list[str]:
    """The context paths every COPY/ADD (not --from another stage) reads."""
    sources = []
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            words = shlex.split(instruction.args)
            if any(w.startswith("--from") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            sources += paths[:-1]
    return sources


def context_files(source: str) -> list[str]:
    """The files a COPY of `source` takes from the checkout (bytecode caches and install
    metadata aside: the context leaves those out on purpose)."""
    path = ROOT / source
    if path.is_file():
        return [source]
    assert path.is_dir(), f"COPY {source}: not in the repository"
    found = []
    for directory, subdirectories, files in os.walk(path):
        subdirectories[:] = [d for d in subdirectories
                             if d != "__pycache__" and not d.endswith(".egg-info")]
        found += [Path(directory, f).relative_to(ROOT).as_posix() for f in files
                  if not f.endswith((".pyc", ".pyo"))]
    return found


# -- the parser itself ----------------------------------------------------------------------
def test_parser_reads_stages_args_and_continuations(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("# syntax=docker/dockerfile:1\n"
                    "ARG BASE=python@sha256:" + "a" * 64 + "\n"
                    "FROM ${BASE} AS build\nARG X=1\nRUN a \\\n# inner comment\n  && b\n"
                    "FROM ${BASE:-other}\nUSER 10001\n")
    parsed = parse(path)
    assert parsed.directives == {"syntax": "docker/dockerfile:1"}
    assert parsed.global_args == {"BASE": "python@sha256:" + "a" * 64}
    assert [(s.base, s.name) for s in parsed.stages] == [("${BASE}", "build"), ("${BASE:-other}", None)]
    assert parsed.stage("build").args() == {"X": "1"}
    run = parsed.stage("build").last("RUN")
    assert (run.args, run.line) == ("a && b", 5)
    assert substitute("${BASE:-other}", {}) == "other"
    assert substitute("${B:+yes}-$BASE", {"B": "1", "BASE": "x"}) == "yes-x"


def test_dockerignore_matcher_follows_docker():
    patterns = [(False, _regex("*")), (True, _regex("src")), (False, _regex("**/__pycache__")),
                (False, _regex("**/*.py[cod]"))]
    assert excluded(".git/HEAD", patterns) and excluded("setup.py", patterns)
    assert not excluded("src/a/b.py", patterns)
    assert excluded("src/a/__pycache__/b.cpython-311.pyc", patterns)
    assert excluded("src/b.pyc", patterns) and not excluded("src/b.py", patterns)


# -- the image -------------------------------------------------------------------------------
def test_every_base_image_is_pinned_by_digest():
    dockerfile = parse()
    names = set()
    for stage in dockerfile.stages:
        image = substitute(stage.base, dockerfile.global_args)
        if image not in names:  # FROM an earlier stage needs no digest
            assert DIGEST.search(image), f"FROM {stage.base} = {image!r}: not pinned by digest"
        if stage.name:
            names.add(stage.name)
    syntax = dockerfile.directives.get("syntax")
    assert syntax is None or DIGEST.search(syntax), f"# syntax={syntax}: not pinned by digest"


def test_the_final_stage_runs_as_a_numeric_non_root_user():
    user = parse().final.last("USER")
    assert user is not None, "the final stage sets no USER (it would run as root)"
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user.args}: runAsNonRoot needs a numeric uid"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user.args}"


def test_the_entrypoint_is_the_service_in_exec_form():
    command = entrypoint(parse().final)
    assert command[:2] == ["sampler-service", "serve"]


def test_healthcheck_asks_the_health_port_through_sampler_service_health():
    final = parse().final
    options, command = healthcheck(final)
    assert command[:2] == ["sampler-service", "health"]
    target = flag_value(command, "--target")
    assert target is not None and target.rsplit(":", 1)[1] == str(health_port(final))
    assert target.rsplit(":", 1)[0] in ("127.0.0.1", "localhost")
    # The command gives up (exit 2) before Docker kills it.
    assert float(flag_value(command, "--timeout") or 3) < seconds(options.get("timeout", "30s"))
    assert seconds(options.get("start-period", "0s")) >= 30  # torch and the kernels load first


def test_expose_is_the_health_port_the_entrypoint_passes():
    final = parse().final
    exposed = {int(port.split("/")[0]) for i in final.all("EXPOSE") for port in i.args.split()}
    assert exposed == {health_port(final)}


def test_oci_labels():
    dockerfile = parse()
    final = dockerfile.final
    labels = {}
    for instruction in final.all("LABEL"):
        labels.update(label_pairs(instruction.args))
    values = {**dockerfile.global_args, **final.args()}
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}" in labels, f"no org.opencontainers.image.{key}"
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert substitute(labels["org.opencontainers.image.version"], values) == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]
    for key in ("version", "revision", "source"):  # `make image` passes them as build args
        assert "$" in labels[f"org.opencontainers.image.{key}"], key


def test_caches_are_under_tmp_for_a_read_only_root():
    """readOnlyRootFilesystem: the image points numba's kernel cache (and other caches) at
    /tmp, which the pod mounts writable."""
    env = {}
    for instruction in parse().final.all("ENV"):
        env.update(label_pairs(instruction.args))
    assert env.get("NUMBA_CACHE_DIR", "").startswith("/tmp/")
    for name, value in env.items():
        if "CACHE" in name:
            assert value.startswith("/tmp/"), f"ENV {name}={value}: not writable on a read-only root"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"


@pytest.mark.parametrize("variant, index, extras", [
    ("cpu", r"https://download\.pytorch\.org/whl/cpu", "server"),
    ("cuda", r"https://download\.pytorch\.org/whl/cu\d{3}", "server,gpu"),
])
def test_both_variants_choose_their_torch_index_and_extras(tmp_path, variant, index, extras):
    """Runs the build stage's own selection step (a shell `case` on VARIANT) for the variant,
    then checks the extras exist in pyproject.toml. Both variants share every other line."""
    build = parse().stage("build")
    values = {k: v or "" for k, v in build.args().items()}
    assert values.get("VARIANT") == "cpu", "the default variant is cpu"
    chosen = _choose(build, tmp_path, {**values, "VARIANT": variant})
    assert re.fullmatch(index, chosen["CHOSEN_INDEX"]), chosen
    assert chosen["CHOSEN_EXTRAS"] == extras
    tomllib = pytest.importorskip("tomllib")
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.split(",")) <= set(optional)
    # Explicit TORCH_INDEX_URL / EXTRAS (deploy/README.md's build args) win over the variant.
    chosen = _choose(build, tmp_path, {**values, "VARIANT": variant,
                                       "TORCH_INDEX_URL": "https://example.invalid/whl",
                                       "EXTRAS": "server"})
    assert chosen == {"CHOSEN_INDEX": "https://example.invalid/whl", "CHOSEN_EXTRAS": "server"}


def test_an_unknown_variant_fails_the_build(tmp_path):
    build = parse().stage("build")
    values = {k: v or "" for k, v in build.args().items()}
    with pytest.raises(subprocess.CalledProcessError) as failure:
        _choose(build, tmp_path, {**values, "VARIANT": "rocm"})
    assert "VARIANT must be cpu or cuda" in failure.value.stderr


def _choose(build: Stage, tmp_path: Path, args: dict[str, str]) -> dict[str, str]:
    """Runs the RUN that writes /opt/variant.env (into tmp_path) with these build args."""
    step = next(i for i in build.all("RUN") if "/opt/variant.env" in i.args and "case" in i.args)
    script = step.args.replace("/opt/variant.env", str(tmp_path / "variant.env"))
    subprocess.run(["sh", "-c", script], env={"PATH": os.environ["PATH"], **args}, check=True,
                   capture_output=True, text=True)
    lines = (tmp_path / "variant.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_the_installs_read_the_variant_choice():
    runs = [i.args for i in parse().stage("build").all("RUN")]
    assert any("${CHOSEN_INDEX}" in r and "torch" in r for r in runs)
    assert any('".[${CHOSEN_EXTRAS}]"' in r for r in runs)


def test_healthcheck_command_is_an_installed_script():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    _, command = healthcheck(parse().final)
    assert command[0] in scripts and entrypoint(parse().final)[0] in scripts


# -- the build context ---------------------------------------------------------------------
def test_dockerignore_leaves_out_git_venv_and_caches():
    patterns = ignore_patterns()
    for path in (".git/HEAD", ".venv/bin/python", "sampler_service/__pycache__/cli.cpython-311.pyc",
                 "sampler_service/kernels/__pycache__/cpu_draw._rows-109.py311.1.nbc",
                 "sampler_sidecar.egg-info/PKG-INFO", ".pytest_cache/v/cache/nodeids",
                 ".hypothesis/examples/x", "tests/conftest.py", "build/lib/x.py", "dist/x.whl",
                 "benchmarks/common.py", "out/result.json", ".env"):
        assert excluded(path, patterns), f"{path} would be sent to the build"


def test_dockerignore_keeps_everything_the_dockerfile_copies():
    patterns = ignore_patterns()
    sources = copy_sources(parse())
    assert {"pyproject.toml", "README.md", "sampler_service", "clients/python"} <= set(sources)
    for source in sources:
        files = context_files(source)
        assert files, f"COPY {source}: no files"
        missing = [f for f in files if excluded(f, patterns)]
        assert not missing, f"COPY {source}: the .dockerignore leaves out {missing[:5]}"
    assert not excluded("sampler_service/policy/default_policies.yaml", patterns)
