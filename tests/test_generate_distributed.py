"""examples/generate_distributed.py: a real 2-process run (gloo) gives the same PNGs as one process, the manifest
lists every prompt once, reruns skip what is done and redo a deleted image; seeds, file names, model sources and
bad inputs."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import PartialState
from conftest import load_script, run_two_cpu_processes
from transformers.utils import logging as transformers_logging

from transformers_cheers.tiny import tiny_cheers


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "generate_distributed.py"
STEPS = ["--steps", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


@pytest.fixture
def run_here(script, monkeypatch):
    """Run the script's main() in this process, as `python examples/generate_distributed.py --cpu ...` would."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)

    def run(*args):
        PartialState._reset_state()  # PartialState is a singleton: start each run from nothing, as a new process does
        try:
            return script.main(["--cpu", *map(str, args)])
        finally:
            PartialState._reset_state()
            transformers_logging.enable_progress_bar()  # main() turns the weight-loading bars off

    return run


def write_prompts(path: Path) -> Path:
    lines = [
        {"prompt": "A red apple on a wooden table."},
        {"prompt": "A blue car in the rain.", "seed": 1234},
        {"prompt": "A cat on a sofa.", "negative_prompt": "blurry"},
        {"prompt": "A lighthouse at dusk.", "seed": 1234},  # the same seed as another prompt: still its own file
        {"prompt": "A red apple on a wooden table."},  # a repeated prompt: another index, so another seed and file
    ]
    text = "\n".join(json.dumps(line) for line in lines[:3]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[3:])
    path.write_text(text + "\n")
    return path


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def part_lines(folder: Path) -> int:
    return sum(len(part.read_text().splitlines()) for part in (folder / "manifest-parts").glob("*.jsonl"))


def test_two_processes_give_the_images_of_one_and_resume(run_here, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    two, one = tmp_path / "two", tmp_path / "one"
    result = run_two_cpu_processes(SCRIPT, "--prompts", prompts, "--output-dir", two, *STEPS, "--seed", 100)
    assert "5 prompts: 0 done, 5 to generate on 2 process(es)" in result.stdout

    records = manifest(two)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]  # every prompt once, in file order
    assert [r["seed"] for r in records] == [100, 1234, 102, 1234, 104]  # jsonl seed, else --seed + index
    assert records[2]["negative_prompt"] == "blurry" and records[0]["negative_prompt"] is None
    assert len({r["file"] for r in records}) == 5 and all((two / r["file"]).is_file() for r in records)
    assert {r["process_index"] for r in records} == {0, 1} and all(r["seconds"] > 0 for r in records)

    # One process, same prompts and seeds: byte-identical PNGs.
    assert [r["file"] for r in run_here("--prompts", prompts, "--output-dir", one, *STEPS, "--seed", 100)] == [
        r["file"] for r in records
    ]
    for record in records:
        assert (one / record["file"]).read_bytes() == (two / record["file"]).read_bytes(), record["file"]

    # A rerun skips everything; after deleting an image it makes that one again, the same.
    lines_before = part_lines(two)
    run_here("--prompts", prompts, "--output-dir", two, *STEPS, "--seed", 100)
    assert "5 prompts: 5 done, 0 to generate" in capsys.readouterr().out and part_lines(two) == lines_before
    redone = next(r for r in records if r["process_index"] == 1)
    (two / redone["file"]).unlink()
    resumed = run_here("--prompts", prompts, "--output-dir", two, *STEPS, "--seed", 100)
    assert "5 prompts: 4 done, 1 to generate" in capsys.readouterr().out and part_lines(two) == lines_before + 1
    assert (two / redone["file"]).read_bytes() == (one / redone["file"]).read_bytes()
    assert [r["index"] for r in resumed] == [0, 1, 2, 3, 4] and resumed[redone["index"]]["process_index"] == 0
    assert manifest(two) == resumed


def test_seeds_and_file_names(script, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\n  second  \nthird\n")
    jobs = script.read_prompts(prompts, base_seed=7, negative_prompt="ugly")
    assert [(j.index, j.prompt, j.seed, j.negative_prompt) for j in jobs] == [
        (0, "first", 7, "ugly"), (1, "second", 8, "ugly"), (2, "third", 9, "ugly"),
    ]  # fmt: skip
    assert jobs[0].file.startswith("000000-") and jobs[0].file.endswith(".png")
    same, other_seed, other_negative = (
        script.PromptJob(0, "first", 7, "ugly"),
        script.PromptJob(0, "first", 8, "ugly"),
        script.PromptJob(0, "first", 7, None),
    )
    assert same.file == jobs[0].file and len({jobs[0].file, other_seed.file, other_negative.file}) == 3


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("absent.txt", None, "not found: pass an existing file with --prompts"),
        ("blank.txt", "\n  \n", "has no prompts: write one prompt per line"),
        ("prompts.csv", "a,b\n", "use a .txt file (one prompt per line) or a .jsonl file"),
        ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "x",\n', "bad.jsonl:3: not valid JSON"),
        ("list.jsonl", '["a prompt"]\n', "list.jsonl:1: expected a JSON object"),
        ("typo.jsonl", '{"prompt": "x", "negative-prompt": "y"}\n', "unknown key(s) ['negative-prompt']"),
        ("empty.jsonl", '{"prompt": " "}\n', 'empty.jsonl:1: needs a non-empty "prompt" string'),
        ("seed.jsonl", '{"prompt": "x", "seed": "7"}\n', '"seed" must be an integer in [0, 2**64 - 1]'),
        ("negative.jsonl", '{"prompt": "x", "negative_prompt": 3}\n', '"negative_prompt" must be a string'),
    ],
)
def test_bad_prompt_files_are_named_with_the_fix(script, tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(script.InputError) as error:
        script.read_prompts(path, base_seed=0)
    assert message in str(error.value) and str(path) in str(error.value)


def test_unwritable_output_dir_stops_before_any_work(run_here, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an apple\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made under a file (chmod would not stop root)
    with pytest.raises(SystemExit) as exit_info:
        run_here("--prompts", prompts, "--output-dir", blocker / "out", *STEPS)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"output directory {blocker / 'out'} is not writable" in error and "pass another --output-dir" in error


def test_other_settings_are_refused(run_here, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an apple\n")
    run_here("--prompts", prompts, "--output-dir", tmp_path / "out", *STEPS)
    with pytest.raises(SystemExit):
        run_here("--prompts", prompts, "--output-dir", tmp_path / "out", "--steps", "3")
    error = capsys.readouterr().err
    assert "holds images made with other settings (steps: 2 there, 3 now)" in error and "another --output-dir" in error


def test_manifest_ignores_what_a_crash_left(script, tmp_path):
    """A line cut short, and a line whose PNG was never renamed into place, are not in the manifest."""
    jobs = [script.PromptJob(0, "kept", 0), script.PromptJob(1, "crashed before the rename", 1)]
    (tmp_path / "manifest-parts").mkdir()
    (tmp_path / jobs[0].file).write_bytes(b"png")
    (tmp_path / f".{jobs[1].file}.partial").write_bytes(b"half a png")
    lines = [
        {**script.job_fields(job), "seconds": 1.0, "process_index": 0, "finished_at": f"2026-01-01T00:00:0{i}"}
        for i, job in enumerate(jobs)
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"index": 2, "pro'
    (tmp_path / "manifest-parts" / "process-0.jsonl").write_text(text)
    records = script.merge_manifest(tmp_path, jobs)
    assert [r["file"] for r in records] == [jobs[0].file] and records[0]["seconds"] == 1.0
    assert manifest(tmp_path) == records


def test_model_folder_and_pipeline_folder_give_the_tiny_models_images(script, tmp_path):
    job, device = script.PromptJob(0, "an apple", 3), torch.device("cpu")
    args = script.parse_args(["--prompts", "p.txt", "--output-dir", str(tmp_path), *STEPS])
    reference = script.load_pipeline(None, torch.float32, device)
    model, processor = tiny_cheers()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    reference.save_pretrained(tmp_path / "pipeline")
    expected = script.generate(reference, job, args, device)
    for folder in ("model", "pipeline"):
        image = script.generate(script.load_pipeline(str(tmp_path / folder), torch.float32, device), job, args, device)
        assert image.tobytes() == expected.tobytes(), folder


def test_a_launch_that_started_one_process_warns(script, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` without MPI starts one process; say so, with the command to use."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    class OneProcess:
        num_processes = 1

    with pytest.warns(UserWarning, match="This run uses ONE process"):
        script.warn_if_launch_fell_back(OneProcess())
