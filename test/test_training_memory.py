"""Huge pages for training: set only where the kernel allows them, never over the user's choice."""
import pytest

from spatialoc_ros.training import memory


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                                        ("always madvise [never]\n", "never"), ("garbage", None)])
def test_kernel_mode_is_the_bracketed_word(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert memory.kernel_thp_mode(str(path)) == mode


def test_kernel_mode_of_a_missing_file_is_none(tmp_path):
    assert memory.kernel_thp_mode(str(tmp_path / "absent")) is None


def test_enabled_where_the_kernel_allows(tmp_path, monkeypatch):
    monkeypatch.delenv(memory.THP_ENV, raising=False)
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    line = memory.enable_huge_pages(str(path))
    assert "on" in line and memory.os.environ[memory.THP_ENV] == "1"


@pytest.mark.parametrize("text", ["always madvise [never]\n", None])
def test_not_set_where_the_kernel_refuses_or_has_no_thp(tmp_path, monkeypatch, text):
    monkeypatch.delenv(memory.THP_ENV, raising=False)
    path = tmp_path / "enabled"
    if text is not None:
        path.write_text(text)
    line = memory.enable_huge_pages(str(path))
    assert "not used" in line and memory.THP_ENV not in memory.os.environ


def test_the_users_setting_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(memory.THP_ENV, "0")
    path = tmp_path / "enabled"
    path.write_text("[always] madvise never\n")
    assert "as given" in memory.enable_huge_pages(str(path))
    assert memory.os.environ[memory.THP_ENV] == "0"
