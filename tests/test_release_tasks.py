"""`invoke upgrade` / `invoke rollback` without a cluster: their input checks and the confirmation."""

import pytest
from invoke import Context
from invoke.exceptions import Exit

from ops import release_tasks
from tests.test_day2_tasks import Tty


@pytest.mark.parametrize("text", ["1", "3", "25%", "100%", " 2 "])
def test_a_batch_is_a_number_of_workers_or_a_percentage(text):
    assert release_tasks.batch_size(text) == text.strip()


@pytest.mark.parametrize("text", ["0", "0%", "101%", "-1", "a", "2.5", "%", ""])
def test_a_bad_batch_is_one_plain_error(text):
    with pytest.raises(Exit) as err:
        release_tasks.batch_size(text)
    assert err.value.code == 2 and "--batch" in err.value.message


def test_rollback_asks_first_and_changes_nothing_unless_confirmed(monkeypatch):
    ran = []
    monkeypatch.setattr(release_tasks, "run_playbook", lambda *a, **kw: ran.append((a, kw)))
    monkeypatch.setattr("sys.stdin", Tty("y\n"))  # the answer must be typed in full
    with pytest.raises(Exit) as err:
        release_tasks.rollback(Context())
    assert "not confirmed" in err.value.message and ran == []
    monkeypatch.setattr("sys.stdin", Tty("yes\n"))
    release_tasks.rollback(Context(), to="0.1.0+0123456789ab", batch="1")
    (args, kw), = ran
    assert args[1] == "rollback.yml" and kw["extra_vars"] == {"taskfleet_worker_batch": "1",
                                                              "taskfleet_rollback_to": "0.1.0+0123456789ab"}


def test_rollback_refuses_a_malformed_version_before_asking(monkeypatch):
    monkeypatch.setattr("sys.stdin", Tty(""))  # asked first, it would end "not confirmed" (exit 1)
    with pytest.raises(Exit) as err:
        release_tasks.rollback(Context(), to="1.0; rm -rf /")
    assert err.value.code == 2
