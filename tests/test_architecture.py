"""The one-way flow of docs/ARCHITECTURE.md holds: import-linter's contracts in .importlinter are all kept."""

from __future__ import annotations

from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="import-linter is a dev dependency")

ROOT = Path(__file__).resolve().parents[1]


def _lint(config: Path) -> int:
    return importlinter_cli.lint_imports(config_filename=str(config), no_cache=True, no_logo=True)


def test_every_layering_contract_is_kept(capsys):
    code = _lint(ROOT / ".importlinter")
    assert code == 0, capsys.readouterr().out[-3000:]


def test_a_back_arrow_breaks_the_contracts(tmp_path, capsys):
    # The check can fail: the pipeline does import core, so forbidding that must be reported as broken.
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = dfp_deploy\n\n"
                      "[importlinter:contract:probe]\nname = probe\ntype = forbidden\n"
                      "source_modules =\n    dfp_deploy.pipeline\nforbidden_modules =\n    dfp_deploy.core\n")
    assert _lint(config) != 0
    assert "BROKEN" in capsys.readouterr().out
