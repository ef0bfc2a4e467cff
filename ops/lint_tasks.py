"""`invoke lint`: ansible-lint, yamllint and ruff over the repository."""

from invoke import task
from invoke.exceptions import Exit

from ops.paths import ROOT

VENV_BIN = ROOT / ".venv" / "bin"
CHECKS = (
    ("ansible-lint", "ansible-lint playbooks/"),  # profile and skips: .ansible-lint
    ("yamllint", "yamllint --strict ."),  # config: .yamllint
    ("ruff", "ruff check ."),  # config: pyproject.toml [tool.ruff]
)


@task
def lint(c):
    """Lint Ansible (ansible-lint), YAML (yamllint) and Python (ruff)."""
    failed = []
    with c.cd(str(ROOT)):
        for name, command in CHECKS:
            print(f"==> {command}")
            if c.run(f"{VENV_BIN}/{command}", warn=True, pty=False).exited != 0:
                failed.append(name)
    if failed:
        raise Exit(f"lint: {', '.join(failed)} reported problems", 1)
    print("==> lint: all clean")
