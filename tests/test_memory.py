import platform
import sys

from pipeline.train.memory import keep_freed_memory


def test_freed_memory_is_kept_on_glibc_and_the_call_is_idempotent():
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    assert keep_freed_memory() is glibc  # a second call changes nothing


def test_the_environment_can_turn_it_off(monkeypatch):
    monkeypatch.setenv("PIPELINE_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
