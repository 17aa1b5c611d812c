"""--resume auto finds what is there: the newest checkpoint that reads, naming every one it
skips (and deleting none); a finished run is reported complete and left untouched."""
import importlib.util
import os
import shutil

import pytest

from passl.config import load_config
from passl.engine.trainer import Trainer
from passl.errors import UserError
from passl.io import checkpoint
from test_run_dir import snapshot
from toy_training import toy_config, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-epoch toy run: checkpoints/epoch_{1,2,3}.pd, latest.pd -> epoch_3.pd."""
    base = tmp_path_factory.mktemp("recovery")
    Trainer(load_config(write_config(toy_config(base / "run"), base / "cfg.yaml"))).train()
    return base / "run"


def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


def resume(out, tmp_path, epochs=4):
    cfg = load_config(write_config(toy_config(out, epochs=epochs), tmp_path / "resume.yaml"))
    return Trainer(cfg, resume="auto")


def log_of(out):
    with open(out / "train.log") as f:
        return f.read()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_newest_checkpoint_is_skipped_by_name(finished, tmp_path, damage):
    out = copy_of(finished, tmp_path)
    newest = out / "checkpoints" / "epoch_3.pd"
    data = newest.read_bytes()
    broken = data[:len(data) // 2] if damage == "truncated" else bytes(range(256)) * 4
    newest.write_bytes(broken)
    trainer = resume(out, tmp_path)
    assert (trainer.start_epoch, trainer.start_step) == (2, 0)  # from epoch_2.pd
    skips = [line for line in log_of(out).splitlines() if "--resume auto: skipped" in line]
    assert len(skips) == 1 and f"skipped {newest}: " in skips[0]
    assert f"resumed from {out / 'checkpoints' / 'epoch_2.pd'}" in log_of(out)
    assert newest.read_bytes() == broken  # kept for a look, not deleted


def test_without_latest_pd_the_epoch_files_are_found(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    os.remove(out / "checkpoints" / "latest.pd")
    trainer = resume(out, tmp_path)
    assert trainer.start_epoch == 3
    assert f"resumed from {out / 'checkpoints' / 'epoch_3.pd'}" in log_of(out)


def test_no_readable_checkpoint_names_each_and_the_way_out(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    for n in (1, 2, 3):
        (out / "checkpoints" / f"epoch_{n}.pd").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError) as error:
        resume(out, tmp_path)
    message = str(error.value)
    assert message.startswith(f"--resume auto: none of the 3 checkpoint(s) in "
                              f"{out / 'checkpoints'} can be resumed (epoch_3.pd (")
    assert "epoch_2.pd (" in message and "epoch_1.pd (" in message
    assert message.endswith("start afresh with --archive-old-run (moves them to "
                            "previous_runs/), or pass --resume PATH")


def test_candidates_follow_latest_and_positions(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for name in ("epoch_1.pd", "epoch_2.pd", "epoch_3_step_1.pd", "epoch_10.pd"):
        (directory / name).write_bytes(name.encode())
    os.symlink("epoch_3_step_1.pd", directory / "latest.pd")

    def names():
        return [os.path.basename(p) for p in checkpoint.resume_candidates(str(tmp_path))]
    # epoch_10.pd lies beyond what latest.pd names: an earlier timeline of this folder
    assert names() == ["epoch_3_step_1.pd", "epoch_2.pd", "epoch_1.pd"]
    os.remove(directory / "latest.pd")
    assert names() == ["epoch_10.pd", "epoch_3_step_1.pd", "epoch_2.pd", "epoch_1.pd"]


def test_resuming_a_finished_run_says_so_and_writes_nothing(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    spec = importlib.util.spec_from_file_location("train_tool",
                                                  os.path.join(ROOT, "tools", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    cfg = write_config(toy_config(out), tmp_path / "same.yaml")
    with pytest.raises(SystemExit) as exit_info:
        train.run_cli(train.main, ["-c", cfg, "--resume", "auto"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"{out / 'checkpoints' / 'epoch_3.pd'}: already complete: 3 epochs; pass -o epochs=M "
        f"to train longer")
    assert snapshot(out) == before  # no summary record, no log line, no lock left
