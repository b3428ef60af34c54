"""The README and docs/ as a user meets them: every command shown is run by a test or says why
not, every fenced block says what it holds, and every relative link and anchor resolves.

A command is a line of a `bash`, `sh` or `console` block (continuation lines joined, the trailing
comment left out). Either RUN_BY below names the test that runs it, or a line
`# not run by the tests: <reason>` comes before it in its block, with no blank line between."""

import glob
import os
import re

from conftest import ROOT

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SHELLS = ("bash", "sh", "console")
MARKER = re.compile(r"#\s*not run by the tests:\s*(\S.*)")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")

# A documented command -> (the test that runs it, text that test's body must hold). A test runs the
# command with its own data and places: generated data, a local folder or the suite's moto S3
# server where the docs say ./flowers or my-bucket, a seeded state dict where they say imagenet (no
# test reaches the internet), usually fewer epochs and conftest.DIGITS (adam, lr 0.01) for the
# digits. The comment above an entry says what else differs. ".ci/run" is CI itself.
RUN_BY = {
    # README.md
    "scripts/test.sh": (".ci/run", "exec bash scripts/test.sh"),
    "JOB_DATA_URI=./data/digits JOB_OUTPUT_URI=./runs .venv/bin/python -m job":
        ("tests/job/test_end_to_end.py::test_local_end_to_end_is_deterministic", "run_job("),
    ".venv/bin/python -m job --help":
        ("tests/job/test_settings.py::test_help_lists_every_setting_with_type_default_and_meaning", '"--help"'),
    "JOB_DATA_URI=./data/digits JOB_OUTPUT_URI=./runs .venv/bin/python -m job --check":
        ("tests/job/test_end_to_end.py::test_check_reaches_data_and_output_without_training", '"--check"'),
    # the check on shards of a generated flowers folder in the moto bucket (no test checks a folder with resnet18)
    "JOB_DATA_URI=./flowers JOB_MODEL=resnet18 JOB_PRETRAINED=imagenet JOB_FREEZE=all python -m job --check":
        ("tests/job/test_shards.py::test_the_feature_cache_smoke_mode_and_check_work_on_shards", '"--check"'),
    # 32 px crops, 2 epochs
    "JOB_DATA_URI=./flowers JOB_MODEL=resnet18 JOB_PRETRAINED=imagenet JOB_FREEZE=all python -m job":
        ("tests/job/test_export.py::test_predict_and_evaluate_images_with_the_evaluation_preprocessing",
         "data_uri=str(tmp_path / \"data\")"),
    # resnet18 at 32 px for resnet152, 2 epochs
    "JOB_DATA_URI=s3://my-bucket/datasets/flowers JOB_OUTPUT_URI=s3://my-bucket/runs "
    "JOB_MODEL=resnet152 JOB_PRETRAINED=imagenet JOB_FREEZE=all JOB_EPOCHS=10 python -m job":
        ("tests/job/test_transfer.py::test_flowers_from_s3_with_weights_from_s3", 'data_uri="s3://data/flowers"'),
    # docs/data.md: resnet18 at 32 px for resnet152, its state dict in the moto bucket
    "JOB_DATA_URI=s3://bucket/flowers JOB_MODEL=resnet152 JOB_PRETRAINED=imagenet JOB_FREEZE=all "
    "JOB_OPTIMIZER=adam JOB_LR=0.001 python -m job":
        ("tests/job/test_transfer.py::test_flowers_from_s3_with_weights_from_s3", 'data_uri="s3://data/flowers"'),
    # the check on shards of a generated flowers folder (the tests check an image folder in S3 with an mlp:
    # tests/job/test_user_terms.py::test_remote_data_with_outputs_left_in_the_container_is_warned_once)
    "JOB_DATA_URI=s3://my-bucket/datasets/flowers JOB_OUTPUT_URI=s3://my-bucket/runs "
    "JOB_MODEL=resnet152 JOB_PRETRAINED=imagenet JOB_FREEZE=all python -m job --check":
        ("tests/job/test_shards.py::test_the_feature_cache_smoke_mode_and_check_work_on_shards", '"--check"'),
    "python -m job prepare s3://my-bucket/flowers s3://my-bucket/flowers-shards":
        ("tests/job/test_shards.py::test_prepare_from_the_bucket_gives_the_same_shards",
         'prepare("s3://data/flowers", "s3://data/from-s3"'),
    # an mlp on 16 px crops (the test's time), through a shard cache smaller than the dataset
    "JOB_DATA_URI=s3://my-bucket/flowers-shards JOB_MODEL=resnet50 python -m job":
        ("tests/job/test_shards.py::test_training_streams_through_a_cache_smaller_than_the_dataset",
         'data_uri="s3://data/flowers-shards"'),
    # docs/storage.md: conftest.fresh_bucket sets the AWS variables, for the moto server
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...":
        ("tests/job/test_end_to_end.py::test_s3_end_to_end", "def test_s3_end_to_end(s3"),
    "export AWS_ENDPOINT_URL=https://minio.example.com:9000":
        ("tests/job/test_end_to_end.py::test_s3_end_to_end", "def test_s3_end_to_end(s3"),
    "JOB_DATA_URI=s3://my-bucket/datasets/mnist JOB_OUTPUT_URI=s3://my-bucket/runs python -m job":
        ("tests/job/test_end_to_end.py::test_s3_end_to_end", 'output_uri="s3://out'),
    # docs/model.md: on a digits run the test trains; predict with --output, export to a folder of its own
    "python -m job predict runs/quickstart ./data/digit-images":
        ("tests/job/test_export.py::test_an_idx_trained_model_classifies_a_folder_of_images", 'command("predict"'),
    "python -m job evaluate runs/quickstart/model ./data/digits":
        ("tests/job/test_evaluate_naming.py::test_two_datasets_called_photos_get_their_own_evaluations_naming_uri_and_split",
         'run_job("evaluate", str(run), uri)'),
    "python -m job export runs/r/checkpoints/step-000004800.pt --output ./model":
        ("tests/job/test_export.py::test_export_from_any_checkpoint_old_ones_too", 'command("export"'),
    # docs/deploy.md: the image test, through scripts/smoke-docker.sh, and with --network host for the moto
    # server (it needs a Docker engine: CI prepares one, elsewhere it skips)
    "docker build -f docker/Dockerfile.cpu -t trainjob:0.1.0-cpu .":
        ("tests/deploy/test_image.py::test_smoke_docker_script_builds_the_image_and_its_smoke_run_passes",
         "cpu_image"),
    "docker run --rm --read-only --tmpfs /tmp:exec --tmpfs /cache:exec --shm-size 2g --stop-timeout 40 "
    "-e JOB_DATA_URI=s3://my-bucket/datasets/mnist -e JOB_OUTPUT_URI=s3://my-bucket/runs "
    "-e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY trainjob:0.1.0-cpu":
        ("tests/deploy/test_image.py::test_two_epochs_write_every_output_to_the_bucket", "docker_run("),
    "docker stop <container>":
        ("tests/deploy/test_image.py::test_docker_stop_mid_run_saves_a_checkpoint_and_exits_143",
         "stopped.code == 143"),
    "scripts/smoke-docker.sh [--gpu] [--tag IMAGE] [--build-arg NAME=VALUE]... [--network MODE] [--build-only]":
        ("tests/deploy/test_image.py::test_gpu_image_builds_with_the_cuda_wheel_and_runs_on_cpu", "smoke_docker("),
    "docker build -f docker/Dockerfile.gpu -t registry.example.com/ml/trainjob:0.1.0-gpu .":
        ("tests/deploy/test_image.py::test_gpu_image_builds_with_the_cuda_wheel_and_runs_on_cpu", "smoke_docker("),
    # --standalone and 2 CPU processes with gloo, for 4 GPUs
    "python -m job.launch --nproc-per-node=4":
        ("tests/job/test_launch.py::test_sigterm_to_the_launcher_checkpoints_exits_143_and_the_rerun_resumes",
         '"--nproc-per-node=2"'),
    # two nodes of one CPU process each, on 127.0.0.1
    "PET_NNODES=2 PET_NPROC_PER_NODE=8 PET_RDZV_BACKEND=c10d PET_RDZV_ENDPOINT=HOST:29400 PET_RDZV_ID=run1 "
    "python -m job.launch":
        ("tests/job/test_distributed.py::test_two_nodes_rendezvous_through_pet_variables", '"PET_RDZV_ENDPOINT"'),
    # one node of 2 CPU processes, through the TrainJob's own command
    "PET_NNODES=2 PET_NPROC_PER_NODE=8 PET_NODE_RANK=0 PET_MASTER_ADDR=HOST PET_MASTER_PORT=29500 "
    "python -m job.launch":
        ("tests/job/test_launch.py::test_kubeflow_trainer_pet_variables_run_the_trainjob_command_unchanged",
         '"PET_MASTER_ADDR"'),
    # --standalone and 2 CPU processes with gloo
    "torchrun --nproc-per-node=4 -m job":
        ("tests/job/test_distributed.py::test_two_processes_shard_the_data_and_match_one_process",
         '"--nproc-per-node=2"'),
    # docs/development.md
    "python scripts/settings_doc.py --check":
        ("tests/unit/test_docs.py::test_the_settings_page_check_passes_from_the_command_line", '"--check"'),
}


def fenced_blocks(page: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the opening fence, lines) of each fenced block of `page`, the
    fence's indentation removed (blocks inside list items are indented)."""
    blocks, current = [], None
    for number, line in enumerate(open(os.path.join(ROOT, page)).read().splitlines(), 1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = (fence.group(3).strip(), number, [], len(fence.group(1)), fence.group(2))
        elif current is not None and fence and fence.group(2).startswith(current[4]) and not fence.group(3).strip():
            blocks.append(current[:3])
            current = None
        elif current is not None:
            current[2].append(line[current[3]:] if line[: current[3]].strip() == "" else line)
    assert current is None, f"{page}: the block opened on line {current[1]} is never closed"
    return blocks


def commands(language: str, lines: list[str]) -> list[tuple[str, str | None]]:
    """(command, the reason it is not run, or None) for each command of a shell block."""
    if language == "console":  # a prompt marks a command; the rest is its output
        lines = [ln[2:] if ln.startswith("$ ") else ("" if ln.strip() else ln) for ln in lines if
                 ln.startswith(("$ ", "#")) or not ln.strip()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()
    found, reason = [], None
    for line in joined:
        text = line.strip()
        if not text:
            reason = None  # a marker covers the commands after it up to a blank line
        elif text.startswith("#"):
            marker = MARKER.fullmatch(text)
            reason = marker.group(1) if marker else reason
        else:
            found.append((" ".join(re.sub(r"\s+#.*$", "", text).split()), reason))
    return found


def documented_commands() -> list[tuple[str, str, str | None]]:
    """(page, command, reason) for every command of every page."""
    return [(page, command, reason) for page in PAGES for language, _, lines in fenced_blocks(page)
            if language in SHELLS for command, reason in commands(language, lines)]


def test_every_command_is_run_by_a_test_or_says_why_not():
    unaccounted = [f"{page}: {command}" for page, command, reason in documented_commands()
                   if reason is None and command not in RUN_BY]
    assert not unaccounted, (
        "commands no test runs: add the test that runs each to RUN_BY in tests/unit/test_docs.py, or put "
        "'# not run by the tests: <reason>' before it in its block:\n" + "\n".join(unaccounted))


def test_the_registry_names_documented_commands_only():
    shown = {command for _, command, _ in documented_commands()}
    assert not [c for c in RUN_BY if c not in shown], "RUN_BY lists commands the docs no longer show"


def function_source(test_id: str) -> str:
    """The source of a test function, from its `def` to the next top-level statement."""
    path, name = test_id.split("::")
    text = open(os.path.join(ROOT, path)).read()
    start = re.search(rf"^def {re.escape(name)}\(.*$", text, re.M)
    assert start, f"{test_id}: no such test"
    end = re.compile(r"^\S", re.M).search(text, start.end() + 1)
    return text[start.start(): end.start() if end else len(text)]


def test_each_registered_test_exists_and_runs_its_command():
    wrong = []
    for command, (where, evidence) in RUN_BY.items():
        body = function_source(where) if "::" in where else open(os.path.join(ROOT, where)).read()
        if evidence not in body:
            wrong.append(f"{where} does not hold {evidence!r}: is it still the test that runs `{command}`?")
    assert not wrong, "\n".join(wrong)


def test_the_marker_and_the_parser_see_what_they_look_for():
    """The checks above could pass by seeing nothing: the parser finds commands, joins continued
    lines, drops comments, and a marker covers its paragraph only."""
    lines = ["# setup", "a --x \\", "  --y   # joined", "# not run by the tests: needs a cluster", "b", "c", "",
             "d"]
    assert commands("bash", lines) == [("a --x --y", None), ("b", "needs a cluster"), ("c", "needs a cluster"),
                                       ("d", None)]
    assert commands("console", ["$ e f", "output", "$ g"]) == [("e f", None), ("g", None)]
    found = documented_commands()
    assert len(found) >= len(RUN_BY) and any(reason for _, _, reason in found)


def test_every_fenced_block_names_its_language():
    """A command in a block with no language would escape the checks above."""
    bare = [f"{page}:{number}" for page in PAGES for language, number, _ in fenced_blocks(page) if not language]
    assert not bare, f"fenced blocks without a language (use text for output and layouts): {bare}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(page: str) -> list[str]:
    """The lines of `page` outside fenced blocks (a `# comment` in a block is no heading)."""
    lines, fence = [], None
    for line in open(os.path.join(ROOT, page)).read().splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
        elif fence is not None and match and match.group(2).startswith(fence) and not match.group(3).strip():
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def anchors(page: str) -> set[str]:
    """The anchors GitHub makes for the headings of `page` (a repeated one gets -1, -2, ...)."""
    found, count = set(), {}
    for line in prose(page):
        heading = re.match(r"#{1,6} (.+)$", line)
        if heading:
            base = slug(heading.group(1))
            found.add(f"{base}-{count[base]}" if base in count else base)
            count[base] = count.get(base, 0) + 1
    return found


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"`[^`]*`", "", "\n".join(prose(page)))  # links in code are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https://, mailto: ...
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(ROOT, resolved)):
                broken.append(f"{page}: {target} (no {resolved})")
            elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
                broken.append(f"{page}: {target} (no heading #{anchor} in {resolved})")
    assert not broken, "\n".join(broken)


def test_the_settings_page_check_passes_from_the_command_line():
    """What the docs tell a contributor to run after changing a setting, run as they would."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "scripts/settings_doc.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)  # a hang guard: it imports torch
    assert result.returncode == 0 and "docs/settings.md is up to date" in result.stdout, result.stdout + result.stderr
