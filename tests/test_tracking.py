from pathlib import Path

import pytest

from resnet.config import ConfigError
from resnet.tracking import MetricsLog, resolve_wandb_mode


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_auto_is_offline_without_credentials(no_wandb_login):
    assert resolve_wandb_mode("auto") == "offline"


def test_auto_is_online_with_a_key_or_netrc(no_wandb_login, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = no_wandb_login / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"


def test_explicit_modes_and_user_env_win(no_wandb_login, monkeypatch):
    assert resolve_wandb_mode("off") == "off"
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "off"


def test_online_without_credentials_is_refused_up_front(no_wandb_login, monkeypatch):
    with pytest.raises(ConfigError, match="--wandb online: no W&B credentials found"):
        resolve_wandb_mode("online")
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match="WANDB_MODE=online: no W&B credentials found"):
        resolve_wandb_mode("auto")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("online") == resolve_wandb_mode("auto") == "online"


def test_metrics_csv_appends_truncates_and_plots(tmp_path: Path):
    log = MetricsLog(tmp_path)
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.1 * epoch, "lr": 0.1,
                    "val_loss": 1.5 / epoch, "val_acc": 0.1 * epoch}, last=epoch == 3)
        assert (tmp_path / "curves.png").exists() == (epoch == 3)  # drawn at the end, not at every epoch
    assert [r["epoch"] for r in log.rows()] == ["1", "2", "3"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    log.truncate_after(2)
    assert [r["epoch"] for r in log.rows()] == ["1", "2"]
