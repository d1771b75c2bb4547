"""Deployment examples: the Kubernetes manifests are valid objects wired to the storage Secret, and every
`stl10-search ...` they or the SLURM script run is a command line the CLI accepts."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from search.cli import build_parser
from search.family import parse_families

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
SLURM_SCRIPT = DEPLOY / "slurm_workers.sh"
API_VERSIONS = {"Job": "batch/v1", "Secret": "v1", "PersistentVolumeClaim": "v1"}
STORAGE_VARIABLE = "STL10_SEARCH_STORAGE"
SHELLS = {"sh", "bash"}

_CLI_LINE = re.compile(r"(?:^|[\s;&|(`])stl10-search\s+(.*)")
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_SHELL_DEFAULT = re.compile(r"^(\w+)=\$\{\1:-([^}]*)\}", re.MULTILINE)


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every document of every YAML file under deploy/k8s/."""
    found = []
    for path in sorted(K8S.glob("*.y*ml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in load_manifests() if doc.get("kind") == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec.get("containers", [])


def script_cli_arguments(script: str, variables: dict[str, str]) -> list[list[str]]:
    """The arguments after `stl10-search` on each line of a shell script that runs it (comment lines too: they
    show commands to type), with $NAME and ${NAME} replaced from `variables`, up to the first shell operator."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        match = _CLI_LINE.search(line)
        if match is None:
            continue

        def value(variable: re.Match) -> str:
            name = variable.group(1)
            assert name in variables, f"no plausible value for ${name} in: {line.strip()}"
            return variables[name]

        lexer = shlex.shlex(_VARIABLE.sub(value, match.group(1)), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = []
        for word in lexer:
            if set(word) <= set(lexer.punctuation_chars):  # &, ;, |, >, ...: the command ends here
                break
            words.append(word)
        found.append(words)
    return found


def container_cli_arguments(container: dict[str, Any]) -> list[list[str]]:
    """The arguments of each `stl10-search` command the container runs, directly or from `sh -c SCRIPT`."""
    argv = [str(word) for word in container.get("command", []) + container.get("args", [])]
    if argv and Path(argv[0]).name == "stl10-search":
        return [argv[1:]]
    if argv and Path(argv[0]).name in SHELLS and "-c" in argv:
        variables = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
        return script_cli_arguments(argv[argv.index("-c") + 1], variables)
    return []


def manifest_commands() -> list[tuple[str, list[str]]]:
    return [(f"{name}:{doc['metadata']['name']}/{container['name']}", words)
            for name, doc in load_manifests() if doc.get("kind") == "Job"
            for container in containers(doc) for words in container_cli_arguments(container)]


def slurm_commands() -> list[tuple[str, list[str]]]:
    script = SLURM_SCRIPT.read_text()
    variables = dict(_SHELL_DEFAULT.findall(script))  # MODELS=${MODELS:-logreg,...}: its default
    return [(SLURM_SCRIPT.name, words) for words in script_cli_arguments(script, variables)]


def exact_parser() -> argparse.ArgumentParser:
    """The CLI's parser, taking flags only as spelled in full: an example that abbreviates (--checkpoint for
    --checkpoint-dir) breaks once another flag shares the prefix."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                subparser.allow_abbrev = False
    parser.allow_abbrev = False
    return parser


def parse_cli(source: str, words: list[str]):
    """The parsed command line; a test failure naming the source when the CLI rejects it."""
    try:
        args = exact_parser().parse_args(words)
    except SystemExit as error:
        pytest.fail(f"{source}: `stl10-search {shlex.join(words)}` is not a valid command line (exit {error.code})")
    if getattr(args, "model", None) is not None:
        parse_families(args.model)  # an unknown model family is a UserError
    return args


def is_mounted(container: dict[str, Any], path: str) -> bool:
    mounts = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])]
    return any(path == m or path.startswith(m + "/") for m in mounts)


def worker_jobs() -> list[dict[str, Any]]:
    return [job for job in of_kind("Job")
            if any(words[:1] == ["worker"] for c in containers(job) for words in container_cli_arguments(c))]


def test_every_manifest_is_a_kubernetes_object():
    manifests = load_manifests()
    assert {doc.get("kind") for _, doc in manifests} >= {"Secret", "Job"}
    for name, doc in manifests:
        assert isinstance(doc, dict), f"{name}: a document that is not a mapping"
        kind = doc.get("kind")
        assert kind in API_VERSIONS, f"{name}: kind {kind!r} is not one of {sorted(API_VERSIONS)}"
        assert doc.get("apiVersion") == API_VERSIONS[kind], f"{name}: {kind} needs apiVersion {API_VERSIONS[kind]}"
        assert isinstance(doc.get("metadata", {}).get("name"), str), f"{name}: {kind} without metadata.name"
        if kind != "Secret":
            assert isinstance(doc.get("spec"), dict), f"{name}: {kind} without spec"
        if kind == "Job":
            for container in containers(doc):
                assert container.get("name") and container.get("image"), f"{name}: a container needs name and image"


def test_worker_job_is_indexed_with_one_gpu_per_pod():
    jobs = worker_jobs()
    assert jobs, "no Job runs `stl10-search worker`"
    for job in jobs:
        spec, pod = job["spec"], pod_spec(job)
        assert spec.get("completionMode") == "Indexed"
        assert spec.get("completions") == spec.get("parallelism") >= 1
        assert pod.get("restartPolicy") in ("Never", "OnFailure")
        assert isinstance(spec.get("backoffLimit"), int)
        assert pod.get("terminationGracePeriodSeconds", 30) >= 120, "too short for a worker to finish its epoch"
        for container in pod["containers"]:
            for words in container_cli_arguments(container):
                assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
                args = parse_cli(job["metadata"]["name"], words)
                assert args.device == "cuda:0", "a pod sees its one GPU as cuda:0"
                if args.checkpoint_dir is not None:
                    assert is_mounted(container, str(args.checkpoint_dir)), "--checkpoint-dir is not on a volume"
                cache = {e["name"]: e.get("value") for e in container.get("env", [])}.get("XDG_CACHE_HOME")
                assert cache and is_mounted(container, cache), "XDG_CACHE_HOME should point into a volume"


def test_storage_url_comes_from_the_secret():
    secrets = {s["metadata"]["name"]: {**s.get("data", {}), **s.get("stringData", {})} for s in of_kind("Secret")}
    jobs = of_kind("Job")
    assert jobs
    for job in jobs:
        assert "postgresql://" not in yaml.safe_dump(job), f"{job['metadata']['name']}: a storage URL in a Job"
        for container in containers(job):
            commands = container_cli_arguments(container)
            if not commands:
                continue
            assert not any("--storage" in words for words in commands), "the URL comes from the environment"
            env = {e["name"]: e for e in container.get("env", [])}
            assert STORAGE_VARIABLE in env, f"{container['name']}: no {STORAGE_VARIABLE}"
            reference = env[STORAGE_VARIABLE].get("valueFrom", {}).get("secretKeyRef")
            assert reference, f"{container['name']}: {STORAGE_VARIABLE} should come from a Secret (secretKeyRef)"
            assert reference["name"] in secrets, f"no Secret {reference['name']} under deploy/k8s/"
            assert reference["key"] in secrets[reference["name"]]


def test_examples_create_the_studies_then_run_workers():
    for commands in (manifest_commands(), slurm_commands()):
        parsed = [parse_cli(source, words) for source, words in commands]
        assert any(a.command == "search" and a.workers == 0 for a in parsed), "no `search --workers 0` step"
        assert any(a.command == "worker" for a in parsed), "no `worker` step"


EXAMPLE_COMMANDS = manifest_commands() + slurm_commands()


@pytest.mark.parametrize("source, words", EXAMPLE_COMMANDS,
                         ids=[f"{source}:{' '.join(words[:1])}" for source, words in EXAMPLE_COMMANDS])
def test_every_example_command_is_a_valid_command_line(source, words):
    parse_cli(source, words)


def test_every_package_of_the_project_ships_in_its_wheel() -> None:
    """pip install . (not -e) must carry search.families, search.commands and search.report too."""
    import tomllib

    from setuptools import find_packages

    root = Path(__file__).resolve().parent.parent
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(str(root), include=include))
    on_disk = {".".join(init.parent.relative_to(root).parts) for top in ("data", "models", "search")
               for init in (root / top).rglob("__init__.py")}
    assert on_disk and on_disk <= shipped
