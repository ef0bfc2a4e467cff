"""Unit tests of ops/deploy.py that need no cluster (the recap parser, inventory checks)."""

import pytest
from invoke.exceptions import Exit

from ops import deploy

TAIL = "rescued=0    ignored=0"  # recap lines as Ansible prints them, split to fit the line length
RECAP = f"""
PLAY RECAP *********************************************************************
tf-master                  : ok=21   changed=0    unreachable=0    failed=0    skipped=3    {TAIL}
tf-worker1                 : ok=0    changed=0    unreachable=1    failed=0    skipped=0    {TAIL}
tf-worker2                 : ok=19   changed=2    unreachable=0    failed=1    skipped=3    {TAIL}

"""


def test_parse_recap_counts_per_host():
    recap = deploy.parse_recap("TASK [x] ***\nok: [tf-master]\n" + RECAP)
    assert recap["tf-master"]["ok"] == 21
    assert recap["tf-worker1"]["unreachable"] == 1
    assert recap["tf-worker2"] == {
        "ok": 19, "changed": 2, "unreachable": 0, "failed": 1, "skipped": 3, "rescued": 0, "ignored": 0,
    }


def test_parse_recap_ignores_colour_and_missing_recap():
    assert deploy.parse_recap("\x1b[0;32mok: [h]\x1b[0m") == {}
    coloured = RECAP.replace("tf-master", "\x1b[0;32mtf-master\x1b[0m")
    assert "tf-master" in deploy.parse_recap(coloured)


def test_missing_inventory_is_a_clear_error(tmp_path):
    with pytest.raises(Exit) as err:
        deploy._check_inventory(tmp_path / "nope")
    assert "does not exist" in str(err.value.message)


def test_inventory_with_only_variables_is_a_clear_error(tmp_path):
    (tmp_path / "group_vars").mkdir()
    with pytest.raises(Exit) as err:
        deploy._check_inventory(tmp_path)
    assert "lists no hosts" in str(err.value.message)


def test_leak_check_finds_the_generated_key(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "authkey").write_text("ab" * 48)
    assert deploy._leaked_authkey(tmp_path, "ok: [h] => " + "ab" * 48)
    assert not deploy._leaked_authkey(tmp_path, "ok: [h] => censored")
    assert not deploy._leaked_authkey(tmp_path / "other", "anything")
