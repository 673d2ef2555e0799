"""Run safety of the training plumbing: a run only ever deletes or rewrites what it created itself, one run per folder
at a time, a final save that a kill or a full disk cannot lose, a data fingerprint that sees replaced images, clear
errors for read-only folders and file-size or quota limits, workers that end with their launcher, and checkpoints by
wall time that resume bit-identically."""

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_stf.training import list_checkpoints, read_metrics, resolve_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_stf.py")
spec = importlib.util.spec_from_file_location("train_stf_safety", SCRIPT)
train_stf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_stf)

TINY = ["--block_out_channels", "8,16", "--train_batch_size", "16", "--num_validation_images", "4",
        "--num_inference_steps", "2", "--no_progress_bar", "--logging_steps", "2", "--validation_steps", "0",
        "--lr_warmup_steps", "2", "--dropout", "0.1", "--loss", "edm", "--max_train_samples", "64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}

pytestmark = pytest.mark.usefixtures("one_thread")


def run_stf(out, *argv):
    return train_stf.main(["--output_dir", str(out), *TINY, *argv])


def unet_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_files(root, files):
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def read_files(root, names):
    out = {}
    for name in names:
        path = os.path.join(root, name)
        out[name] = open(path).read() if os.path.isfile(path) else None
    return out


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def process_running(pid):
    """Whether ``pid`` is a live process (a zombie left for a reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid):
    """The PIDs of the live child processes of ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if name.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(name))
    return found


# --- 1. the logging folder -------------------------------------------------------------------------------------------

OTHERS = {"unrelated.txt": "keep me\n", "other.jsonl": '{"step": 5}\n', "other_run/logs/metrics.jsonl": '{"step": 3}\n'}


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_logging_dir_outside_the_run_gets_a_run_folder_and_nothing_else_is_touched(tmp_path, where):
    shared = tmp_path / "shared"
    out = shared / "run" if where == "parent" else tmp_path / "run"
    write_files(str(shared), OTHERS)
    argv = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--logging_dir",
            ".." if where == "parent" else str(shared)]
    run_stf(out, *argv)
    assert read_files(str(shared), OTHERS) == OTHERS  # neither rewritten nor deleted
    first = json.loads((out / "run.json").read_text())["run_id"]
    logs = shared / f"run-{first[:8]}"  # the run's own folder in the shared one
    assert [r["step"] for r in read_metrics(str(logs))] == [2]
    if where == "absolute":  # a tracker (TensorBoard) writes under accelerator.logging_dir: the run's own folder too
        from diffusers_stf.training import TrainingConfig, make_accelerator
        from diffusers_stf.training.run_folder import open_run_folder

        config = TrainingConfig(output_dir=str(out), logging_dir=str(shared), resume_from_checkpoint="latest",
                                report_to="none", cpu=True)
        accelerator = make_accelerator(config)
        assert accelerator.logging_dir == str(logs)
        open_run_folder(accelerator, config).release()

    run_stf(out, *argv, "--overwrite_output_dir")
    assert read_files(str(shared), OTHERS) == OTHERS
    second = json.loads((out / "run.json").read_text())["run_id"]
    assert second != first and not logs.exists()  # the earlier run's own logs went with it
    assert [r["step"] for r in read_metrics(str(shared / f"run-{second[:8]}"))] == [2]


def test_files_the_run_did_not_create_are_refused_not_rewritten(tmp_path):
    out = tmp_path / "run"
    write_files(str(out), {"logs/notes.jsonl": '{"step": 5}\n'})  # a logging folder the run did not create
    with pytest.raises(ValueError, match="--logging_dir.*logs.*not created by"):
        run_stf(out, "--max_train_steps", "2", "--checkpointing_steps", "0")
    assert (out / "logs" / "notes.jsonl").read_text() == '{"step": 5}\n'

    user = tmp_path / "user"
    write_files(str(user), {"README.md": "my notes\n"})  # the final save would replace it
    with pytest.raises(ValueError, match="README.md.*not created by"):
        run_stf(user, "--max_train_steps", "2", "--checkpointing_steps", "0")
    assert (user / "README.md").read_text() == "my notes\n"

    with pytest.raises(ValueError, match="--logging_dir"):
        run_stf(tmp_path / "dot", "--max_train_steps", "2", "--logging_dir", ".")

    # --overwrite_output_dir deletes the earlier run's own files only
    kept = tmp_path / "kept"
    write_files(str(kept), {"notes.txt": "mine\n", "fake_images/0.png": "input\n"})
    run_stf(kept, "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "1")
    assert (kept / "samples" / "step_0000001.png").is_file()
    run_stf(kept, "--max_train_steps", "1", "--checkpointing_steps", "0", "--overwrite_output_dir")
    assert read_files(str(kept), ["notes.txt", "fake_images/0.png"]) == {"notes.txt": "mine\n",
                                                                        "fake_images/0.png": "input\n"}
    assert not (kept / "samples").exists() and list_checkpoints(str(kept)) == []


# --- 2. the data fingerprint sees replaced images ---------------------------------------------------------------

def image_folder(folder, n=32, ext="png", seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(os.path.join(folder, f"{i:03d}.{ext}"))


def replace_image(path, keep_mtime=False):
    stat = os.stat(path)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(path, format=Image.open(path).format)
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    return stat


def test_resume_refuses_a_folder_whose_images_were_replaced(tmp_path):
    folder = str(tmp_path / "images")
    image_folder(folder)
    out = tmp_path / "run"
    argv = ["--train_data_dir", folder, "--checkpointing_steps", "2"]
    run_stf(out, *argv, "--max_train_steps", "2")
    replace_image(os.path.join(folder, "005.png"))  # the same count, names and resolution
    with pytest.raises(ValueError, match=r"another configuration(.|\n)*data_files"):
        run_stf(out, *argv, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")


def test_dataset_fingerprint_bytes_sees_a_replacement_with_the_same_names_sizes_and_mtimes(tmp_path):
    folder = str(tmp_path / "images")
    image_folder(folder, ext="bmp")  # uncompressed: a replacement has the same size
    out = tmp_path / "run"
    argv = ["--train_data_dir", folder, "--checkpointing_steps", "2", "--dataset_fingerprint", "bytes"]
    run_stf(out, *argv, "--max_train_steps", "2")
    before = replace_image(os.path.join(folder, "005.bmp"), keep_mtime=True)
    after = os.stat(os.path.join(folder, "005.bmp"))
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(ValueError, match=r"another configuration(.|\n)*data_files"):
        run_stf(out, *argv, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")


# --- 3. the final save --------------------------------------------------------------------------------------------

def test_a_full_disk_during_the_final_save_keeps_the_final_state_until_the_folder_is_complete(tmp_path, monkeypatch):
    from diffusers_stf import EDMPipeline

    out = tmp_path / "run"
    argv = ["--max_train_steps", "3", "--checkpointing_steps", "0"]

    def half_written(self, folder, **kwargs):  # the disk fills up after the first file
        os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
        with open(os.path.join(folder, "unet", "config.json"), "w") as f:
            f.write("{}")
        raise OSError(errno.ENOSPC, "No space left on device", folder)

    monkeypatch.setattr(EDMPipeline, "save_pretrained", half_written)
    with pytest.raises(RuntimeError, match="disk is full"):
        run_stf(out, *argv)
    kept = resolve_checkpoint(str(out), "latest")
    assert kept is not None and json.loads(open(os.path.join(kept, "trainer_state.json")).read())["step"] == 3
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()  # no half folder as the result
    ema = unet_weights(os.path.join(kept, "ema"))
    monkeypatch.undo()
    run_stf(out, *argv, "--resume_from_checkpoint", "latest")
    assert same_weights(unet_weights(str(out / "unet")), ema)  # the final folder holds the kept EMA weights
    assert list_checkpoints(str(out)) == []  # checkpointing is off: the kept state goes once the folder is complete
    assert sorted(p.name for p in out.iterdir() if "partial" in p.name or p.name.endswith(".old")) == []


def test_a_kill_during_the_final_save_loses_nothing(tmp_path):
    from diffusers_stf import EDMPipeline

    out = tmp_path / "run"
    argv = ["--max_train_steps", "3", "--checkpointing_steps", "0"]
    straight = tmp_path / "straight"
    run_stf(straight, *argv)
    env = {**ENV, "DIFFUSERS_STF_TEST_KILL_AT": "final_entry_moved"}  # some entries of the folder are in place
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(out), *TINY, *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "model_index.json").exists()  # the folder does not look complete
    assert [s for s, _ in list_checkpoints(str(out))] == [3]  # the final state is kept
    run_stf(out, *argv, "--resume_from_checkpoint", "latest")
    assert same_weights(unet_weights(str(out / "unet")), unet_weights(str(straight / "unet")))
    EDMPipeline.from_pretrained(str(out))
    assert list_checkpoints(str(out)) == []


# --- 4. one training per folder --------------------------------------------------------------------------------------

def test_a_second_run_or_a_resume_is_refused_while_one_trains_naming_its_pid(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--output_dir", str(out), *TINY, "--max_train_steps", "100000",
                             "--checkpointing_steps", "0"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: read_metrics(str(out / "logs")), 120, "the first run to log")
        run_file = (out / "run.json").read_text()
        for argv in (["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"], []):
            with pytest.raises(ValueError, match=rf"PID {proc.pid}\b"):
                run_stf(out, "--max_train_steps", "2", *argv)
        assert (out / "run.json").read_text() == run_file and read_metrics(str(out / "logs"))  # nothing deleted
    finally:
        proc.kill()
        proc.wait()
    capsys.readouterr()
    run_stf(out, "--max_train_steps", "2", "--checkpointing_steps", "0", "--overwrite_output_dir")
    assert f"stale lock of PID {proc.pid}" in capsys.readouterr().out  # the dead run's lock is taken over, said so


# --- 5. workers end with their launcher -------------------------------------------------------------------------------

def test_workers_end_when_the_launcher_is_killed(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, "--output_dir", str(out), *TINY,
           "--max_train_steps", "100000", "--checkpointing_steps", "0"]
    launcher = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    worker = None
    try:
        wait_for(lambda: read_metrics(str(out / "logs")), 120, "the worker to log")
        worker, = children(launcher.pid)
        launcher.kill()
        launcher.wait()
        wait_for(lambda: not process_running(worker), 60, f"worker {worker} to end after its launcher")
        assert "the launcher of this training process" in launcher.stdout.read()  # the worker said why it stopped
    finally:
        launcher.kill()
        if worker is not None and process_running(worker):
            os.kill(worker, signal.SIGKILL)


# --- 6. full disks of every kind, read-only folders -------------------------------------------------------------------

@pytest.mark.parametrize("code,words", [(errno.EFBIG, "file-size limit"), (errno.EDQUOT, "quota")])
def test_file_size_and_quota_limits_are_reported_like_a_full_disk(tmp_path, monkeypatch, code, words):
    from accelerate import Accelerator

    def refuse(self, folder):
        raise OSError(code, os.strerror(code), os.path.join(folder, "optimizer.bin"))

    monkeypatch.setattr(Accelerator, "save_state", refuse)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=rf"{words}(.|\n)*checkpoint-1(.|\n)*{out}"):
        run_stf(out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    assert not any(p.name.endswith(".partial") for p in out.iterdir())


def refuse_writes_under(monkeypatch, folder, code):
    """Make every write under ``folder`` fail with ``code``, as on a read-only mount (EROFS) or a folder without
    write permission (EACCES) -- the tests run as root, whom permissions do not stop."""
    import builtins

    folder = os.path.abspath(folder)
    inside = lambda path: os.path.abspath(os.fspath(path)).startswith(folder)  # noqa: E731
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


@pytest.mark.parametrize("code,flag", [(errno.EROFS, "--output_dir"), (errno.EACCES, "--output_dir"),
                                       (errno.EROFS, "--logging_dir")])
def test_a_folder_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch, code, flag):
    out, shared = tmp_path / "run", tmp_path / "shared"
    out.mkdir()
    shared.mkdir()
    refuse_writes_under(monkeypatch, out if flag == "--output_dir" else shared, code)
    monkeypatch.setattr(train_stf, "load_training_images", lambda *a, **k: pytest.fail("the data were loaded"))
    with pytest.raises(ValueError, match=rf"{flag}.*cannot be written.*{os.strerror(code)}"):
        run_stf(out, "--max_train_steps", "1", *(["--logging_dir", str(shared)] if flag == "--logging_dir" else []))


# --- 11. the thread count ------------------------------------------------------------------------------------------

def test_a_resume_at_another_thread_count_warns_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    run_stf(out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    capsys.readouterr()
    torch.set_num_threads(2)
    try:
        run_stf(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    finally:
        torch.set_num_threads(1)
    printed = capsys.readouterr().out
    assert "WARNING" in printed and "1 thread" in printed and "now 2" in printed
    assert [r["step"] for r in read_metrics(str(out / "logs"))] == [2, 4]  # resumed, not refused


# --- 14. checkpoints by wall time -------------------------------------------------------------------------------------

def test_wall_time_checkpoints_resume_bit_identically(tmp_path, monkeypatch):
    from diffusers_stf.training import Trainer

    # a checkpoint is due at every logging step (every 2 steps); checkpoints by step are off
    common = ["--max_train_steps", "6", "--checkpointing_steps", "0", "--checkpointing_minutes", "1e-9"]
    run_stf(tmp_path / "straight", *common)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "straight"))] == [6]  # only the newest is kept

    original = Trainer.micro_batch

    def interrupt_in_step_6(self, micro_step):
        if micro_step == 5:
            raise KeyboardInterrupt
        return original(self, micro_step)

    monkeypatch.setattr(Trainer, "micro_batch", interrupt_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_stf(tmp_path / "resumed", *common)
    monkeypatch.setattr(Trainer, "micro_batch", original)
    (step, path), = list_checkpoints(str(tmp_path / "resumed"))
    assert step == 4 and json.loads(open(os.path.join(path, "trainer_state.json")).read())["step"] == 4
    run_stf(tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
    assert same_weights(unet_weights(str(tmp_path / "straight" / "unet")),
                        unet_weights(str(tmp_path / "resumed" / "unet")))


def test_wall_time_checkpoints_do_not_push_out_step_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_stf(out, "--max_train_steps", "4", "--checkpointing_steps", "3", "--checkpoints_total_limit", "1",
            "--checkpointing_minutes", "1e-9")
    # the time checkpoint of step 4 does not count against --checkpoints_total_limit: checkpoint-3 stays
    assert [s for s, _ in list_checkpoints(str(out))] == [3, 4]
